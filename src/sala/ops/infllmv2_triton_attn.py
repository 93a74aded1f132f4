"""InfLLM-V2 stage 2 in Triton: block-sparse attention over the selected blocks, forward and backward.

Layout of one sequence: q ``[R, Hq, D]`` (rows at absolute positions ``q_pos0 + r``), k/v ``[Tk, Hk, D]``,
``topk_idx`` int32 ``[Hk, R, S]`` (-1 = unused). Keys of a selected block b are ``b*bs .. b*bs+bs-1``, and
a key is visible when its position is <= the query's (causal inside the query's own block).

* forward: one program per (query row, KV head); the G query heads of the group are the rows of the dot
  (the selection is shared by the group), online softmax over the S selected blocks. ``splits > 1``
  divides the blocks over programs (decode) and merges the partial results by their LSE. With ``forced``
  (prefill), the forced blocks (initial + local window) of several rows go first in a shared pass (the
  window in unmasked tiles where every row sees it), then the per-row pass visits the other selected blocks
  in key ranges (REST_KEY_RANGES), the partial result carried in a float32 scratch.
* backward dk/dv: one program per (key block, KV head) over the rows that selected the block (an inverted
  index built with a sort; the busiest blocks start first), so dk/dv accumulate in registers without atomics;
  by default the same programs add each row's dq share with float32 atomics (DQ_ATOMIC).
* backward dq otherwise: the forward's loop per row with the saved LSE and delta = rowsum(dO * O).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import infllmv2_triton_select as _sel
from .infllmv2_triton_select import LOG2E, _precision, group_pad, mma, pad_dim

# Launch settings of the per-row kernels (forward, dq); the bench picks them on the card ("tuning").
PER_ROW_CFG = {"num_warps": 4, "num_stages": 2}

# Length-like integer arguments of each kernel: not specialized, so a new length never recompiles
# (see K2_LSE_LENGTH_ARGS in infllmv2_triton_select).
LENGTH_ARGS = {
    "_fwd_kernel": ["q_pos0", "n_keys", "n_sel", "sel_per_split", "s_ih", "s_ir", "s_ps", "s_ls", "blk_lo", "blk_hi"],
    "_fwd_forced_kernel": ["q_pos0", "n_rows", "n_keys"],
    "_bwd_dq_kernel": ["q_pos0", "n_keys", "n_sel", "s_ih", "s_ir"],
    "_bwd_dq_forced_kernel": ["q_pos0", "n_rows", "n_keys"],
    "_bwd_dkdv_kernel": ["q_pos0", "n_keys", "n_blocks"],
    "_merge_splits_kernel": ["n_splits", "s_ps", "s_ls"],
    "_fwd_union_kernel": ["q_pos0", "n_rows", "n_keys", "n_sel", "s_ih", "s_ir"],
    "_bwd_dq_union_kernel": ["q_pos0", "n_rows", "n_keys", "n_sel", "s_ih", "s_ir"],
}

# Rows per program of the union kernels (0: off, the per-row kernels visit the selected blocks). With RB rows
# a program walks the union of their selections in block order, loading each block once for every row that
# chose it: the K/V traffic falls by the overlap of neighbouring rows' selections (a trained model's rows
# share most blocks; random inputs share none, and then the union costs what the per-row kernels cost).
# Dot rows are RB x the group padded to a power of two (see _multi_row). Same blocks in the same order as the
# per-row kernels. Not yet timed on a GPU: off unless SALA_INFLLMV2_UNION_LANES says how many lanes (e.g. 16).
UNION_LANES = int(os.environ.get("SALA_INFLLMV2_UNION_LANES", "0"))

# dk/dv with the score products as [lanes, keys] on 128 lanes (8 rows of the release's 16-head group). The former
# [keys, lanes] form on 64 lanes laid its [64 keys, 64 lanes] products over 8 warps along the keys, two warpgroups
# computing the same 64 rows (offline: 255 registers, 8 B spilled; the lanes form 248, none), and was slower in
# every H200 run: forward+backward at 128K 409.2 / 408.8 / 410.6 against 331.5 / 331.0 / 332.7 ms (87effea,
# f08c018, 12a4455). Removed after the last.

# dq inside the dk/dv kernel: each key block's program also computes its rows' share of dq
# (ds k, the product its dk already needs ds for) and adds it atomically into a float32 [R, Hq, D] sum, so the
# two dq passes (forced blocks, then the rest per row: each gathers the K/V of every selected block again) do
# not run: 8 KB of float32 atomics per (row, block) pair instead of 32 KB of K/V gathered. dq's float32 sums then
# add in an order that varies from run to run, as FlashAttention-2's backward does by default. Offline sm_90: 255
# registers, 68 B spilled, 226 KB, vectorized (v4) atomics. Measured on the H200 (12a4455): forward+backward at
# 128K 305.2 against 332.7 ms, stage 2's backward 198.5 against 222.7, gradients within 1.7e-4 of the dq passes';
# with the dk/dv programs busiest first 280.5 against 308.2 (55224ce). The default since; SALA_INFLLMV2_DQ_ATOMIC=0
# keeps dq's sums in a fixed order (the two dq passes). Starting the sums from the forced blocks' share (the
# forced-block dq kernel, 8 rows per program) so that dk/dv adds only the others' (a third fewer atomics) was slower:
# 296.8 against 280.5 ms (55224ce; 148 B spilled against 60), removed.
DQ_ATOMIC = os.environ.get("SALA_INFLLMV2_DQ_ATOMIC", "1") not in ("", "0")


# Launch order of the dk/dv programs: the (KV head, block) pairs with the most rows first (longest job first).
# In plain block order the initial block of the second KV head, chosen by every row (22x the mean pair's rows at
# 128K: 131072 against 6000), starts about half way through the launch, when the others have half their work
# left, and runs on alone past their end. Measured on the H200 (55224ce): forward+backward at 128K 280.5 against
# 295.2 ms in block order, stage 2's backward 175.1 against 187.2. SALA_INFLLMV2_DKDV_BUSIEST_FIRST=0: block order.
DKDV_BUSIEST_FIRST = os.environ.get("SALA_INFLLMV2_DKDV_BUSIEST_FIRST", "1") not in ("", "0")

# Key ranges of the forward's per-row rest pass, one launch each over all rows, the partial result carried in
# the forced pass's float32 scratch. On random inputs the rows in flight (thousands) select blocks all over the
# sequence, so the K/V they read (one KV head's, 67 MB at 128K) exceeds the 50 MB L2; a range shrinks it to its
# share, at the cost of a read and a write of the float32 partials per extra range. Measured on the H200
# (2454499), stage 2 / forward in ms for 1, 2, 4 ranges: 128K 77.3 / 105.0, 74.9 / 103.3, 78.1 / 105.4; 256K
# 176.1 / 284.7, 173.4 / 278.5, 166.0 / 270.4. Hence the rule (_rest_key_ranges): one range per 32 MiB of a KV
# head's K and V, at most 4. SALA_INFLLMV2_REST_KEY_RANGES sets a count (0: the rule).
REST_KEY_RANGES = int(os.environ.get("SALA_INFLLMV2_REST_KEY_RANGES", "0"))
REST_RANGE_BYTES = 32 << 20

# The forward's forced-block pass over the local window in unmasked tiles of this many blocks where every row of
# the program sees the keys whole (0: block by block, each masked; see _fwd_forced_kernel). The window is one
# contiguous range of 33 blocks at the release's settings. Measured on the H200 (18577cf): the pass 11.5 against
# 15.2 ms, the forward at 128K 105.0 against 107.3 ms, at 256K 280.8 against 287.9, forward+backward at 128K
# 276.5 against 279.6; outputs within 9e-4 of the per-block pass'. 16-bit inputs only (see _forced_win_keys).
# SALA_INFLLMV2_FORCED_WIN_BLOCKS sets it (0: off).
FORCED_WIN_BN = int(os.environ.get("SALA_INFLLMV2_FORCED_WIN_BLOCKS", "2"))

__all__ = ["sparse_attn_forward", "sparse_attn_backward", "BlockSparseAttention", "block_sparse_attention_triton"]


@triton.jit
def _kv_tile_t(X, kpos, km, hk, s_xt, s_xh, d, dm):
    """Key positions kpos of KV head hk as a [BD, BS] tile (transposed: the right operand of q @ k^T); 0 where
    masked."""
    return tl.load(X + kpos[None, :] * s_xt + hk * s_xh + d[:, None], mask=km[None, :] & dm[:, None], other=0.0)


@triton.jit
def _kv_tile(X, kpos, km, hk, s_xt, s_xh, d, dm):
    """Key positions kpos of KV head hk as a [BS, BD] tile; 0 where masked."""
    return tl.load(X + kpos[:, None] * s_xt + hk * s_xh + d[None, :], mask=km[:, None] & dm[None, :], other=0.0)


@triton.jit
def _softmax_step(m_i, l_i, acc, sc, vb, PREC: tl.constexpr):
    """One block of the online softmax (log2 units): running max, normaliser and the p @ V accumulation;
    rows whose scores are all -inf so far stay at 0."""
    m_new = tl.maximum(m_i, tl.max(sc, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(sc - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + mma(p.to(vb.dtype), vb, PREC)


@triton.jit
def _softmax_finish(m_i, l_i, acc):
    """(output, log2-sum-exp) of an online softmax; rows that saw nothing give 0 and -inf."""
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    return acc / l_safe[:, None], tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))


@triton.jit(do_not_specialize=LENGTH_ARGS["_fwd_kernel"])
def _fwd_kernel(
    Q, K, V, IDX, O, LSE, OP, LP,
    q_pos0, n_keys, n_sel, sel_per_split, qk_scale2,
    s_qr, s_qh, s_kt, s_kh, s_vt, s_vh, s_ih, s_ir, s_or, s_oh, s_ps, s_pr, s_ph, s_ls, s_lr,
    init_blocks, local_blocks, blk_lo, blk_hi,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
    PREC: tl.constexpr, SPLIT: tl.constexpr, REST: tl.constexpr, SP2: tl.constexpr,
):
    """One query row (its group's G heads) over its selected blocks; or (``SPLIT``) over a share of them into
    the partials OP/LP. ``REST``: continue from the partial result in OP/LP (normalized output, LSE) over the
    selected blocks in [init_blocks, qb - local_blocks) that lie in [blk_lo, blk_hi), into O/LSE, or with
    ``SPLIT`` back into OP/LP for a later key range (REST_KEY_RANGES)."""
    r = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1)
    sp = tl.program_id(2)
    h = tl.arange(0, GP)
    hm = h < G
    d = tl.arange(0, BD)
    dm = d < D
    q = tl.load(Q + r * s_qr + (hk * G + h)[:, None] * s_qh + d[None, :], mask=hm[:, None] & dm[None, :], other=0.0)
    qpos = q_pos0 + r
    kk = tl.arange(0, BS)
    if REST:
        # continue from the forced blocks' (or an earlier key range's) partial result in OP/LP: only the
        # selected blocks in [init_blocks, qb - local_blocks) remain, those of this key range contiguous in the
        # sorted selection
        acc = tl.load(OP + r * s_pr + (hk * G + h)[:, None] * s_ph + d[None, :], mask=hm[:, None] & dm[None, :], other=0.0)
        m_i = tl.load(LP + r * s_lr + hk * G + h, mask=hm, other=0.0)
        l_i = tl.full([GP], 1.0, tl.float32)
        ss = tl.arange(0, SP2)
        bv = tl.load(IDX + hk * s_ih + r * s_ir + ss, mask=ss < n_sel, other=-1)
        qb = qpos // BS
        s_lo = tl.sum(((bv >= 0) & (bv < tl.maximum(init_blocks, blk_lo))).to(tl.int32), axis=0)
        s_hi = tl.maximum(tl.sum(((bv >= 0) & (bv < tl.minimum(qb - local_blocks, blk_hi))).to(tl.int32), axis=0), s_lo)
    else:
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, BD], tl.float32)
        s_lo = sp * sel_per_split
        s_hi = tl.minimum(s_lo + sel_per_split, n_sel)
    for s in range(s_lo, s_hi):
        b = tl.load(IDX + hk * s_ih + r * s_ir + s)
        kpos = b.to(tl.int64) * BS + kk
        kv = (b >= 0) & (kpos <= qpos) & (kpos < n_keys)
        kt = _kv_tile_t(K, kpos, kv, hk, s_kt, s_kh, d, dm)
        vb = _kv_tile(V, kpos, kv, hk, s_vt, s_vh, d, dm)
        sc = mma(q, kt, PREC) * qk_scale2
        sc = tl.where(kv[None, :], sc, float("-inf"))
        m_i, l_i, acc = _softmax_step(m_i, l_i, acc, sc, vb, PREC)
    o, lse = _softmax_finish(m_i, l_i, acc)
    if SPLIT:
        tl.store(OP + sp * s_ps + r * s_pr + (hk * G + h)[:, None] * s_ph + d[None, :], o, mask=hm[:, None] & dm[None, :])
        tl.store(LP + sp * s_ls + r * s_lr + hk * G + h, lse, mask=hm)
    else:
        tl.store(O + r * s_or + (hk * G + h)[:, None] * s_oh + d[None, :], o.to(O.dtype.element_ty), mask=hm[:, None] & dm[None, :])
        tl.store(LSE + r * s_lr + hk * G + h, lse, mask=hm)


@triton.jit
def _forced_rows(pid, q_pos0, n_rows, init_blocks, local_blocks,
                 G: tl.constexpr, GP: tl.constexpr, RB: tl.constexpr, BS: tl.constexpr):
    """The RB consecutive rows x GP head lanes of a forced-block program (``row``, ``h``, ``ok``: a real row and
    head; ``qpos``, ``qb``: position and block of each lane's row) and the blocks the rows share: ``n_init``
    initial blocks, then the local window from block ``loc_lo``, ``n_loop`` blocks in all."""
    BM: tl.constexpr = RB * GP
    mm = tl.arange(0, BM)
    row = pid * RB + mm // GP
    h = mm % GP
    ok = (row < n_rows) & (h < G)
    qpos = q_pos0 + row
    qb = qpos // BS
    qb_lo = (q_pos0 + pid * RB) // BS
    qb_hi = (q_pos0 + tl.minimum(pid * RB + RB, n_rows) - 1) // BS
    n_init = tl.minimum(init_blocks, tl.maximum(qb_hi - local_blocks, 0))
    loc_lo = tl.maximum(qb_lo - local_blocks, 0)
    return row, h, ok, qpos, qb, n_init, loc_lo, n_init + (qb_hi + 1 - loc_lo)


@triton.jit
def _forced_block(i, n_init, loc_lo, qb, ok, local_blocks):
    """Block ``i`` of a forced-block loop (the initial blocks, then the local window) and the lanes whose row
    has it among its forced blocks."""
    if i < n_init:
        b = i
        use = (b < qb - local_blocks) & ok
    else:
        b = loc_lo + (i - n_init)
        use = (b >= qb - local_blocks) & (b <= qb) & ok
    return b, use


@triton.jit
def _forced_step(q, K, V, k0, use, lo, qpos, hk, n_keys, qk_scale2, m_i, l_i, acc,
                 s_kt, s_kh, s_vt, s_vh, d, dm, NK: tl.constexpr, PREC: tl.constexpr, MASKED: tl.constexpr):
    """The NK keys from k0 in the forced blocks' online softmax. ``MASKED``: lane i keeps the keys in
    [lo_i, qpos_i] if ``use``_i, none otherwise; unmasked, every lane sees all NK."""
    kpos = tl.arange(0, NK).to(tl.int64) + k0
    km = kpos < n_keys
    kt = _kv_tile_t(K, kpos, km, hk, s_kt, s_kh, d, dm)
    vb = _kv_tile(V, kpos, km, hk, s_vt, s_vh, d, dm)
    sc = mma(q, kt, PREC) * qk_scale2
    if MASKED:
        vis = use[:, None] & (kpos[None, :] >= lo[:, None]) & (kpos[None, :] <= qpos[:, None]) & km[None, :]
        sc = tl.where(vis, sc, float("-inf"))
    return _softmax_step(m_i, l_i, acc, sc, vb, PREC)


@triton.jit(do_not_specialize=LENGTH_ARGS["_fwd_forced_kernel"])
def _fwd_forced_kernel(
    Q, K, V, OP, LP,
    q_pos0, n_rows, n_keys, init_blocks, local_blocks, qk_scale2,
    s_qr, s_qh, s_kt, s_kh, s_vt, s_vh, s_pr, s_ph, s_lr,
    G: tl.constexpr, GP: tl.constexpr, RB: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BS: tl.constexpr, PREC: tl.constexpr, WIN_BN: tl.constexpr = 0,
):
    """Forced blocks (init + local window + own block) of RB consecutive rows at once: they are the same
    blocks for rows of one query block, so each K/V block is loaded once for RB * G rows.

    The window is one contiguous key range. ``WIN_BN`` > 0: the part of it that every row of the program sees
    whole (from the latest row's window start to the earliest row's own block) goes in unmasked tiles of
    WIN_BN keys, the rest (the own blocks, a straddled window start) block by block with masks; 0: all of it
    block by block with masks."""
    pid = tl.program_id(0)
    hk = tl.program_id(1)
    BM: tl.constexpr = RB * GP
    row, h, ok, qpos, qb, n_init, loc_lo, n_loop = _forced_rows(pid, q_pos0, n_rows, init_blocks, local_blocks,
                                                                G, GP, RB, BS)
    d = tl.arange(0, BD)
    dm = d < D
    row64 = row.to(tl.int64)
    q = tl.load(Q + row64[:, None] * s_qr + (hk * G + h)[:, None] * s_qh + d[None, :], mask=ok[:, None] & dm[None, :], other=0.0)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    no_lo = tl.zeros_like(qpos)  # no lower bound but the block's own
    if WIN_BN == 0:
        for i in range(0, n_loop):
            b, use = _forced_block(i, n_init, loc_lo, qb, ok, local_blocks)
            m_i, l_i, acc = _forced_step(q, K, V, b * BS, use, no_lo, qpos, hk, n_keys, qk_scale2, m_i, l_i, acc,
                                         s_kt, s_kh, s_vt, s_vh, d, dm, BS, PREC, True)
    else:
        for b in range(0, n_init):  # initial blocks below a row's window
            m_i, l_i, acc = _forced_step(q, K, V, b * BS, ok & (b < qb - local_blocks), no_lo, qpos, hk, n_keys,
                                         qk_scale2, m_i, l_i, acc, s_kt, s_kh, s_vt, s_vh, d, dm, BS, PREC, True)
        qb_lo = (q_pos0 + pid * RB) // BS
        qb_hi = (q_pos0 + tl.minimum(pid * RB + RB, n_rows) - 1) // BS
        w_lo = loc_lo * BS
        w_hi = tl.minimum((qb_hi + 1) * BS, n_keys)
        win_lo = (qb - local_blocks) * BS  # each lane's window start
        u_lo = tl.maximum(qb_hi - local_blocks, 0) * BS  # every row sees [u_lo, qb_lo * BS) whole
        u_hi = u_lo + tl.maximum(qb_lo * BS - u_lo, 0) // WIN_BN * WIN_BN
        for k0 in range(w_lo, u_lo, BS):
            m_i, l_i, acc = _forced_step(q, K, V, k0, ok, win_lo, qpos, hk, n_keys, qk_scale2, m_i, l_i, acc,
                                         s_kt, s_kh, s_vt, s_vh, d, dm, BS, PREC, True)
        for k0 in range(u_lo, u_hi, WIN_BN):
            m_i, l_i, acc = _forced_step(q, K, V, k0, ok, win_lo, qpos, hk, n_keys, qk_scale2, m_i, l_i, acc,
                                         s_kt, s_kh, s_vt, s_vh, d, dm, WIN_BN, PREC, False)
        for k0 in range(u_hi, w_hi, BS):
            m_i, l_i, acc = _forced_step(q, K, V, k0, ok, win_lo, qpos, hk, n_keys, qk_scale2, m_i, l_i, acc,
                                         s_kt, s_kh, s_vt, s_vh, d, dm, BS, PREC, True)
    o, lse = _softmax_finish(m_i, l_i, acc)
    tl.store(OP + row64[:, None] * s_pr + (hk * G + h)[:, None] * s_ph + d[None, :], o, mask=ok[:, None] & dm[None, :])
    tl.store(LP + row64 * s_lr + hk * G + h, lse, mask=ok)


@triton.jit(do_not_specialize=LENGTH_ARGS["_bwd_dq_kernel"])
def _bwd_dq_kernel(
    Q, K, V, IDX, DO, LSE, DELTA, DQ,
    q_pos0, n_keys, n_sel, qk_scale2, scale,
    s_qr, s_qh, s_kt, s_kh, s_vt, s_vh, s_ih, s_ir, s_dr, s_dh, s_lr,
    DQP, s_pr, s_ph, init_blocks, local_blocks,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
    PREC: tl.constexpr, REST: tl.constexpr, SP2: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1)
    h = tl.arange(0, GP)
    hm = h < G
    d = tl.arange(0, BD)
    dm = d < D
    msk = hm[:, None] & dm[None, :]
    q = tl.load(Q + r * s_qr + (hk * G + h)[:, None] * s_qh + d[None, :], mask=msk, other=0.0)
    do = tl.load(DO + r * s_dr + (hk * G + h)[:, None] * s_dh + d[None, :], mask=msk, other=0.0)
    lse = tl.load(LSE + r * s_lr + hk * G + h, mask=hm, other=0.0)
    delta = tl.load(DELTA + r * s_lr + hk * G + h, mask=hm, other=0.0)
    qpos = q_pos0 + r
    kk = tl.arange(0, BS)
    if REST:
        # the forced blocks' part is in DQP (see _bwd_dq_forced_kernel); visit the other selected blocks
        dq = tl.load(DQP + r * s_pr + (hk * G + h)[:, None] * s_ph + d[None, :], mask=msk, other=0.0)
        ss = tl.arange(0, SP2)
        bv = tl.load(IDX + hk * s_ih + r * s_ir + ss, mask=ss < n_sel, other=-1)
        qb = qpos // BS
        s_lo = tl.sum(((bv >= 0) & (bv < init_blocks)).to(tl.int32), axis=0)
        s_hi = tl.maximum(tl.sum(((bv >= 0) & (bv < qb - local_blocks)).to(tl.int32), axis=0), s_lo)
    else:
        dq = tl.zeros([GP, BD], tl.float32)
        s_lo = 0
        s_hi = n_sel
    for s in range(s_lo, s_hi):
        b = tl.load(IDX + hk * s_ih + r * s_ir + s)
        kpos = b.to(tl.int64) * BS + kk
        kv = (b >= 0) & (kpos <= qpos) & (kpos < n_keys)
        kt = _kv_tile_t(K, kpos, kv, hk, s_kt, s_kh, d, dm)
        vt = _kv_tile_t(V, kpos, kv, hk, s_vt, s_vh, d, dm)
        sc = mma(q, kt, PREC) * qk_scale2
        p = tl.where(kv[None, :] & hm[:, None], tl.exp2(sc - lse[:, None]), 0.0)
        dp = mma(do, vt, PREC)
        ds = p * (dp - delta[:, None])
        dq += mma(ds.to(kt.dtype), tl.trans(kt), PREC)
    tl.store(DQ + r * s_dr + (hk * G + h)[:, None] * s_dh + d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=msk)


@triton.jit(do_not_specialize=LENGTH_ARGS["_bwd_dq_forced_kernel"])
def _bwd_dq_forced_kernel(
    Q, K, V, DO, LSE, DELTA, DQP,
    q_pos0, n_rows, n_keys, init_blocks, local_blocks, qk_scale2,
    s_qr, s_qh, s_kt, s_kh, s_vt, s_vh, s_dr, s_dh, s_lr, s_pr, s_ph,
    G: tl.constexpr, GP: tl.constexpr, RB: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BS: tl.constexpr, PREC: tl.constexpr,
):
    """dq (unscaled, float32) from the forced blocks of RB consecutive rows at once (cf. _fwd_forced_kernel)."""
    pid = tl.program_id(0)
    hk = tl.program_id(1)
    BM: tl.constexpr = RB * GP
    row, h, ok, qpos, qb, n_init, loc_lo, n_loop = _forced_rows(pid, q_pos0, n_rows, init_blocks, local_blocks,
                                                                G, GP, RB, BS)
    d = tl.arange(0, BD)
    dm = d < D
    row64 = row.to(tl.int64)
    qm = ok[:, None] & dm[None, :]
    q = tl.load(Q + row64[:, None] * s_qr + (hk * G + h)[:, None] * s_qh + d[None, :], mask=qm, other=0.0)
    do = tl.load(DO + row64[:, None] * s_dr + (hk * G + h)[:, None] * s_dh + d[None, :], mask=qm, other=0.0)
    lse = tl.load(LSE + row64 * s_lr + hk * G + h, mask=ok, other=0.0)
    delta = tl.load(DELTA + row64 * s_lr + hk * G + h, mask=ok, other=0.0)
    kk = tl.arange(0, BS)
    dq = tl.zeros([BM, BD], tl.float32)
    for i in range(0, n_loop):
        b, use = _forced_block(i, n_init, loc_lo, qb, ok, local_blocks)
        kpos = b.to(tl.int64) * BS + kk
        kt = _kv_tile_t(K, kpos, kpos < n_keys, hk, s_kt, s_kh, d, dm)
        vt = _kv_tile_t(V, kpos, kpos < n_keys, hk, s_vt, s_vh, d, dm)
        sc = mma(q, kt, PREC) * qk_scale2
        vis = use[:, None] & (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] < n_keys)
        p = tl.where(vis, tl.exp2(sc - lse[:, None]), 0.0)
        dp = mma(do, vt, PREC)
        ds = p * (dp - delta[:, None])
        dq += mma(ds.to(kt.dtype), tl.trans(kt), PREC)
    tl.store(DQP + row64[:, None] * s_pr + (hk * G + h)[:, None] * s_ph + d[None, :], dq, mask=qm)


@triton.jit(do_not_specialize=LENGTH_ARGS["_bwd_dkdv_kernel"])
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, ROWS, OFFS, ORDER, DK, DV, DQA,
    q_pos0, n_keys, n_blocks, qk_scale2, scale,
    s_qr, s_qh, s_kt, s_kh, s_vt, s_vh, s_dr, s_dh, s_lr, s_ar, s_ah,
    G: tl.constexpr, GP: tl.constexpr, RB: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BS: tl.constexpr, PREC: tl.constexpr, DQ_ATOMIC: tl.constexpr = False,
):
    """dk, dv of one (key block, KV head) over the rows that chose it, RB rows x GP heads (lanes) at a time
    (``DQ_ATOMIC``: and the rows' dq share, added into the float32 sums DQA). Program i takes the pair
    ``ORDER[i]`` (= hk * n_blocks + block), see ``DKDV_BUSIEST_FIRST``. The score products are [lanes, keys]:
    with 128 lanes on 8 warps no product has fewer rows than its warps cover."""
    pair = tl.load(ORDER + tl.program_id(0))
    hk = pair // n_blocks
    blk = pair % n_blocks
    BM: tl.constexpr = RB * GP
    d = tl.arange(0, BD)
    dm = d < D
    kpos = blk.to(tl.int64) * BS + tl.arange(0, BS)
    km = kpos < n_keys
    k = _kv_tile(K, kpos, km, hk, s_kt, s_kh, d, dm)
    v = _kv_tile(V, kpos, km, hk, s_vt, s_vh, d, dm)
    dk = tl.zeros([BS, BD], tl.float32)
    dv = tl.zeros([BS, BD], tl.float32)
    start = tl.load(OFFS + pair)
    end = tl.load(OFFS + pair + 1)
    mm = tl.arange(0, BM)
    h = mm % GP
    for i0 in range(start, end, RB):
        slot = i0 + mm // GP
        ok = (slot < end) & (h < G)
        row = tl.load(ROWS + slot, mask=ok, other=0).to(tl.int64)
        qm = ok[:, None] & dm[None, :]
        q = tl.load(Q + row[:, None] * s_qr + (hk * G + h)[:, None] * s_qh + d[None, :], mask=qm, other=0.0)
        do = tl.load(DO + row[:, None] * s_dr + (hk * G + h)[:, None] * s_dh + d[None, :], mask=qm, other=0.0)
        lse = tl.load(LSE + row * s_lr + hk * G + h, mask=ok, other=0.0)
        delta = tl.load(DELTA + row * s_lr + hk * G + h, mask=ok, other=0.0)
        qpos = q_pos0 + row
        vis = (qpos[:, None] >= kpos[None, :]) & ok[:, None] & km[None, :]
        s_ = mma(q, tl.trans(k), PREC) * qk_scale2
        p_ = tl.where(vis, tl.exp2(s_ - lse[:, None]), 0.0)
        dv += mma(tl.trans(p_.to(do.dtype)), do, PREC)
        dp = mma(do, tl.trans(v), PREC)
        ds = p_ * (dp - delta[:, None])
        dk += mma(tl.trans(ds.to(q.dtype)), q, PREC)
        if DQ_ATOMIC:  # this block's share of dq, added into the rows' float32 sums
            dqp = mma(ds.to(k.dtype), k, PREC) * scale
            tl.atomic_add(DQA + row[:, None] * s_ar + (hk * G + h)[:, None] * s_ah + d[None, :], dqp, mask=qm,
                          sem="relaxed")
    om = km[:, None] & dm[None, :]
    tl.store(DK + kpos[:, None] * s_kt + hk * s_kh + d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=om)
    tl.store(DV + kpos[:, None] * s_vt + hk * s_vh + d[None, :], dv.to(DV.dtype.element_ty), mask=om)


@triton.jit
def _union_lanes(n_rows, G: tl.constexpr, GP: tl.constexpr, RB: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
    """A union program's dot rows: RB consecutive query rows x the group's heads padded to GP lanes
    (KV head, row, head, valid lane, row as int64, head-dim offsets, their mask, the [rows, dims] mask)."""
    hk = tl.program_id(1)
    mm = tl.arange(0, RB * GP)
    row = tl.program_id(0) * RB + mm // GP
    h = mm % GP
    ok = (row < n_rows) & (h < G)
    d = tl.arange(0, BD)
    dm = d < D
    return hk, row, h, ok, row.to(tl.int64), d, dm, ok[:, None] & dm[None, :]


@triton.jit
def _union_start(IDX, hk, row, row64, ok, q_pos0, n_sel, s_ih, s_ir, init_blocks, local_blocks,
                 BS: tl.constexpr, SP2: tl.constexpr, BIG: tl.constexpr):
    """Where the union walk starts: per dot row the [ptr, hi) positions of its row's selection that the
    forced-block pass did not cover (the selected blocks in [init_blocks, qb - local_blocks), contiguous in
    the sorted selection), each row's first block and the smallest of them (``_union_next``)."""
    qb = (q_pos0 + row) // BS
    ss = tl.arange(0, SP2)
    bv = tl.load(IDX + hk * s_ih + row64[:, None] * s_ir + ss[None, :], mask=ok[:, None] & (ss[None, :] < n_sel),
                 other=-1)
    lo = tl.sum(((bv >= 0) & (bv < init_blocks)).to(tl.int32), axis=1)
    hi = tl.maximum(tl.sum(((bv >= 0) & (bv < (qb - local_blocks)[:, None])).to(tl.int32), axis=1), lo)
    cand, b = _union_next(IDX, hk, row64, ok, lo, hi, s_ih, s_ir, BIG)
    return lo, hi, cand, b


@triton.jit
def _union_next(IDX, hk, row64, ok, ptr, hi, s_ih, s_ir, BIG: tl.constexpr):
    """Each dot row's next block (BIG when its range is done) and the smallest of them."""
    live = ok & (ptr < hi)
    cand = tl.load(IDX + hk * s_ih + row64 * s_ir + ptr, mask=live, other=BIG)
    cand = tl.where(live, cand, BIG)
    return cand, tl.min(cand, axis=0)


@triton.jit(do_not_specialize=LENGTH_ARGS["_fwd_union_kernel"])
def _fwd_union_kernel(
    Q, K, V, IDX, O, LSE, OP, LP,
    q_pos0, n_rows, n_keys, n_sel, qk_scale2,
    s_qr, s_qh, s_kt, s_kh, s_vt, s_vh, s_ih, s_ir, s_or, s_oh, s_pr, s_ph, s_lr,
    init_blocks, local_blocks,
    G: tl.constexpr, GP: tl.constexpr, RB: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
    PREC: tl.constexpr, SP2: tl.constexpr,
):
    """The rest pass of RB consecutive rows (after _fwd_forced_kernel, whose partial result OP/LP it
    continues): the union of their remaining selected blocks in block order, each loaded once and applied
    to the rows that chose it (the others' scores masked)."""
    BIG: tl.constexpr = 2147483647
    hk, row, h, ok, row64, d, dm, msk = _union_lanes(n_rows, G, GP, RB, D, BD)
    q = tl.load(Q + row64[:, None] * s_qr + (hk * G + h)[:, None] * s_qh + d[None, :], mask=msk, other=0.0)
    acc = tl.load(OP + row64[:, None] * s_pr + (hk * G + h)[:, None] * s_ph + d[None, :], mask=msk, other=0.0)
    m_i = tl.load(LP + row64 * s_lr + hk * G + h, mask=ok, other=0.0)
    l_i = tl.full([RB * GP], 1.0, tl.float32)
    ptr, hi, cand, b = _union_start(IDX, hk, row, row64, ok, q_pos0, n_sel, s_ih, s_ir, init_blocks, local_blocks,
                                    BS, SP2, BIG)
    kk = tl.arange(0, BS)
    while b < BIG:
        use = cand == b
        kpos = b.to(tl.int64) * BS + kk
        kin = kpos < n_keys  # a rest block lies before every user's local window: causal for all of them
        kt = _kv_tile_t(K, kpos, kin, hk, s_kt, s_kh, d, dm)
        vb = _kv_tile(V, kpos, kin, hk, s_vt, s_vh, d, dm)
        sc = mma(q, kt, PREC) * qk_scale2
        sc = tl.where(use[:, None] & kin[None, :], sc, float("-inf"))
        m_i, l_i, acc = _softmax_step(m_i, l_i, acc, sc, vb, PREC)
        ptr = ptr + use.to(tl.int32)
        cand, b = _union_next(IDX, hk, row64, ok, ptr, hi, s_ih, s_ir, BIG)
    o, lse = _softmax_finish(m_i, l_i, acc)
    tl.store(O + row64[:, None] * s_or + (hk * G + h)[:, None] * s_oh + d[None, :], o.to(O.dtype.element_ty), mask=msk)
    tl.store(LSE + row64 * s_lr + hk * G + h, lse, mask=ok)


@triton.jit(do_not_specialize=LENGTH_ARGS["_bwd_dq_union_kernel"])
def _bwd_dq_union_kernel(
    Q, K, V, IDX, DO, LSE, DELTA, DQ, DQP,
    q_pos0, n_rows, n_keys, n_sel, qk_scale2, scale,
    s_qr, s_qh, s_kt, s_kh, s_vt, s_vh, s_ih, s_ir, s_dr, s_dh, s_lr, s_pr, s_ph,
    init_blocks, local_blocks,
    G: tl.constexpr, GP: tl.constexpr, RB: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
    PREC: tl.constexpr, SP2: tl.constexpr,
):
    """dq of the rest pass for RB consecutive rows over the union of their selections (cf. _fwd_union_kernel),
    continuing the forced blocks' partial dq in DQP."""
    BIG: tl.constexpr = 2147483647
    hk, row, h, ok, row64, d, dm, msk = _union_lanes(n_rows, G, GP, RB, D, BD)
    q = tl.load(Q + row64[:, None] * s_qr + (hk * G + h)[:, None] * s_qh + d[None, :], mask=msk, other=0.0)
    do = tl.load(DO + row64[:, None] * s_dr + (hk * G + h)[:, None] * s_dh + d[None, :], mask=msk, other=0.0)
    lse = tl.load(LSE + row64 * s_lr + hk * G + h, mask=ok, other=0.0)
    delta = tl.load(DELTA + row64 * s_lr + hk * G + h, mask=ok, other=0.0)
    dq = tl.load(DQP + row64[:, None] * s_pr + (hk * G + h)[:, None] * s_ph + d[None, :], mask=msk, other=0.0)
    ptr, hi, cand, b = _union_start(IDX, hk, row, row64, ok, q_pos0, n_sel, s_ih, s_ir, init_blocks, local_blocks,
                                    BS, SP2, BIG)
    kk = tl.arange(0, BS)
    while b < BIG:
        use = cand == b
        kpos = b.to(tl.int64) * BS + kk
        kin = kpos < n_keys
        kt = _kv_tile_t(K, kpos, kin, hk, s_kt, s_kh, d, dm)
        vt = _kv_tile_t(V, kpos, kin, hk, s_vt, s_vh, d, dm)
        sc = mma(q, kt, PREC) * qk_scale2
        p = tl.where(use[:, None] & kin[None, :], tl.exp2(sc - lse[:, None]), 0.0)
        dp = mma(do, vt, PREC)
        ds = p * (dp - delta[:, None])
        dq += mma(ds.to(kt.dtype), tl.trans(kt), PREC)
        ptr = ptr + use.to(tl.int32)
        cand, b = _union_next(IDX, hk, row64, ok, ptr, hi, s_ih, s_ir, BIG)
    tl.store(DQ + row64[:, None] * s_dr + (hk * G + h)[:, None] * s_dh + d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=msk)


@triton.jit(do_not_specialize=LENGTH_ARGS["_merge_splits_kernel"])
def _merge_splits_kernel(OP, LP, O, n_splits, s_ps, s_pr, s_ls, s_or, D: tl.constexpr, BD: tl.constexpr, SPP: tl.constexpr):
    """Merge the split partials (o_s, lse_s) of one (row, q head) into o (decode, flash-decoding style)."""
    rh = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, SPP)
    d = tl.arange(0, BD)
    lp = tl.load(LP + sp * s_ls + rh, mask=sp < n_splits, other=float("-inf"))
    mx = tl.max(lp, axis=0)
    w = tl.where(lp > float("-inf"), tl.exp2(lp - mx), 0.0)
    op = tl.load(OP + sp[:, None] * s_ps + rh * s_pr + d[None, :], mask=(sp[:, None] < n_splits) & (d[None, :] < D), other=0.0)
    o = tl.sum(op * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(O + rh * s_or + d, o.to(O.dtype.element_ty), mask=d < D)


def _cfg(G: int, D: int):
    return group_pad(G), pad_dim(D)


def _multi_row(G: int, lanes: int) -> tuple[int, int]:
    """(padded group, rows) of a kernel whose dot rows are ``rows x padded group`` (the forced-block and dk/dv
    kernels): the group padded only to a power of two, since the rows already fill the dot's 16-row minimum.
    A 3-head group then takes 4 lanes, not 16: 75% of the rows do work instead of 19% (SmolLM2's 9/3 heads;
    the release's group of 16 is unchanged)."""
    gp = triton.next_power_of_2(G)
    return gp, max(1, lanes // gp)


def dkdv_launch(G: int, BD: int) -> tuple[int, int, int]:
    """(padded group, rows, warps) of the dk/dv kernel: 128 lanes."""
    gp, rb = _multi_row(G, 128)
    return gp, rb, 4 if BD <= 64 else 8


def sparse_attn_forward(q, k, v, topk_idx, q_pos0, block_size, scale, splits=1, forced=None,
                        rows_per_pass=1 << 16):
    """Forward: returns (o ``[R, Hq, D]`` in q's dtype, lse ``[R, Hq]`` float32, log2 units).

    ``forced=(init_blocks, local_blocks)`` declares that every row's selection contains all its forced
    blocks (true for InfLLM-V2 selections when topk > init_blocks): they are then computed by
    ``_fwd_forced_kernel`` for several rows at once and the per-row kernel only visits the others.
    A float32 scratch of ``rows_per_pass`` rows carries the partial result between the two kernels.
    """
    if forced is not None and splits == 1:
        return _forward_two_pass(q, k, v, topk_idx, q_pos0, block_size, scale, forced, rows_per_pass)
    R, Hq, D = q.shape
    Tk, Hk = k.shape[0], k.shape[1]
    G = Hq // Hk
    GP, BD = _cfg(G, D)
    S = topk_idx.shape[-1]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    idx = topk_idx.contiguous()
    splits = max(1, min(splits, S))
    per = triton.cdiv(S, splits)
    splits = triton.cdiv(S, per) if S else 1
    split = splits > 1
    o = torch.empty_like(q)
    lse = torch.empty(R, Hq, device=q.device, dtype=torch.float32)
    if split:
        op = torch.empty(splits, R, Hq, D, device=q.device, dtype=torch.float32)
        lp = torch.empty(splits, R, Hq, device=q.device, dtype=torch.float32)
    else:
        op, lp = o, lse
    _fwd_kernel[(R, Hk, splits)](
        q, k, v, idx, o, lse, op, lp,
        q_pos0, Tk, S, per, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        idx.stride(0), idx.stride(1), o.stride(0), o.stride(1),
        op.stride(0) if split else 0, op.stride(1), op.stride(2) if split else 0,
        lp.stride(0) if split else 0, lp.stride(1) if split else lse.stride(0),
        0, 0, 0, 0,
        G=G, GP=GP, D=D, BD=BD, BS=block_size, PREC=_precision(q.dtype), SPLIT=split, REST=False, SP2=1,
        num_warps=4, num_stages=2,
    )
    if split:
        _merge_splits_kernel[(R * Hq,)](op, lp, o, splits, op.stride(0), op.stride(2), lp.stride(0), o.stride(1),
                                        D=D, BD=BD, SPP=triton.next_power_of_2(max(splits, 2)), num_warps=1)
        lse = None  # not needed by decode; the split path has no backward
    return o, lse


def _rest_key_ranges(n_keys: int, d: int, itemsize: int) -> int:
    """Launches of the rest pass (``REST_KEY_RANGES``, or one per ``REST_RANGE_BYTES`` of a KV head's K and V,
    1 to 4)."""
    if REST_KEY_RANGES > 0:
        return REST_KEY_RANGES
    return min(4, max(1, round(2 * n_keys * d * itemsize / REST_RANGE_BYTES)))


def _forced_win_keys(dtype: torch.dtype, block_size: int) -> int:
    """Keys per unmasked window tile of the forced-block pass (``FORCED_WIN_BN`` blocks), or 0. 16-bit inputs:
    two stages of 128-key K and V tiles take 160 KB of shared memory; float32's 256 KB exceed an H100's 227 (the
    H200 refused to launch it), so float32 keeps the per-block pass on the GPU; the interpreter, which has no
    such limit, runs the tiles at any width (the tests' float32 inputs check the same code)."""
    if dtype.itemsize <= 2 or _sel.INTERPRET:
        return FORCED_WIN_BN * block_size
    return 0


def _forward_two_pass(q, k, v, topk_idx, q_pos0, block_size, scale, forced, rows_per_pass):
    R, Hq, D = q.shape
    Tk, Hk = k.shape[0], k.shape[1]
    G = Hq // Hk
    GP, BD = _cfg(G, D)
    S = topk_idx.shape[-1]
    init_blocks, local_blocks = forced
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    prec = _precision(q.dtype)
    o = torch.empty_like(q)
    lse = torch.empty(R, Hq, device=q.device, dtype=torch.float32)
    step = min(R, rows_per_pass)
    op = torch.empty(step, Hq, D, device=q.device, dtype=torch.float32)
    gpm, rb = _multi_row(G, 128)
    win = _forced_win_keys(q.dtype, block_size)
    n_blocks = triton.cdiv(Tk, block_size)
    ranges = min(_rest_key_ranges(Tk, D, k.element_size()), n_blocks)
    for r0 in range(0, R, step):
        r1 = min(R, r0 + step)
        n = r1 - r0
        qc, oc, lc, ic = q[r0:r1], o[r0:r1], lse[r0:r1], topk_idx[:, r0:r1]
        _fwd_forced_kernel[(triton.cdiv(n, rb), Hk)](
            qc, k, v, op, lc,
            q_pos0 + r0, n, Tk, init_blocks, local_blocks, scale * LOG2E,
            qc.stride(0), qc.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            op.stride(0), op.stride(1), lc.stride(0),
            G=G, GP=gpm, RB=rb, D=D, BD=BD, BS=block_size, PREC=prec,
            WIN_BN=win, num_warps=8, num_stages=2,
        )
        if UNION_LANES:
            gpu, rbu = _multi_row(G, UNION_LANES)
            _fwd_union_kernel[(triton.cdiv(n, rbu), Hk)](
                qc, k, v, ic, oc, lc, op, lc,
                q_pos0 + r0, n, Tk, S, scale * LOG2E,
                qc.stride(0), qc.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                ic.stride(0), ic.stride(1), oc.stride(0), oc.stride(1), op.stride(0), op.stride(1), lc.stride(0),
                init_blocks, local_blocks,
                G=G, GP=gpu, RB=rbu, D=D, BD=BD, BS=block_size, PREC=prec, SP2=triton.next_power_of_2(S),
                **PER_ROW_CFG,
            )
            continue
        for j in range(ranges):  # each key range over all rows: the K/V that the programs in flight read shrinks
            last = j == ranges - 1
            _fwd_kernel[(n, Hk, 1)](
                qc, k, v, ic, oc, lc, op, lc,
                q_pos0 + r0, Tk, S, S, scale * LOG2E,
                qc.stride(0), qc.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                ic.stride(0), ic.stride(1), oc.stride(0), oc.stride(1),
                0, op.stride(0), op.stride(1), 0, lc.stride(0),
                init_blocks, local_blocks, n_blocks * j // ranges, n_blocks if last else n_blocks * (j + 1) // ranges,
                G=G, GP=GP, D=D, BD=BD, BS=block_size, PREC=prec, SPLIT=not last, REST=True,
                SP2=triton.next_power_of_2(S), **PER_ROW_CFG,
            )
    return o, lse


INT32_KEYS_BELOW = 2**31  # _inverted_index sorts int32 keys while n_pairs * R (the unused slots' key) is below


def _inverted_index(topk_idx: torch.Tensor, n_blocks: int):
    """Rows that selected each (KV head, block) pair, grouped by pair and ascending within it: (rows int32,
    offsets int32 ``[Hk*n_blocks+1]``, order int32 ``[Hk*n_blocks]``: the pairs by falling row count, or in
    block order without ``DKDV_BUSIEST_FIRST``). One sort of unique keys pair * R + row (int32 where they fit:
    half the radix passes of int64), no host sync: unused slots sort last, offsets come from a search."""
    Hk, R, S = topk_idx.shape
    n_pairs = Hk * n_blocks
    dtype = torch.int32 if n_pairs * R < INT32_KEYS_BELOW else torch.int64
    dev = topk_idx.device
    pair = topk_idx.to(dtype) + (torch.arange(Hk, device=dev, dtype=dtype) * n_blocks)[:, None, None]
    key = pair * R + torch.arange(R, device=dev, dtype=dtype)[None, :, None]
    key = torch.where(topk_idx >= 0, key, n_pairs * R).flatten()
    key = torch.sort(key).values
    rows = (key % R).to(torch.int32)
    offs = torch.searchsorted(key, torch.arange(n_pairs + 1, device=dev, dtype=dtype) * R).to(torch.int32)
    if DKDV_BUSIEST_FIRST:
        order = torch.argsort(offs[1:] - offs[:-1], descending=True, stable=True).to(torch.int32)
    else:
        order = torch.arange(n_pairs, device=dev, dtype=torch.int32)
    return rows, offs, order


@triton.jit
def _delta_kernel(O, DO, DELTA, n, D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr):
    """delta = rowsum(o * do) in float32 for BR (row, head) lines of contiguous ``[R*Hq, D]`` tensors."""
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    d = tl.arange(0, BD)
    m = (r < n)[:, None] & (d < D)[None, :]
    o = tl.load(O + r[:, None] * D + d[None, :], mask=m, other=0.0).to(tl.float32)
    do = tl.load(DO + r[:, None] * D + d[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(DELTA + r, tl.sum(o * do, axis=1), mask=r < n)


def _delta(o: torch.Tensor, do: torch.Tensor) -> torch.Tensor:
    """rowsum(o * do) ``[R, Hq]`` float32, read once in the input dtypes (torch upcast both: 4 launches)."""
    R, Hq, D = o.shape
    o, do = o.contiguous(), do.contiguous()
    delta = torch.empty(R, Hq, device=o.device, dtype=torch.float32)
    n, br = R * Hq, 64
    _delta_kernel[(triton.cdiv(n, br),)](o, do, delta, n, D=D, BD=pad_dim(D), BR=br, num_warps=4)
    return delta


def _dq_forced(dqp, q, k, v, do, lse, delta, q_pos0, block_size, scale, forced):
    """dq's share (unscaled, float32) of the forced blocks of every row of q into ``dqp``."""
    R, Hq, D = q.shape
    Tk, Hk = k.shape[0], k.shape[1]
    G = Hq // Hk
    _, BD = _cfg(G, D)
    gpm, rb = _multi_row(G, 128)
    _bwd_dq_forced_kernel[(triton.cdiv(R, rb), Hk)](
        q, k, v, do, lse, delta, dqp,
        q_pos0, R, Tk, forced[0], forced[1], scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), lse.stride(0), dqp.stride(0), dqp.stride(1),
        G=G, GP=gpm, RB=rb, D=D, BD=BD, BS=block_size, PREC=_precision(q.dtype), num_warps=8, num_stages=2,
    )


def _dq_passes(dq, do, q, k, v, lse, delta, topk_idx, q_pos0, block_size, scale, forced, rows_per_pass):
    """dq of stage 2 into ``dq``: one per-row pass over every selected block, or (``forced``) the forced blocks
    of several rows at once and then each row's other blocks."""
    R, Hq, D = q.shape
    Tk, Hk = k.shape[0], k.shape[1]
    G = Hq // Hk
    GP, BD = _cfg(G, D)
    S = topk_idx.shape[-1]
    prec = _precision(q.dtype)
    if forced is None:
        _bwd_dq_kernel[(R, Hk)](
            q, k, v, topk_idx, do, lse, delta, dq,
            q_pos0, Tk, S, scale * LOG2E, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            topk_idx.stride(0), topk_idx.stride(1), do.stride(0), do.stride(1), lse.stride(0),
            dq, 0, 0, 0, 0,
            G=G, GP=GP, D=D, BD=BD, BS=block_size, PREC=prec, REST=False, SP2=1, **PER_ROW_CFG,
        )
    else:
        init_blocks, local_blocks = forced
        step = min(R, rows_per_pass)
        dqp = torch.empty(step, Hq, D, device=q.device, dtype=torch.float32)
        for r0 in range(0, R, step):
            r1 = min(R, r0 + step)
            n = r1 - r0
            qc, dqc, doc, lc, dc, ic = q[r0:r1], dq[r0:r1], do[r0:r1], lse[r0:r1], delta[r0:r1], topk_idx[:, r0:r1]
            _dq_forced(dqp, qc, k, v, doc, lc, dc, q_pos0 + r0, block_size, scale, forced)
            if UNION_LANES:
                gpu, rbu = _multi_row(G, UNION_LANES)
                _bwd_dq_union_kernel[(triton.cdiv(n, rbu), Hk)](
                    qc, k, v, ic, doc, lc, dc, dqc, dqp,
                    q_pos0 + r0, n, Tk, S, scale * LOG2E, scale,
                    qc.stride(0), qc.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                    ic.stride(0), ic.stride(1), doc.stride(0), doc.stride(1), lc.stride(0),
                    dqp.stride(0), dqp.stride(1), init_blocks, local_blocks,
                    G=G, GP=gpu, RB=rbu, D=D, BD=BD, BS=block_size, PREC=prec, SP2=triton.next_power_of_2(S),
                    **PER_ROW_CFG,
                )
                continue
            _bwd_dq_kernel[(n, Hk)](
                qc, k, v, ic, doc, lc, dc, dqc,
                q_pos0 + r0, Tk, S, scale * LOG2E, scale,
                qc.stride(0), qc.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                ic.stride(0), ic.stride(1), doc.stride(0), doc.stride(1), lc.stride(0),
                dqp, dqp.stride(0), dqp.stride(1), init_blocks, local_blocks,
                G=G, GP=GP, D=D, BD=BD, BS=block_size, PREC=prec, REST=True, SP2=triton.next_power_of_2(S),
                **PER_ROW_CFG,
            )


def sparse_attn_backward(do, q, k, v, o, lse, topk_idx, q_pos0, block_size, scale, forced=None,
                         rows_per_pass=1 << 16):
    """Backward of :func:`sparse_attn_forward`: (dq, dk, dv) in the input dtypes (``forced``: as there)."""
    R, Hq, D = q.shape
    Tk, Hk = k.shape[0], k.shape[1]
    G = Hq // Hk
    _, BD = _cfg(G, D)
    do = do.contiguous()
    delta = _delta(o, do)
    prec = _precision(q.dtype)
    if DQ_ATOMIC:  # dq comes from the dk/dv kernel below, summed here
        dqa = torch.zeros(R, Hq, D, device=q.device, dtype=torch.float32)
    else:
        dq = torch.empty_like(q)
        _dq_passes(dq, do, q, k, v, lse, delta, topk_idx, q_pos0, block_size, scale, forced, rows_per_pass)
    n_blocks = triton.cdiv(Tk, block_size)
    rows, offs, order = _inverted_index(topk_idx, n_blocks)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    gpm, rb, warps = dkdv_launch(G, BD)
    acc = dqa if DQ_ATOMIC else dk  # dk: an unused stand-in
    _bwd_dkdv_kernel[(n_blocks * Hk,)](
        q, k, v, do, lse, delta, rows, offs, order, dk, dv, acc,
        q_pos0, Tk, n_blocks, scale * LOG2E, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), lse.stride(0), acc.stride(0), acc.stride(1),
        G=G, GP=gpm, RB=rb, D=D, BD=BD, BS=block_size, PREC=prec,
        DQ_ATOMIC=DQ_ATOMIC, num_warps=warps, num_stages=2,
    )
    if DQ_ATOMIC:
        dq = dqa.to(q.dtype)  # scaled in the kernel
    return dq, dk, dv


class BlockSparseAttention(torch.autograd.Function):
    """Stage 2 with gradients for q, k, v (the selection is an input, not differentiated)."""

    @staticmethod
    def forward(ctx, q, k, v, topk_idx, q_pos0, block_size, scale, forced=None, forced_bwd=None):
        idx = topk_idx.contiguous()
        o, lse = sparse_attn_forward(q, k, v, idx, q_pos0, block_size, scale, forced=forced)
        ctx.save_for_backward(q, k, v, o, lse, idx)
        ctx.args = (q_pos0, block_size, scale, forced_bwd)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, idx = ctx.saved_tensors
        q_pos0, block_size, scale, forced = ctx.args
        dq, dk, dv = sparse_attn_backward(do, q.contiguous(), k.contiguous(), v.contiguous(), o, lse, idx,
                                          q_pos0, block_size, scale, forced=forced)
        return dq, dk, dv, None, None, None, None, None, None


def block_sparse_attention_triton(q, k, v, topk_idx, q_pos0, block_size, scale, splits=1, forced=None,
                                  forced_bwd=None):
    """Stage 2 for one sequence; differentiable in q, k, v when they require grad (splits must be 1).
    ``forced`` / ``forced_bwd``: see :func:`sparse_attn_forward` (forward / backward dq)."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return BlockSparseAttention.apply(q, k, v, topk_idx, q_pos0, block_size, scale, forced, forced_bwd)
    return sparse_attn_forward(q, k, v, topk_idx, q_pos0, block_size, scale, splits=splits, forced=forced)[0]
