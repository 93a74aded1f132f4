"""Top-k block selection of whole rows in Triton: one program per (KV head, query row), no sort.

The row's float32 block scores (``block_keys(..., float_out=True)``: forced blocks +inf, future blocks
-inf) sit in registers; a 32-step bisection on their order-preserving int32 image finds the ``n_select``-th
largest score, the blocks above it and the first blocks (lowest indices) equal to it are taken, which is
the reference's tie rule (stable descending sort), and written already sorted ascending through a prefix
sum: blocks after the query's own block become -1, and -1 pads up to ``width`` -- the reference
``select_blocks`` output, with no PyTorch top-k, sort or mask kernels. Rows up to ``MAX_ROW_BLOCKS``
blocks (2M tokens at block 64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import infllmv2_triton_interp  # noqa: F401  (interpreter shim, no-op when compiled)

__all__ = ["row_topk", "MAX_ROW_BLOCKS"]

MAX_ROW_BLOCKS = 1 << 15
ROW_TOPK_LENGTH_ARGS = ["n_cols", "n_take", "q_pos0", "width", "s_sh", "s_sr", "s_ih", "s_ir"]


@triton.jit(do_not_specialize=ROW_TOPK_LENGTH_ARGS)
def _row_topk_kernel(SC, IDX, n_cols, n_take, q_pos0, block_size, width, s_sh, s_sr, s_ih, s_ir,
                     NP: tl.constexpr, WP: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)  # rows on grid axis 0 (axis 1 is limited to 65535)
    hk = tl.program_id(1)
    qb = (q_pos0 + r) // block_size
    b = tl.arange(0, NP)
    live = b < n_cols
    x = tl.load(SC + hk * s_sh + r * s_sr + b, mask=live, other=float("-inf"))
    bits = x.to(tl.int32, bitcast=True)
    u = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # int32 order == float order (-0.0 just below +0.0)
    u = tl.where(live, u, tl.full([NP], -2147483648, tl.int32))  # padding: below every score, -inf included
    lo = tl.full([], -2147483648, tl.int64)
    hi = tl.full([], 2147483647, tl.int64)
    for _ in range(32):  # the largest thr with count(u >= thr) >= n_take
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
    base = IDX + hk * s_ih + r * s_ir
    tl.store(base + pos, tl.where(b <= qb, b, -1), mask=sel)
    w = tl.arange(0, WP)
    tl.store(base + w, tl.full([WP], -1, tl.int32), mask=(w >= n_take) & (w < width))


def row_topk(scores: torch.Tensor, n_select: int, width: int, q_pos0: int, block_size: int) -> torch.Tensor:
    """``scores`` float32 ``[Hk, R, n_cols]`` of rows at positions ``q_pos0 + r`` -> int32 ``[Hk, R, width]``,
    the reference ``select_blocks`` (see module doc)."""
    Hk, R, n_cols = scores.shape
    if n_cols > MAX_ROW_BLOCKS:
        raise ValueError(f"row_topk: {n_cols} blocks per row > {MAX_ROW_BLOCKS}")
    np_ = max(16, triton.next_power_of_2(n_cols))
    idx = torch.empty(Hk, R, width, device=scores.device, dtype=torch.int32)
    _row_topk_kernel[(R, Hk)](scores, idx, n_cols, min(n_select, n_cols), q_pos0, block_size, width,
                              scores.stride(0), scores.stride(1), idx.stride(0), idx.stride(1),
                              NP=np_, WP=max(16, triton.next_power_of_2(width)),
                              num_warps=max(4, min(32, np_ // 1024)))
    return idx
