"""InfLLM-V2 sparse attention on GPU through Triton: the whole op of one sequence, and a varlen batch.

Same contract as :func:`sala.ops.infllmv2_reference.infllmv2_attention` (the oracle): q ``[Tq, Hq, D]``,
k/v ``[Tk, Hk, D]``, queries bottom-right aligned, optional precomputed compressed keys ``k1``/``k2``
(decode cache), ``decode=True`` for one query with every compressed chunk visible.

Pipeline: stage 1 + pooling + forced blocks + top-k per query chunk (:mod:`.infllmv2_triton_select`; the
chunk is sized so the int64 block keys stay under ``key_budget`` elements, so memory is O(chunk x blocks),
never O(T^2)), then stage 2 over all rows (:mod:`.infllmv2_triton_attn`), differentiable in q, k, v.
The selection ``[Hk, Tq, 96]`` int32 is the only per-row intermediate kept: O(T x selected).
"""

from __future__ import annotations

import warnings

import torch
import triton

from . import infllmv2_reference as _ref
from .infllmv2_triton_attn import block_sparse_attention_triton
from .infllmv2_triton_decode import decode_select_triton
from .infllmv2_triton_topk import MAX_ROW_BLOCKS
from .infllmv2_triton_select import select_blocks_chunk

__all__ = ["infllmv2_attention_triton", "select_blocks_triton", "infllmv2_varlen_triton", "FORCED_SPLIT",
           "DECODE_FUSED"]

# Stage 2 computes the forced blocks (shared by the rows of a query block) in a separate multi-row pass:
# on for forward and backward dq unless the bench measured it slower on the card.
FORCED_SPLIT = {"fwd": True, "bwd": True}

# One-row decode through the five-launch path of :mod:`.infllmv2_triton_decode` (False: the general path,
# torch.topk on int64 keys; the bench times both).
DECODE_FUSED = True


def _disable_fused_decode(err: Exception) -> None:
    global DECODE_FUSED
    DECODE_FUSED = False
    warnings.warn(f"InfLLM-V2 fused decode selection failed to compile, using the general path: {err!r:.300}")


def _nonempty(x: torch.Tensor) -> torch.Tensor:
    """A 1-row zero stand-in for an empty compressed-key tensor (the kernels mask every load of it)."""
    return x if x.shape[0] else x.new_zeros(1, *x.shape[1:])


def select_blocks_triton(q, k1, k2, params, scale, total_len, decode=False, key_budget=1 << 26):
    """Block selection for every query row: int32 ``[Hk, Tq, min(n_select, n_blocks)]``."""
    Tq = q.shape[0]
    Hk = k1.shape[1]
    bs = params.block_size
    n_blocks = -(-total_len // bs)
    width = min(params.n_select, n_blocks)
    q_pos0 = total_len - Tq
    n1, n2 = k1.shape[0], k2.shape[0]
    k1e, k2e = _nonempty(k1), _nonempty(k2)
    q = q.detach()
    if decode and DECODE_FUSED and Tq == 1 and n_blocks <= MAX_ROW_BLOCKS:
        try:
            return decode_select_triton(q, k1e, k2e, params, scale, total_len, n1=n1, n2=n2)
        except (triton.CompilationError, triton.OutOfResources) as err:  # rejected on this card: general path
            _disable_fused_decode(err)
    if decode:
        lse_splits = max(1, n2 // 512)
        return _select(q, k1e, k2e, n1, n2, scale, params, q_pos0, total_len, True, lse_splits)
    rows = max(bs, (key_budget // max(1, Hk * n_blocks)) // bs * bs)
    if rows >= Tq:
        return _select(q, k1e, k2e, n1, n2, scale, params, q_pos0, total_len, False, 1)
    idx = torch.empty(Hk, Tq, width, device=q.device, dtype=torch.int32)
    for r0 in range(0, Tq, rows):
        r1 = min(Tq, r0 + rows)
        idx[:, r0:r1] = _select(q[r0:r1], k1e, k2e, n1, n2, scale, params, q_pos0 + r0, total_len, False, 1)
    return idx


def _select(q, k1, k2, n1, n2, scale, params, q_pos0, total_len, decode, lse_splits):
    return select_blocks_chunk(q, k1, k2, scale, params, q_pos0,
                               total_len, decode=decode, lse_splits=lse_splits, n1=n1, n2=n2)


def infllmv2_attention_triton(q, k, v, params, scale, k1=None, k2=None, decode=False, key_budget=1 << 26):
    """InfLLM-V2 attention of one sequence on GPU (see module doc); returns ``[Tq, Hq, D]`` in q's dtype."""
    _ref.check_sparse_inputs(q, k, decode)
    Tq, Tk = q.shape[0], k.shape[0]
    if k1 is None:
        k1 = _ref.compress_keys(k.detach(), params.kernel_size, params.kernel_stride)
    if k2 is None:
        k2 = _ref.compress_keys(k.detach(), params.kernel_size2, params.kernel_stride2)
    idx = select_blocks_triton(q, k1, k2, params, scale, Tk, decode=decode, key_budget=key_budget)
    splits = 16 if decode else 1
    # every forced block is selected when topk > init_blocks: stage 2 then shares them across rows
    forced = (params.init_blocks, params.local_blocks) if params.topk > params.init_blocks else None
    return block_sparse_attention_triton(q, k, v, idx, Tk - Tq, params.block_size, scale, splits=splits,
                                         forced=forced if FORCED_SPLIT["fwd"] else None,
                                         forced_bwd=forced if FORCED_SPLIT["bwd"] else None)


def infllmv2_varlen_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, params, scale, decode=False):
    """Packed batch: q ``[sum Tq_i, Hq, D]``, k/v ``[sum Tk_i, Hk, D]`` with int cu_seqlens; one launch
    sequence per sequence (each sequence's selection depends on its own length)."""
    out = torch.empty_like(q)
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    pieces = []
    for i in range(len(cq) - 1):
        o = infllmv2_attention_triton(q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]], params, scale,
                                      decode=decode)
        pieces.append(o)
    if torch.is_grad_enabled() and q.requires_grad:
        return torch.cat(pieces, 0)
    for i, o in enumerate(pieces):
        out[cq[i]:cq[i + 1]] = o
    return out
