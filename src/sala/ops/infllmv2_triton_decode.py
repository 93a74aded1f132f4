"""InfLLM-V2 decode step (one query row, every compressed chunk visible) in five kernel launches.

The general path (:func:`.infllmv2_triton.select_blocks_triton` + stage 2) spends a decode step in about
20 launches, most of them small PyTorch ops around ``torch.topk`` on int64 keys (whose single-row kernel
alone took 0.15 ms at 1M on the H100). Here:

1. ``_k2_lse_kernel``: K2 log-sum-exp partials, the K2 range split over programs;
2. ``_block_key_kernel`` with ``FLOAT_OUT``: pooled float32 block scores (forced blocks +inf);
3. ``row_topk`` (:mod:`.infllmv2_triton_topk`): the ``n_select`` best blocks per KV head, sorted, with the
   reference's tie rule;
4. ``_fwd_kernel`` split over the selected blocks (flash-decoding) and ``_merge_splits_kernel``.

No host synchronisation and no PyTorch kernels. Rows wider than ``MAX_ROW_BLOCKS`` blocks (contexts over
2M tokens at block 64) fall back to the general path.
"""

from __future__ import annotations

import torch
from .infllmv2_triton_attn import sparse_attn_forward
from .infllmv2_triton_select import block_keys, k2_lse, visibility_offsets
from .infllmv2_triton_topk import MAX_ROW_BLOCKS, row_topk

__all__ = ["decode_select_triton", "decode_attention_triton", "MAX_ROW_BLOCKS"]

DECODE_SPLITS = 16
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
    return row_topk(sc, params.n_select, width, q_pos0, bs)


def decode_attention_triton(q, k, v, k1, k2, params, scale, n1=None, n2=None):
    """One decode step of one sequence: q ``[1, Hq, D]``, k/v ``[Tk, Hk, D]`` (the whole cache), k1/k2 the
    cached compressed keys (``n1``/``n2``: their real row counts when a 1-row stand-in replaces an empty one)."""
    Tk = k.shape[0]
    idx = decode_select_triton(q, k1, k2, params, scale, Tk, n1=n1, n2=n2)
    return sparse_attn_forward(q, k, v, idx, Tk - 1, params.block_size, scale, splits=DECODE_SPLITS)[0]
