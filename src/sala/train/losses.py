"""Loss sums and target counts of the three stage kinds.

Each function returns ``(sum, count)`` over this process's rows; the trainer divides by the count summed
over all processes, so the update does not depend on how rows are split between processes.
``kl_sum`` and ``lm_sum`` work on full logits: they are the references of the chunked losses the trainer
runs (``sala.ops.linear_ce`` through the student's forward), and what a model without them would use.
"""

from __future__ import annotations

import torch

from ..data.packing import IGNORE
from ..ops.linear_ce import cross_entropy_sum, kl_divergence_sum


def masked_mse_sum(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of squared differences over real tokens and all features; count = elements summed."""
    d = (student.float() - teacher.float()).pow(2)
    if mask is None:
        return d.sum(), torch.tensor(float(d.numel()))
    m = mask.to(d.dtype)[..., None]
    return (d * m).sum(), m.sum() * d.shape[-1]


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(teacher || student) over the full vocabulary, summed over real tokens (temperature 1)."""
    total = kl_divergence_sum(student_logits.float(), teacher_logits.float(), mask)
    count = torch.tensor(float(student_logits.shape[:-1].numel())) if mask is None else mask.to(total.dtype).sum()
    return total, count


def lm_sum(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy: position t predicts labels[t + 1]; IGNORE targets are skipped.
    ``weights`` ``[B, T]`` (optional) scale each target token's term; the count stays the number of targets."""
    tgt = labels[:, 1:]
    loss = cross_entropy_sum(logits[:, :-1].float().reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                             None if weights is None else weights[:, 1:].reshape(-1))
    return loss, (tgt != IGNORE).sum().to(loss.dtype)
