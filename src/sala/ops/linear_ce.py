"""Cross-entropy of a linear head over chunks of tokens, never holding the full ``[tokens, vocab]`` logits.

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


def _chunk_logits(h, weight, divisor, cdt):
    """At least float32, as the model's logits (a float64 head keeps float64)."""
    out = F.linear((h / divisor).to(cdt), weight.to(cdt))
    return out if out.dtype == torch.float64 else out.float()


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, token_weights, divisor, chunk, cdt):
        acc = torch.float64 if cdt == torch.float64 else torch.float32
        valid = targets != IGNORE
        tw = valid.to(acc) if token_weights is None else token_weights.to(acc) * valid
        safe_t = targets.clamp_min(0)
        lse = torch.empty(h.shape[0], device=h.device, dtype=acc)
        total = torch.zeros((), device=h.device, dtype=acc)
        for a in range(0, h.shape[0], chunk):
            lf = _chunk_logits(h[a:a + chunk], weight, divisor, cdt)
            lse[a:a + chunk] = torch.logsumexp(lf, dim=-1)
            picked = lf.gather(1, safe_t[a:a + chunk, None])[:, 0]
            total = total + ((lse[a:a + chunk] - picked) * tw[a:a + chunk]).sum()
        ctx.save_for_backward(h, weight, safe_t, tw, lse)
        ctx.args = (divisor, chunk, cdt)
        return total

    @staticmethod
    def backward(ctx, grad):
        h, weight, safe_t, tw, lse = ctx.saved_tensors
        divisor, chunk, cdt = ctx.args
        dh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(weight.shape, device=weight.device, dtype=lse.dtype) if ctx.needs_input_grad[1] else None
        for a in range(0, h.shape[0], chunk):
            hc = h[a:a + chunk]
            lf = _chunk_logits(hc, weight, divisor, cdt)
            p = torch.exp(lf - lse[a:a + chunk, None])
            rows = torch.arange(p.shape[0], device=p.device)
            p[rows, safe_t[a:a + chunk]] -= 1.0
            dlogits = (p * (tw[a:a + chunk] * grad)[:, None]).to(cdt)
            if dh is not None:
                dh[a:a + chunk] = ((dlogits @ weight.to(cdt)).to(lse.dtype) / divisor).to(h.dtype)
            if dw is not None:
                dw += (dlogits.t() @ (hc / divisor).to(cdt)).to(lse.dtype)
        return dh, (dw.to(weight.dtype) if dw is not None else None), None, None, None, None, None


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
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if compute_dtype is None:
        dev = h.device.type
        compute_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    return _ChunkedLinearCE.apply(h, weight, targets, token_weights, float(divisor), int(chunk), compute_dtype)
