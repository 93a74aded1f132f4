"""Cross-entropy (and distillation KL) of a linear head over chunks of tokens, never holding the full
``[tokens, vocab]`` logits.

At 32K tokens and a 49K vocabulary, the logits of one training row take 3.2 GB in bf16, and the float32
copy, the log-softmax and their gradients four to five times that: a quarter of the training step's peak
memory for a 135M model. Here each chunk's logits are computed, reduced to a log-sum-exp per token, and
dropped; the backward pass recomputes them chunk by chunk.

Same numbers as the eager path ``F.cross_entropy(lm_head(h / divisor).float(), targets)``: the logits are
computed in the dtype autocast would give the head (``compute_dtype``) and reduced in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor,
                      token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """From full logits ``[N, vocab]`` (the reference of :func:`chunked_linear_cross_entropy`):
    ``sum_i w_i * CE(logits_i, t_i)`` over targets that are not -100."""
    if token_weights is None:
        return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
    per_tok = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="none")
    return (per_tok * token_weights.to(per_tok.dtype)).sum()


def kl_divergence_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """From full logits ``[..., vocab]`` (the reference of :func:`chunked_linear_kl`):
    ``sum_i w_i * KL(softmax(teacher_i) || softmax(student_i))``, temperature 1."""
    log_s = F.log_softmax(student_logits, dim=-1)
    log_t = F.log_softmax(teacher_logits.to(student_logits.dtype), dim=-1)
    per_tok = (log_t.exp() * (log_t - log_s)).sum(-1)
    return per_tok.sum() if token_weights is None else (per_tok * token_weights.to(per_tok.dtype)).sum()


def _chunk_logits(h, weight, divisor, cdt):
    """At least float32, as the model's logits (a float64 head keeps float64)."""
    out = F.linear((h / divisor).to(cdt), weight.to(cdt))
    return out if out.dtype == torch.float64 else out.float()


def _head_forward(h, weight, divisor, chunk, cdt, acc, loss_of):
    """(sum of the per-token losses, log-sum-exp of every token's logits): each chunk's logits computed,
    reduced by ``loss_of(start, logits, lse)`` to per-token losses, and dropped."""
    lse = torch.empty(h.shape[0], device=h.device, dtype=acc)
    total = torch.zeros((), device=h.device, dtype=acc)
    for a in range(0, h.shape[0], chunk):
        z = _chunk_logits(h[a:a + chunk], weight, divisor, cdt).to(acc)
        lse[a:a + chunk] = torch.logsumexp(z, dim=-1)
        total = total + loss_of(a, z, lse[a:a + chunk]).sum()
    return total, lse


def _head_backward(needs, h, weight, divisor, chunk, cdt, acc, dlogits_of):
    """(dh, dW) of a loss over ``logits = W (h / divisor)``: each chunk's logits recomputed, turned into the
    gradient of the loss in them by ``dlogits_of(start, logits)``, and sent back through the head."""
    dh = torch.empty_like(h) if needs[0] else None
    dw = torch.zeros(weight.shape, device=weight.device, dtype=acc) if needs[1] else None
    for a in range(0, h.shape[0], chunk):
        hc = h[a:a + chunk]
        dz = dlogits_of(a, _chunk_logits(hc, weight, divisor, cdt).to(acc)).to(cdt)
        if dh is not None:
            dh[a:a + chunk] = ((dz @ weight.to(cdt)).to(acc) / divisor).to(h.dtype)
        if dw is not None:
            dw += (dz.t() @ (hc / divisor).to(cdt)).to(acc)
    return dh, (dw.to(weight.dtype) if dw is not None else None)


class _CrossEntropy:
    """Per-token terms of the cross-entropy of logits ``z`` against class ids ``t``."""

    @staticmethod
    def loss(z, lse, t):  # log-sum-exp minus the target's logit
        return lse - z.gather(1, t[:, None])[:, 0]

    @staticmethod
    def dlogits(z, lse, t):  # softmax - one-hot(target)
        p = torch.exp(z - lse[:, None])
        p[torch.arange(p.shape[0], device=p.device), t] -= 1.0
        return p


class _KLFromTeacher:
    """Per-token terms of KL(softmax(teacher logits ``t``) || softmax(z)), temperature 1."""

    @staticmethod
    def loss(z, lse, t):  # sum_v p_t (log p_t - z) + lse(z)
        log_t = torch.log_softmax(t.to(z.dtype), dim=-1)
        return (log_t.exp() * (log_t - z)).sum(-1) + lse

    @staticmethod
    def dlogits(z, lse, t):  # softmax(student) - softmax(teacher)
        return torch.exp(z - lse[:, None]) - torch.softmax(t.to(z.dtype), dim=-1)


