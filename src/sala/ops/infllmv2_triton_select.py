"""InfLLM-V2 stage 1 and block selection in Triton (SPEC section 2, steps 2-4).

Two kernels per query chunk, then the Triton row top-k of :mod:`.infllmv2_triton_topk` on float32 block
scores (``ROW_TOPK``, the default), or ``torch.topk`` + sort on int64 block keys (rows wider than
``MAX_ROW_BLOCKS``, a card that rejects the row kernel, or ``ROW_TOPK = False``):

* ``_k2_lse_kernel``: LSE over the visible K2 chunks for every (query row, q head), log2 domain. It can split
  the K2 range over programs (decode: one row, a long cache) and the splits are merged with a logsumexp.
* ``_block_key_kernel``: stage-1 scores ``sum_h exp(scale q_h.K1_j - LSE_h)`` for a tile of K1 chunks, the
  group sum over the G heads of the KV group done in registers (rows of the dot are (query row, head)
  pairs; per-head scores never reach memory), rounded to q's dtype like the release, max-pooled into blocks
  ([r b - 1, r b + r): the chunk r b - 1 is the previous block's last column, carried from tile to tile; a
  program's first tile scores it with a second small dot), forced init/local blocks set to
  +inf, and written as one int64 key per block: ``float bits << 24 | (2^24 - 1 - b)``. The keys are unique,
  so ``torch.topk`` on them picks the same blocks as a stable sort (ties to the lower block index) on any
  device. Blocks after the query's own block get -inf (in the reference they score 0 or -inf and lose
  every tie to the earlier blocks, so the selection is the same); forced blocks stay +inf.

Nothing of size rows x K1 chunks is written except in the debug mode that tests use (``scores_out``), and the
block keys exist for one query chunk at a time.
"""

from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl

from . import infllmv2_triton_interp  # noqa: F401  (interpreter shim, no-op when compiled)
from .infllmv2_triton_topk import MAX_ROW_BLOCKS, row_topk

__all__ = ["k2_lse", "block_keys", "select_from_keys", "select_blocks_chunk", "pad_dim", "group_pad", "mma", "LOG2E"]

