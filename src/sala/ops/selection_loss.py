"""Selection alignment: a training loss that teaches InfLLM-V2's block scores where attention goes.

InfLLM-V2 picks blocks by a parameter-free score (stage 1: the query against mean-pooled keys, summed over a
KV group, max-pooled to blocks) computed without gradient, so the ranking only improves through what the
attention itself learns from the blocks it was given. A converted model with a short training budget ranks
the needle's block low in exactly the heads that retrieve it (``docs/results/convert_gpu/runs.md``,
2026-11-29f) although its token-level attention finds it.

This loss gives the ranking a direct signal, as DeepSeek-V3.2's sparse attention trains its indexer: for the
last ``rows`` queries of a sequence, the KL divergence from the dense attention's mass per block (the target,
averaged over the group's heads, no gradient) to the block scores stage 1 would rank them by (a distribution
over the same blocks, with gradient into q and k through the pooled keys). Only the blocks the top-k really
chooses among take part: the forced init and local blocks are left out and both sides renormalised over the
rest. Each (row, group) term is weighted by the largest attention mass one of those blocks holds, so rows that
look something up far away (an answer reading its needle) count, and rows that attend locally or diffusely
(most text: much mass far away, but spread thin) barely do. On a toy needle task trained densely, the loss
closed the sparse path's accuracy gap (0.66 -> 0.78 with dense 0.79-0.81; 0.60 -> 1.00 with dense 1.00;
``bench/results/selection_toy.md``); weighting by the far mass as a whole did not (the diffuse rows taught
flat scores).

Not part of the release's semantics: the model's forward is unchanged; this is an extra training term
(``selection_weight`` in a recipe stage). Memory: the target is built in row chunks, never Tq x Tk at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .infllmv2_reference import NEG_INF, SparseParams, block_scores, compress_keys, visible_counts

__all__ = ["selection_alignment_loss", "selection_alignment_loss_batch", "candidate_mask", "first_candidate_row"]


def candidate_mask(q_blocks: torch.Tensor, n_blocks: int, params: SparseParams) -> torch.Tensor:
    """``[R, n_blocks]``: the blocks top-k chooses among for each query block (not init, not local, not
    after the query's block); the complement of the blocks ``block_scores`` forces or cannot select."""
    b = torch.arange(n_blocks, device=q_blocks.device)[None, :]
    return (b >= params.init_blocks) & (b < q_blocks[:, None] - params.local_blocks)


def first_candidate_row(params: SparseParams) -> int:
    """The first query position whose row of ``candidate_mask`` is not empty: its block must lie past the
    init blocks, the local window and one block more."""
    return (params.init_blocks + params.local_blocks + 1) * params.block_size


def _attention_mass(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, scale: float, block: int,
                    chunk_elems: int) -> torch.Tensor:
    """Dense causal attention mass per key block ``[Hk, R, n_blocks]`` (mean over each group's heads) of the
    query rows ``q [R, Hq, D]`` at positions ``rows`` over keys ``k [T, Hk, D]``; float32, no gradient."""
    R, Hq, D = q.shape
    T, Hk = k.shape[0], k.shape[1]
    G = Hq // Hk
    n_blocks = -(-T // block)
    kf = k.float()
    out = torch.empty(Hk, R, n_blocks, device=q.device)
    step = max(1, chunk_elems // (Hq * T))
    for r0 in range(0, R, step):
        r1 = min(R, r0 + step)
        qf = q[r0:r1].float().view(r1 - r0, Hk, G, D)
        s = torch.einsum("rkgd,tkd->kgrt", qf, kf) * scale  # [Hk, G, r, T]
        s = s.masked_fill(torch.arange(T, device=q.device)[None, :] > rows[r0:r1, None], NEG_INF)
        p = torch.softmax(s, dim=-1)
        p = F.pad(p, (0, n_blocks * block - T)).view(Hk, G, r1 - r0, n_blocks, block).sum(-1)
        out[:, r0:r1] = p.mean(dim=1)
    return out


def _log_block_scores(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, scale: float, params: SparseParams,
                      n_blocks: int) -> torch.Tensor:
    """log of the stage-1 block scores ``[Hk, R, n_blocks]`` (the release's ranking: per chunk, the group sum
    of exp(q.K1 - LSE over the visible K2); per block, the max over its overlapping chunks), in float32 with
    gradient into q and k. Invisible chunks are -inf; the forced blocks +inf, as ``block_scores`` makes them."""
    R, Hq, D = q.shape
    T, Hk = k.shape[0], k.shape[1]
    G = Hq // Hk
    k1 = compress_keys(k, params.kernel_size, params.kernel_stride).float()
    k2 = compress_keys(k, params.kernel_size2, params.kernel_stride2).float()
    n1, n2 = k1.shape[0], k2.shape[0]
    qf = q.float().view(R, Hk, G, D)
    s1 = torch.einsum("rkgd,nkd->kgrn", qf, k1) * scale
    s2 = torch.einsum("rkgd,nkd->kgrn", qf, k2) * scale
    vis1 = visible_counts(rows, T, n1, params.kernel_stride)
    vis2 = visible_counts(rows, T, n2, params.kernel_stride2)
    s2 = s2.masked_fill(torch.arange(n2, device=q.device)[None, :] >= vis2[:, None], NEG_INF)
    log_p = s1 - torch.logsumexp(s2, dim=-1, keepdim=True)
    log_p = log_p.masked_fill(torch.arange(n1, device=q.device)[None, :] >= vis1[:, None], NEG_INF)
    log_chunk = torch.logsumexp(log_p, dim=1)  # group sum over the G heads -> [Hk, R, n1]
    # the release's max-pooling over each block's chunks, on logs (log is monotone, its pad -inf is log 0);
    # the init and local blocks it forces to +inf are not candidates, so the caller masks them out anyway
    return block_scores(log_chunk, rows // params.block_size, n_blocks, params)


def selection_alignment_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    params: SparseParams,
    scale: float,
    rows: int = 128,
    chunk_elems: int = 1 << 26,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of w * KL, sum of w)`` over the (query row, KV group) pairs of the last ``rows`` positions of
    one sequence (q ``[T, Hq, D]``, k ``[T, Hk, D]``, a prefill), w = the largest attention mass of one
    candidate block. KL(target || predicted) over the candidate blocks: target = dense attention mass per
    block, predicted = the normalised stage-1 block scores. Both zero (a tensor with gradient) when no row
    has candidate blocks (sequences shorter than the init blocks, the local window and one block more)."""
    T = q.shape[0]
    if k.shape[0] != T:
        raise ValueError(f"selection_alignment_loss needs a prefill (as many queries as keys), got {T} and {k.shape[0]}")
    if rows <= 0:
        raise ValueError(f"rows must be positive, got {rows}")
    bs = params.block_size
    n_blocks = -(-T // bs)
    # a query has a block to choose among once its block is past the init and local blocks: rows from here on
    # (decided on the host: a device-side test would stop the step's queue once per sequence and layer)
    first = max(0, T - rows, first_candidate_row(params))
    if first >= T:
        zero = q.sum() * 0.0
        return zero, zero.detach()
    pos = torch.arange(first, T, device=q.device)
    cand = candidate_mask(pos // bs, n_blocks, params)
    with torch.autocast(device_type=q.device.type, enabled=False):  # float32 math even inside a bf16 step
        return _weighted_kl(q, k, pos, cand, params, scale, n_blocks, chunk_elems)


def selection_alignment_loss_batch(q: torch.Tensor, k: torch.Tensor, params: SparseParams, scale: float,
                                   rows: int = 128, chunk_elems: int = 1 << 26) -> tuple[torch.Tensor, torch.Tensor]:
    """The terms of ``selection_alignment_loss`` summed over a batch of equal-length sequences (q ``[B, T, Hq,
    D]``, k ``[B, T, Hk, D]``) in one call: the batch is folded into the heads (sequence-major, so head h of
    the fold still reads KV head h // group), which every step of the loss keeps apart. A training step with B
    sequences then launches one set of small kernels per layer instead of B."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2]:
        raise ValueError(f"expected q [B, T, Hq, D] and k [B, T, Hk, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    B, T = q.shape[:2]
    fold = lambda x: x.transpose(0, 1).reshape(T, B * x.shape[2], x.shape[3])  # noqa: E731
    return selection_alignment_loss(fold(q), fold(k), params, scale, rows, chunk_elems)


def _weighted_kl(q, k, pos, cand, params, scale, n_blocks, chunk_elems):
    bs = params.block_size
    qr = q[pos]
    with torch.no_grad():
        mass = _attention_mass(qr.detach(), k.detach(), pos, scale, bs, chunk_elems)  # [Hk, R, nb]
        mass = mass.masked_fill(~cand[None], 0.0)
        far = mass.sum(dim=-1)  # [Hk, R]
        target = mass / far.clamp_min(1e-30)[..., None]
        weight = mass.amax(dim=-1)  # the peak: a lookup, not a spread
    log_score = _log_block_scores(qr, k, pos, scale, params, n_blocks).masked_fill(~cand[None], NEG_INF)
    log_pred = log_score - torch.logsumexp(log_score, dim=-1, keepdim=True)
    log_target = torch.log(target.clamp_min(1e-30))
    kl = torch.where(target > 0, target * (log_target - log_pred), torch.zeros_like(target)).sum(dim=-1)
    return (weight * kl).sum(), weight.sum()