class _ChunkedHeadLoss(torch.autograd.Function):
    """``sum_i w_i * terms.loss(z_i, lse_i, target_i)`` over ``z = W (h / divisor)``, chunk by chunk, with
    ``terms`` one of the classes above; the gradient in the logits is ``terms.dlogits`` times the weight."""

    @staticmethod
    def forward(ctx, h, weight, target, token_weights, divisor, chunk, cdt, terms):
        acc = torch.float64 if cdt == torch.float64 else torch.float32
        tw = token_weights.to(acc)

        def loss_of(a, z, lse_c):
            return terms.loss(z, lse_c, target[a:a + chunk]) * tw[a:a + chunk]

        total, lse = _head_forward(h, weight, divisor, chunk, cdt, acc, loss_of)
        ctx.save_for_backward(h, weight, target, tw, lse)
        ctx.args = (divisor, chunk, cdt, terms)
        return total

    @staticmethod
    def backward(ctx, grad):
        h, weight, target, tw, lse = ctx.saved_tensors
        divisor, chunk, cdt, terms = ctx.args

        def dlogits_of(a, z):
            return terms.dlogits(z, lse[a:a + chunk], target[a:a + chunk]) * (tw[a:a + chunk] * grad)[:, None]

        dh, dw = _head_backward(ctx.needs_input_grad, h, weight, divisor, chunk, cdt, lse.dtype, dlogits_of)
        return dh, dw, None, None, None, None, None, None


def _compute_dtype(h, chunk, compute_dtype):
    """The head's matmul dtype: as given, else autocast's when it is on for h's device, else h's."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if compute_dtype is not None:
        return compute_dtype
    dev = h.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype


def chunked_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 token_weights: torch.Tensor | None = None, divisor: float = 1.0,
                                 chunk: int = 8192, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``sum_i w_i * CE(softmax(W (h_i / divisor)), t_i)`` over tokens with ``t_i != -100``.

    ``h`` ``[N, hidden]``, ``weight`` ``[vocab, hidden]``, ``targets`` ``[N]``, ``token_weights`` ``[N]`` or
    None (all 1). ``compute_dtype``: the logits' matmul dtype (default: autocast's when it is on for h's
    device, else h's). Differentiable in ``h`` and ``weight``; memory O(chunk x vocab) beyond the inputs."""
    if h.dim() != 2 or targets.shape != h.shape[:1]:
        raise ValueError(f"h must be [N, hidden] and targets [N]; got {tuple(h.shape)} and {tuple(targets.shape)}")
    if token_weights is not None and token_weights.shape != targets.shape:
        raise ValueError(f"token_weights must be [N]={tuple(targets.shape)}, got {tuple(token_weights.shape)}")
    compute_dtype = _compute_dtype(h, chunk, compute_dtype)
    valid = targets != IGNORE
    acc = torch.float64 if compute_dtype == torch.float64 else torch.float32
    tw = valid.to(acc) if token_weights is None else token_weights.to(acc) * valid
    return _ChunkedHeadLoss.apply(h, weight, targets.clamp_min(0), tw, float(divisor), int(chunk), compute_dtype,
                                  _CrossEntropy)


def chunked_linear_kl(h: torch.Tensor, weight: torch.Tensor, teacher_logits: torch.Tensor,
                      token_weights: torch.Tensor | None = None, divisor: float = 1.0, chunk: int = 8192,
                      compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``sum_i w_i * KL(softmax(teacher_i) || softmax(W (h_i / divisor)))`` over the full vocabulary (temperature
    1), the student's logits computed chunk by chunk as in :func:`chunked_linear_cross_entropy`; the teacher's
    logits ``[N, vocab]`` are an input (no gradient). ``token_weights`` ``[N]`` (e.g. a 0/1 mask of real
    tokens) or None (all 1)."""
    if h.dim() != 2 or teacher_logits.shape[:1] != h.shape[:1] or teacher_logits.shape[1] != weight.shape[0]:
        raise ValueError(f"h must be [N, hidden] and teacher_logits [N, vocab={weight.shape[0]}]; got "
                         f"{tuple(h.shape)} and {tuple(teacher_logits.shape)}")
    if token_weights is not None and token_weights.shape != h.shape[:1]:
        raise ValueError(f"token_weights must be [N]={tuple(h.shape[:1])}, got {tuple(token_weights.shape)}")
    compute_dtype = _compute_dtype(h, chunk, compute_dtype)
    if token_weights is None:
        token_weights = torch.ones(h.shape[0], device=h.device)
    return _ChunkedHeadLoss.apply(h, weight, teacher_logits.detach(), token_weights, float(divisor), int(chunk),
                                  compute_dtype, _KLFromTeacher)