_IDX_BITS = 24
_IDX_MASK = (1 << _IDX_BITS) - 1
LOG2E = 1.4426950408889634
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pad_dim(d: int) -> int:
    """Head dim padded to a power of two >= 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(d))


def group_pad(g: int, rows: int = 1) -> int:
    """Heads of a group padded to a power of two so that rows * heads >= 16."""
    gp = triton.next_power_of_2(g)
    while rows * gp < 16:
        gp *= 2
    return gp


# query rows per stage-1 program (times the padded group = the dot's M); None: 64 // G. The bench measures
# 4 and 8 on the card and sets the faster before timing (bench/infllmv2.py, "tuning" in its results).
TILE_ROWS: int | None = None


# Selection of many rows (prefill) by the Triton row top-k on float32 block scores (infllmv2_triton_topk)
# instead of torch.topk + sort on int64 keys. Measured faster with identical selections (H200, commit 82c7109,
# bench/results/infllmv2.md): whole forward 106.8 vs 120.6 ms at 128K, 285.1 vs 315.4 ms at 256K.
ROW_TOPK = True


def _disable_row_topk(err: Exception) -> None:
    global ROW_TOPK
    ROW_TOPK = False
    warnings.warn(f"InfLLM-V2 row top-k failed to compile, selecting with torch.topk on block keys: {err!r:.300}")


# Unmasked path for the K1 tiles below the causal diagonal (False: every tile masked, the first version).
FAST_TILES = True


# Integer arguments that change with the sequence/context length (counts, positions, offsets, and the
# strides of outputs sized by them). Triton specializes ints on ``% 16 == 0`` and ``== 1``, so without
# ``do_not_specialize`` every new divisibility of a length compiles a new kernel (seconds per decode step
# on the card). Strides of q/k (fixed by the head layout) stay specialized (vectorized loads).
K2_LSE_LENGTH_ARGS = ["q_pos0", "n_rows", "n2", "vis_off2", "chunks_per_split", "s_ls"]
BLOCK_KEY_LENGTH_ARGS = ["q_pos0", "n_rows", "n1", "vis_off1", "n_cols", "tiles_per_split", "n_lse",
                         "s_ls", "s_yh", "s_yr", "s_sh", "s_sr"]


def _tile_rows(G: int) -> int:
    return TILE_ROWS or max(1, 64 // triton.next_power_of_2(G))


# blocks of K1 chunks per stage-1 tile (the tile's columns: TILE_BLOCKS x the chunks pooled per block)
TILE_BLOCKS = 16


def stage1_warps(rows: int, gp: int) -> int:
    """Warps of a stage-1 program whose dot has ``rows x gp`` rows: one warpgroup up to 64, two above."""
    return 4 if rows * gp <= 64 else 8


def _precision(dtype: torch.dtype) -> str:
    """Full float32 products for float32 inputs; "ieee_f32" marks the interpreter (its bf16 dot is
    broken, so operands are upcast there; compiled kernels use the tensor cores in the input dtype)."""
    if INTERPRET:
        return "ieee_f32"
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def mma(a, b, PREC: tl.constexpr):
    """tl.dot with float32 accumulation (see ``_precision``)."""
    if PREC == "ieee_f32":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit(do_not_specialize=K2_LSE_LENGTH_ARGS)
def _k2_lse_kernel(
    Q, K2, LSE,
    q_pos0, n_rows, n2, vis_off2, chunks_per_split, qk_scale2,
    s_qr, s_qh, s_kn, s_kh, s_ls, s_lr,
    G: tl.constexpr, GP: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BN: tl.constexpr, STRIDE2: tl.constexpr, PREC: tl.constexpr,
):
    pid_r = tl.program_id(0)
    hk = tl.program_id(1)
    pid_s = tl.program_id(2)
    BM: tl.constexpr = ROWS * GP
    m = tl.arange(0, BM)
    row = pid_r * ROWS + m // GP
    head = m % GP
    valid_m = (row < n_rows) & (head < G)
    d = tl.arange(0, BD)
    q = tl.load(Q + row[:, None] * s_qr + (hk * G + head)[:, None] * s_qh + d[None, :],
                mask=valid_m[:, None] & (d[None, :] < D), other=0.0)
    pos = q_pos0 + row
    vis = tl.minimum(tl.maximum((pos + 1) // STRIDE2 + vis_off2, 0), n2)
    vis = tl.where(valid_m, vis, 0)
    j_lo = pid_s * chunks_per_split
    last = tl.minimum(pid_r * ROWS + ROWS, n_rows) - 1
    vis_max = tl.minimum(tl.maximum((q_pos0 + last + 1) // STRIDE2 + vis_off2, 0), n2)
    j_hi = tl.minimum(j_lo + chunks_per_split, vis_max)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    for j0 in range(j_lo, j_hi, BN):
        j = j0 + tl.arange(0, BN)
        kt = tl.load(K2 + j[None, :] * s_kn + hk * s_kh + d[:, None],
                     mask=(j[None, :] < j_hi) & (d[:, None] < D), other=0.0)
        s = mma(q, kt, PREC) * qk_scale2
        s = tl.where(j[None, :] < vis[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
        m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.log2(l_i), float("-inf"))
    tl.store(LSE + pid_s * s_ls + row * s_lr + hk * G + head, lse, mask=valid_m)


@triton.jit
def _group_scores(q, kt, lse, vis, j, n1, qk_scale2,
                  ROWS: tl.constexpr, GP: tl.constexpr, NCOL: tl.constexpr, OUT_T: tl.constexpr,
                  PREC: tl.constexpr, MASKED: tl.constexpr):
    """Stage-1 score of NCOL K1 chunks ``j`` summed over the group, rounded to OUT_T: ``[ROWS, NCOL]``.

    ``lse`` is +inf on rows that must score 0 (padding, no visible K2), so exp2 gives 0 there without a
    mask; ``MASKED`` adds the per-chunk visibility and range masks (tiles on the causal diagonal or at
    either end of the K1 range)."""
    p = tl.exp2(mma(q, kt, PREC) * qk_scale2 - lse[:, None])
    if MASKED:
        p = tl.where(j[None, :] < vis[:, None], p, 0.0)
    g = tl.sum(tl.reshape(p, (ROWS, GP, NCOL)), axis=1)
    g = g.to(OUT_T).to(tl.float32)
    if MASKED:
        g = tl.where((j[None, :] < n1) & (j[None, :] >= 0), g, float("-inf"))
    return g


@triton.jit
def _score_tile(t, carry, q, K1, KEYS, SCORES, lse, vis, qb, rr, row_ok, hk, n1, n_cols, qk_scale2,
                init_blocks, local_blocks, s_kn, s_kh, s_yh, s_yr, s_sh, s_sr, d,
                D: tl.constexpr, NBT: tl.constexpr, POOL: tl.constexpr, ROWS: tl.constexpr, GP: tl.constexpr,
                OUT_T: tl.constexpr, PREC: tl.constexpr, WRITE_SCORES: tl.constexpr, MASKED: tl.constexpr,
                FLOAT_OUT: tl.constexpr, FIRST: tl.constexpr):
    """Block keys of the NBT blocks of tile t: each block pools its own POOL chunks and the chunk left of it
    (POOL*b-1), the last chunk of the block before. Within the tile that chunk is a column of this tile's
    scores; for the tile's first block it is the previous tile's last column, ``carry`` ``[ROWS]``, or on a
    program's first tile (``FIRST``) a separate small dot of the NBT left chunks. Returns this tile's last
    column, the next tile's carry. Every chunk's score thus comes from one tile computation (one rounding),
    so blocks whose chunks tie exactly keep their tie."""
    BN: tl.constexpr = NBT * POOL
    b = t * NBT + tl.arange(0, NBT)
    j = t * BN + tl.arange(0, BN)
    if MASKED:
        kt = tl.load(K1 + j[None, :] * s_kn + hk * s_kh + d[:, None], mask=(j[None, :] < n1) & (d[:, None] < D), other=0.0)
    else:
        kt = tl.load(K1 + j[None, :] * s_kn + hk * s_kh + d[:, None], mask=d[:, None] < D, other=0.0)
    sc = _group_scores(q, kt, lse, vis, j, n1, qk_scale2, ROWS, GP, BN, OUT_T, PREC, MASKED)
    if WRITE_SCORES:
        tl.store(SCORES + hk * s_sh + rr[:, None] * s_sr + j[None, :], sc, mask=row_ok[:, None] & (j[None, :] < n1))
    per_block = tl.reshape(sc, (ROWS, NBT, POOL))
    pooled = tl.max(per_block, axis=2)
    if FIRST:
        je = b * POOL - 1
        ke = tl.load(K1 + je[None, :] * s_kn + hk * s_kh + d[:, None],
                     mask=(je[None, :] >= 0) & (je[None, :] < n1) & (d[:, None] < D), other=0.0)
        left = _group_scores(q, ke, lse, vis, je, n1, qk_scale2, ROWS, GP, NBT, OUT_T, PREC, MASKED)
    else:
        # the last chunk of each block, moved one block to the right (exact: selections by max over -inf)
        c = tl.arange(0, POOL)
        last = tl.max(tl.where((c == POOL - 1)[None, None, :], per_block, float("-inf")), axis=2)
        i = tl.arange(0, NBT)
        shifted = tl.max(tl.where((i[:, None] - 1 == i[None, :])[None, :, :], last[:, None, :], float("-inf")), axis=2)
        left = tl.where((i == 0)[None, :], carry[:, None], shifted)
    pooled = tl.maximum(pooled, left)
    _store_keys(KEYS, pooled, b, qb, rr, row_ok, hk, n_cols, init_blocks, local_blocks, s_yh, s_yr, FLOAT_OUT)
    return tl.max(tl.where((tl.arange(0, BN) == BN - 1)[None, :], sc, float("-inf")), axis=1)


@triton.jit(do_not_specialize=BLOCK_KEY_LENGTH_ARGS)
def _block_key_kernel(
    Q, K1, LSE, KEYS, SCORES,
    q_pos0, n_rows, n1, vis_off1, n_cols, tiles_per_split, qk_scale2,
    block_size, init_blocks, local_blocks, n_lse,
    s_qr, s_qh, s_kn, s_kh, s_ls, s_lr, s_yh, s_yr, s_sh, s_sr,
    G: tl.constexpr, GP: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    NBT: tl.constexpr, POOL: tl.constexpr, STRIDE1: tl.constexpr, OUT_T: tl.constexpr,
    PREC: tl.constexpr, WRITE_SCORES: tl.constexpr, FAST: tl.constexpr, FLOAT_OUT: tl.constexpr,
):
    pid_r = tl.program_id(0)
    hk = tl.program_id(1)
    pid_t = tl.program_id(2)
    BM: tl.constexpr = ROWS * GP
    BN: tl.constexpr = NBT * POOL
    m = tl.arange(0, BM)
    row_m = pid_r * ROWS + m // GP
    head = m % GP
    valid_m = (row_m < n_rows) & (head < G)
    d = tl.arange(0, BD)
    q = tl.load(Q + row_m[:, None] * s_qr + (hk * G + head)[:, None] * s_qh + d[None, :],
                mask=valid_m[:, None] & (d[None, :] < D), other=0.0)
    # merge the K2-LSE partials of the n_lse splits (decode splits the K2 range over programs)
    mx = tl.full([BM], float("-inf"), tl.float32)
    for sp in range(0, n_lse):
        mx = tl.maximum(mx, tl.load(LSE + sp * s_ls + row_m * s_lr + hk * G + head, mask=valid_m, other=float("-inf")))
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    tot = tl.zeros([BM], tl.float32)
    for sp in range(0, n_lse):
        part = tl.load(LSE + sp * s_ls + row_m * s_lr + hk * G + head, mask=valid_m, other=float("-inf"))
        tot += tl.exp2(part - mx_safe)
    # +inf: the row scores 0 everywhere (no visible K2 chunk yet, or a padding row/head)
    lse = tl.where((tot > 0) & valid_m, mx_safe + tl.log2(tot), float("inf"))
    vis = tl.minimum(tl.maximum((q_pos0 + row_m + 1) // STRIDE1 + vis_off1, 0), n1)
    rr = pid_r * ROWS + tl.arange(0, ROWS)
    row_ok = rr < n_rows
    qb = (q_pos0 + rr) // block_size
    qb_max = (q_pos0 + tl.minimum(pid_r * ROWS + ROWS, n_rows) - 1) // block_size
    t_lo = pid_t * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, tl.cdiv(n_cols, NBT))
    t_mid = tl.maximum(tl.minimum(t_hi, qb_max // NBT + 1), t_lo)
    # tiles of K1 chunks visible to every row of the tile (and inside [0, n1)) need no mask
    vis_min = tl.minimum(tl.maximum((q_pos0 + pid_r * ROWS + 1) // STRIDE1 + vis_off1, 0), n1)
    if FAST:
        f_lo = tl.maximum(t_lo, 1)
        f_hi = tl.maximum(f_lo, tl.minimum(t_mid, vis_min // BN))
    else:
        f_lo = t_mid
        f_hi = t_mid
    # the tiles in order through the three ranges (masked, unmasked, masked), the left chunk's score carried
    # from tile to tile; the program's first tile computes it (chunk -1 of the sequence is -inf: no dot)
    carry = tl.full([ROWS], float("-inf"), tl.float32)
    t_first = t_lo
    if (t_lo > 0) & (t_lo < t_mid):
        carry = _score_tile(t_lo, carry, q, K1, KEYS, SCORES, lse, vis, qb, rr, row_ok, hk, n1, n_cols, qk_scale2,
                            init_blocks, local_blocks, s_kn, s_kh, s_yh, s_yr, s_sh, s_sr, d,
                            D, NBT, POOL, ROWS, GP, OUT_T, PREC, WRITE_SCORES, True, FLOAT_OUT, True)
        t_first = t_lo + 1
    for t in range(t_first, tl.maximum(tl.minimum(f_lo, t_mid), t_first)):
        carry = _score_tile(t, carry, q, K1, KEYS, SCORES, lse, vis, qb, rr, row_ok, hk, n1, n_cols, qk_scale2,
                            init_blocks, local_blocks, s_kn, s_kh, s_yh, s_yr, s_sh, s_sr, d,
                            D, NBT, POOL, ROWS, GP, OUT_T, PREC, WRITE_SCORES, True, FLOAT_OUT, False)
    for t in range(tl.maximum(f_lo, t_first), f_hi):
        carry = _score_tile(t, carry, q, K1, KEYS, SCORES, lse, vis, qb, rr, row_ok, hk, n1, n_cols, qk_scale2,
                            init_blocks, local_blocks, s_kn, s_kh, s_yh, s_yr, s_sh, s_sr, d,
                            D, NBT, POOL, ROWS, GP, OUT_T, PREC, WRITE_SCORES, False, FLOAT_OUT, False)
    for t in range(tl.maximum(tl.maximum(f_hi, tl.minimum(f_lo, t_mid)), t_first), t_mid):
        carry = _score_tile(t, carry, q, K1, KEYS, SCORES, lse, vis, qb, rr, row_ok, hk, n1, n_cols, qk_scale2,
                            init_blocks, local_blocks, s_kn, s_kh, s_yh, s_yr, s_sh, s_sr, d,
                            D, NBT, POOL, ROWS, GP, OUT_T, PREC, WRITE_SCORES, True, FLOAT_OUT, False)
    for t in range(t_mid, t_hi):  # tiles entirely in every row's future: no scores needed
        b = t * NBT + tl.arange(0, NBT)
        pooled = tl.full([ROWS, NBT], float("-inf"), tl.float32)
        _store_keys(KEYS, pooled, b, qb, rr, row_ok, hk, n_cols, init_blocks, local_blocks, s_yh, s_yr, FLOAT_OUT)


@triton.jit
def _store_keys(KEYS, pooled, b, qb, rr, row_ok, hk, n_cols, init_blocks, local_blocks, s_yh, s_yr,
                FLOAT_OUT: tl.constexpr):
    """Future blocks -> -inf, forced blocks -> +inf, then the unique int64 key per (row, block)
    (``FLOAT_OUT``: the float32 block score itself, for the one-row decode top-k)."""
    pooled = tl.where(b[None, :] > qb[:, None], float("-inf"), pooled)
    forced = (b[None, :] < init_blocks) | ((b[None, :] >= qb[:, None] - local_blocks) & (b[None, :] <= qb[:, None]))
    pooled = tl.where(forced, float("inf"), pooled)
    if FLOAT_OUT:
        key = pooled
    else:
        bits = pooled.to(tl.int32, bitcast=True).to(tl.int64)
        key = bits * (1 << 24) + ((1 << 24) - 1 - b[None, :]).to(tl.int64)
    tl.store(KEYS + hk * s_yh + rr[:, None] * s_yr + b[None, :], key, mask=row_ok[:, None] & (b[None, :] < n_cols))


def _grid_rows(n_rows: int, rows: int) -> int:
    return triton.cdiv(n_rows, rows)


def k2_lse(q, k2, scale, q_pos0, vis_off2, stride2, rows=None, splits=1, n2=None, combine=True):
    """LSE (log2 units) of scale q.K2 over the visible K2 chunks: ``[n_rows, Hq]`` float32 (-inf = none);
    ``combine=False`` returns the per-split partials ``[splits, n_rows, Hq]`` (block_keys merges them)."""
    R, Hq, D = q.shape
    Hk = k2.shape[1]
    n2 = k2.shape[0] if n2 is None else n2
    G = Hq // Hk
    rows = rows or _tile_rows(G)
    GP = group_pad(G, rows)
    BN = 64
    per = triton.cdiv(max(n2, 1), splits)
    per = triton.cdiv(per, BN) * BN
    splits = max(1, triton.cdiv(max(n2, 1), per))
    out = torch.empty(splits, R, Hq, device=q.device, dtype=torch.float32)
    q = q.contiguous()
    k2 = k2.contiguous()
    grid = (_grid_rows(R, rows), Hk, splits)
    _k2_lse_kernel[grid](
        q, k2, out, q_pos0, R, n2, vis_off2, per, scale * LOG2E,
        q.stride(0), q.stride(1), k2.stride(0), k2.stride(1), out.stride(0), out.stride(1),
        G=G, GP=GP, ROWS=rows, D=D, BD=pad_dim(D), BN=BN, STRIDE2=stride2, PREC=_precision(q.dtype),
        num_warps=stage1_warps(rows, GP),
    )
    if not combine:
        return out
    if splits == 1:
        return out[0]
    return torch.logsumexp(out * (1 / LOG2E), dim=0) * LOG2E


def _out_type(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def block_keys(q, k1, lse2, scale, q_pos0, vis_off1, params, n_cols, rows=None, splits=None,
               scores_out=None, n1=None, float_out=False):
    """Int64 block keys ``[Hk, n_rows, n_cols]`` (see module doc); optionally the raw group-summed
    stage-1 scores into ``scores_out [Hk, n_rows, n1]`` (tests only). ``lse2``: ``[n_rows, Hq]`` or the
    split partials ``[splits, n_rows, Hq]``. ``float_out``: float32 block scores instead of keys (same
    -inf/+inf for future/forced blocks)."""
    R, Hq, D = q.shape
    Hk = k1.shape[1]
    n1 = k1.shape[0] if n1 is None else n1
    G = Hq // Hk
    rows = rows or _tile_rows(G)
    GP = group_pad(G, rows)
    pool = params.block_size // params.kernel_stride
    nbt = TILE_BLOCKS
    keys = torch.empty(Hk, R, n_cols, device=q.device, dtype=torch.float32 if float_out else torch.int64)
    n_tiles = triton.cdiv(n_cols, nbt)
    r_tiles = _grid_rows(R, rows)
    if splits is None:
        splits = max(1, min(n_tiles, triton.cdiv(2048, r_tiles * Hk)))
    per = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, per)
    write = scores_out is not None
    sc = scores_out if write else keys
    q = q.contiguous()
    k1 = k1.contiguous()
    if lse2.dim() == 2:
        lse2 = lse2[None]
    _block_key_kernel[(r_tiles, Hk, splits)](
        q, k1, lse2, keys, sc,
        q_pos0, R, n1, vis_off1, n_cols, per, scale * LOG2E,
        params.block_size, params.init_blocks, params.local_blocks, lse2.shape[0],
        q.stride(0), q.stride(1), k1.stride(0), k1.stride(1), lse2.stride(0), lse2.stride(1),
        keys.stride(0), keys.stride(1), sc.stride(0), sc.stride(1),
        G=G, GP=GP, ROWS=rows, D=D, BD=pad_dim(D), NBT=nbt, POOL=pool, STRIDE1=params.kernel_stride,
        OUT_T=_out_type(q.dtype), PREC=_precision(q.dtype), WRITE_SCORES=write, FAST=FAST_TILES, FLOAT_OUT=float_out,
        num_warps=stage1_warps(rows, GP),
    )
    return keys


def keys_to_scores(keys: torch.Tensor) -> torch.Tensor:
    """Block scores (float32) back from int64 keys."""
    return (keys >> _IDX_BITS).to(torch.int32).view(torch.float32)


def select_from_keys(keys, q_blocks, n_select, width):
    """Top-``n_select`` of the unique keys, sorted block indices, -1 after the row's block, padded with -1
    to ``width`` columns: int32 ``[Hk, R, width]``. ``q_blocks``: ``[R]`` or an int (one row)."""
    Hk, R, n_cols = keys.shape
    if n_cols > n_select:
        top = torch.topk(keys, n_select, dim=-1, sorted=False).values
        idx = (_IDX_MASK - (top & _IDX_MASK)).to(torch.int32)
    else:
        idx = torch.arange(n_cols, device=keys.device, dtype=torch.int32).expand(Hk, R, n_cols)
    idx = torch.sort(idx, dim=-1).values
    qb = q_blocks if isinstance(q_blocks, int) else q_blocks[None, :, None]
    idx = idx.masked_fill(idx > qb, -1)
    if idx.shape[-1] < width:
        idx = torch.nn.functional.pad(idx, (0, width - idx.shape[-1]), value=-1)
    return idx


def visibility_offsets(length: int, n: int, stride: int, decode: bool) -> int:
    """``off`` with vis(r) = clamp((r+1)//s + off, 0, n) (reference ``visible_counts``); decode: all."""
    if decode:
        return n
    return -1 + n - (length - stride + 1) // stride


def select_blocks_chunk(q, k1, k2, scale, params, q_pos0, total_len, decode=False, scores_out=None,
                        lse_splits=1, key_splits=None, n1=None, n2=None):
    """Block selection for query rows at positions ``q_pos0 + arange(R)`` of a ``total_len`` sequence:
    int32 ``[Hk, R, min(n_select, n_blocks)]``, the reference ``select_blocks`` output."""
    R = q.shape[0]
    n1 = k1.shape[0] if n1 is None else n1
    n2 = k2.shape[0] if n2 is None else n2
    bs = params.block_size
    n_blocks = -(-total_len // bs)
    width = min(params.n_select, n_blocks)
    off1 = visibility_offsets(total_len, n1, params.kernel_stride, decode)
    off2 = visibility_offsets(total_len, n2, params.kernel_stride2, decode)
    rows = 1 if R == 1 else None  # decode: one query row, M = the padded group only
    if n2 > 0:
        lse2 = k2_lse(q, k2, scale, q_pos0, off2, params.kernel_stride2, splits=lse_splits, n2=n2, combine=False,
                      rows=rows)
    else:
        lse2 = torch.full((R, q.shape[1]), float("-inf"), device=q.device, dtype=torch.float32)
    qb_last = (q_pos0 + R - 1) // bs
    n_cols = min(n_blocks, max(qb_last + 1, params.init_blocks))
    if ROW_TOPK and n_cols <= MAX_ROW_BLOCKS:
        sc = block_keys(q, k1, lse2, scale, q_pos0, off1, params, n_cols, splits=key_splits,
                        scores_out=scores_out, n1=n1, rows=rows, float_out=True)
        try:
            return row_topk(sc, params.n_select, width, q_pos0, bs)
        except (triton.CompilationError, triton.OutOfResources) as err:  # rejected on this card: int64 keys
            _disable_row_topk(err)
        del sc
    keys = block_keys(q, k1, lse2, scale, q_pos0, off1, params, n_cols, splits=key_splits,
                      scores_out=scores_out, n1=n1, rows=rows)
    if R == 1:
        return select_from_keys(keys, q_pos0 // bs, params.n_select, width)
    q_blocks = (q_pos0 + torch.arange(R, device=q.device)) // bs
    return select_from_keys(keys, q_blocks, params.n_select, width)
