"""InfLLM-V2 decode step (one query row, every compressed chunk visible) in five kernel launches.

The general path (:func:`.infllmv2_triton.select_blocks_triton` + stage 2) spends a decode step in about
20 launches, most of them small PyTorch ops around ``torch.topk`` on int64 keys (whose single-row kernel
alone took 0.15 ms at 1M on the H100). Here:

1. ``_k2_lse_kernel``: K2 log-sum-exp partials, the K2 range split over programs;
2. ``_block_key_kernel`` with ``FLOAT_OUT``: pooled float32 block scores (forced blocks +inf);
3. ``_row_topk_kernel``: per KV head, the ``n_select`` best blocks of the row held in registers, found by
   a 32-step bisection on the scores' order-preserving int32 image, ties to the lower block index (the
   reference's rule), written already sorted ascending with -1 after the query's block and as padding;
4. ``_fwd_kernel`` split over the selected blocks (flash-decoding) and ``_merge_splits_kernel``.

No host synchronisation and no PyTorch kernels. Rows wider than ``MAX_ROW_BLOCKS`` blocks (contexts over
2M tokens at block 64) fall back to the general path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .infllmv2_triton_attn import sparse_attn_forward
from .infllmv2_triton_select import block_keys, k2_lse, visibility_offsets

__all__ = ["decode_select_triton", "decode_attention_triton", "row_topk", "MAX_ROW_BLOCKS"]

MAX_ROW_BLOCKS = 1 << 15
DECODE_SPLITS = 16
ROW_TOPK_LENGTH_ARGS = ["n_cols", "n_take", "qb", "width", "s_sh", "s_ih"]


@triton.jit(do_not_specialize=ROW_TOPK_LENGTH_ARGS)
def _row_topk_kernel(SC, IDX, n_cols, n_take, qb, width, s_sh, s_ih, NP: tl.constexpr, WP: tl.constexpr):
    """Top ``n_take`` of the ``n_cols`` float32 scores of row ``program_id`` (ties: lower index first),
    as ascending block indices, blocks after ``qb`` as -1, -1 padding up to ``width``."""
    hk = tl.program_id(0)
    b = tl.arange(0, NP)
    live = b < n_cols
    x = tl.load(SC + hk * s_sh + b, mask=live, other=float("-inf"))
    bits = x.to(tl.int32, bitcast=True)
    u = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # int32 order == float order (-0.0 just below +0.0)
    u = tl.where(live, u, tl.full([NP], -2147483648, tl.int32))  # padding: below every real score (-inf maps above INT32_MIN)
    lo = tl.full([], -2147483648, tl.int64)
    hi = tl.full([], 2147483647, tl.int64)
    for _ in range(32):  # largest thr with count(u >= thr) >= n_take
        mid = (lo + hi + 1) >> 1
        cnt = tl.sum((u >= mid.to(tl.int32)).to(tl.int32), axis=0)
        ok = cnt >= n_take
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    thr = lo.to(tl.int32)
    gt = u > thr
    eq = (u == thr).to(tl.int32)
    need = n_take - tl.sum(gt.to(tl.int32), axis=0)
    sel = gt | ((eq > 0) & (tl.cumsum(eq, axis=0) - eq < need))
    pos = tl.cumsum(sel.to(tl.int32), axis=0) - 1
    tl.store(IDX + hk * s_ih + pos, tl.where(b <= qb, b, -1), mask=sel)
    w = tl.arange(0, WP)
    tl.store(IDX + hk * s_ih + w, tl.full([WP], -1, tl.int32), mask=(w >= n_take) & (w < width))


def row_topk(scores: torch.Tensor, n_select: int, width: int, q_block: int) -> torch.Tensor:
    """``scores`` float32 ``[Hk, n_cols]`` -> int32 ``[Hk, 1, width]``: the reference ``select_blocks``
    of one row (top ``n_select``, ties to the lower block, sorted, -1 after ``q_block`` and as padding)."""
    Hk, n_cols = scores.shape
    np_ = max(16, triton.next_power_of_2(n_cols))
    idx = torch.empty(Hk, 1, width, device=scores.device, dtype=torch.int32)
    _row_topk_kernel[(Hk,)](scores, idx, n_cols, min(n_select, n_cols), q_block, width,
                            scores.stride(0), idx.stride(0),
                            NP=np_, WP=max(16, triton.next_power_of_2(width)),
                            num_warps=max(4, min(32, np_ // 1024)))
    return idx


def decode_select_triton(q, k1, k2, params, scale, total_len, n1=None, n2=None):
    """Selection of one decode row (q ``[1, Hq, D]``, every chunk visible): int32 ``[Hk, 1, width]``,
    equal to the reference ``select_blocks`` (the bf16 rounding of the scores as in the general path)."""
    n1 = k1.shape[0] if n1 is None else n1
    n2 = k2.shape[0] if n2 is None else n2
    bs = params.block_size
    n_blocks = -(-total_len // bs)
    width = min(params.n_select, n_blocks)
    q_pos0 = total_len - 1
    qb = q_pos0 // bs
    n_cols = min(n_blocks, max(qb + 1, params.init_blocks))
    if n2 > 0:
        lse2 = k2_lse(q, k2, scale, q_pos0, visibility_offsets(total_len, n2, params.kernel_stride2, True),
                      params.kernel_stride2, splits=max(1, n2 // 512), n2=n2, combine=False, rows=1)
    else:
        lse2 = torch.full((1, 1, q.shape[1]), float("-inf"), device=q.device, dtype=torch.float32)
    sc = block_keys(q, k1, lse2, scale, q_pos0, visibility_offsets(total_len, n1, params.kernel_stride, True),
                    params, n_cols, n1=n1, rows=1, float_out=True)
    return row_topk(sc[:, 0], params.n_select, width, qb)


def decode_attention_triton(q, k, v, k1, k2, params, scale, n1=None, n2=None):
    """One decode step of one sequence: q ``[1, Hq, D]``, k/v ``[Tk, Hk, D]`` (the whole cache), k1/k2 the
    cached compressed keys (``n1``/``n2``: their real row counts when a 1-row stand-in replaces an empty one)."""
    Tk = k.shape[0]
    idx = decode_select_triton(q, k1, k2, params, scale, Tk, n1=n1, n2=n2)
    return sparse_attn_forward(q, k, v, idx, Tk - 1, params.block_size, scale, splits=DECODE_SPLITS)[0]
