"""Triton kernels of Lightning attention (Simple-GLA with a constant per-head decay ``g_h``).

Forward of one sequence of length T, state ``S [K, V]`` in float32::

    S_t = exp(g) S_{t-1} + k_t^T v_t,      o_t = scale * q_t S_t

Why three passes instead of fla's two: fla's ``chunk_fwd_h`` writes the state of EVERY 64-token chunk
to memory (T/64 * H * K * V elements, as much traffic as q, k and v together) and reads it back in
``chunk_fwd_o``. Here a sequence is cut into segments of ``SEG`` tokens (many chunks):

1. ``_segment_delta_kernel``: each segment's own contribution to the state, from its k and v only;
2. ``_segment_scan_kernel``: a short sequential scan over segments gives the state entering each
   segment (written over the deltas, in place) and the final state of each sequence;
3. ``_segment_output_kernel``: each segment walks its chunks from its entering state, carrying the state
   in registers, and writes o (intra-chunk masked product plus the inter-chunk term).

Only one state per segment touches memory. Passes 1 and 3 run one program per (segment, head, V-block).
On sm_90+ GPUs their forward-order launches move tiles with the TMA unit (``USE_TMA``: descriptors bounded at
each sequence's end, ``_seq_descriptor``); the rest use boundary-checked block pointers.
(Two other designs were measured slower on an H200 and removed: the three passes chained in one launch over
short segments, for pass 3 to find k and v in L2, and "k-major" tiles for float32; bench/results/lightning.md.)

All kernels index a packed token axis (varlen ``cu_seqlens`` or a flattened ``[B, T]`` batch) through a
segment table; every offset is computed in int64 (correct past 2^31 elements, e.g. 1M tokens x 32 heads
x 128). ``REVERSE`` runs each sequence back to front (virtual time tau maps to token ``bos + len-1-tau``),
which is what the backward pass needs. Tokens past the end of a sequence are masked and their decay
weights forced to 0 (never exp of a positive number times a masked zero).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _chunk_block(ptr, tau0, c0, cl, slen, bos, h, H: tl.constexpr, D: tl.constexpr, col0,
                 C: tl.constexpr, BD: tl.constexpr, REVERSE: tl.constexpr):
    """Block pointer to the [C, BD] tile (columns col0..) of the chunk holding virtual times
    [tau0+c0, tau0+c0+cl) of one head. Rows are in memory order; rows outside the cl valid ones (and
    columns >= D) are out of bounds, so boundary-checked loads give 0 and stores skip them.
    The base is advanced by an int64 scalar, so nothing inside the block overflows int32."""
    if REVERSE:
        first = (C - cl).to(tl.int32)  # valid rows are the last cl of the tile
        row = bos + slen - (tau0 + c0) - cl
    else:
        first = 0
        row = bos + tau0 + c0
    return tl.make_block_ptr(ptr + (row * H + h) * D, shape=(cl, D), strides=(H * D, 1),
                             offsets=(-first, col0), block_shape=(C, BD), order=(1, 0))


@triton.jit
def _seq_descriptor(ptr, bos, slen, H: tl.constexpr, D: tl.constexpr, C: tl.constexpr, BD: tl.constexpr):
    """TMA descriptor of one sequence's rows of a ``[tokens, H, D]`` tensor, for ``[C, BD]`` boxes: rows past
    the sequence's end load as zeros and are not stored. Its base is the sequence's first row (16-byte
    aligned: rows of H D elements of 2 or 4 bytes, D a power of two >= 16)."""
    return tl.make_tensor_descriptor(ptr + bos * (H * D), shape=[slen, H * D], strides=[H * D, 1],
                                     block_shape=[C, BD])


@triton.jit
def _virtual_index(C: tl.constexpr, REVERSE: tl.constexpr):
    """Position in virtual time of each row of a chunk tile (0 = first processed)."""
    ar = tl.arange(0, C)
    if REVERSE:
        return C - 1 - ar
    else:
        return ar


@triton.jit
def _split_bf16(x, UPCAST: tl.constexpr):
    """x (float32) as hi + lo, both bfloat16: hi + lo keeps ~16 of float32's 24 mantissa bits."""
    hi = x.to(tl.bfloat16)
    lo = (x - hi.to(tl.float32)).to(tl.bfloat16)
    if UPCAST:
        return hi.to(tl.float32), lo.to(tl.float32)
    return hi, lo


@triton.jit
def _mm(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, SPLIT_BF16: tl.constexpr = False):
    """a @ b (+ acc) accumulated in float32. ``UPCAST`` (interpreter only, whose bf16 dot is wrong)
    multiplies float32 copies of the same operand values instead.

    ``SPLIT_BF16`` ("bf16x3", float32 operands): a b ~ a_hi b_hi + a_hi b_lo + a_lo b_hi with bfloat16
    halves (relative error ~2^-16, finer than TF32's 2^-11). Three bf16 products instead of one TF32 one,
    but 16-bit operands may be fed to the tensor cores in either major order, so the float32 tiles need
    no transpose through shared memory (what makes the TF32 path slow, bench/results/lightning.md)."""
    if SPLIT_BF16:
        a_hi, a_lo = _split_bf16(a.to(tl.float32), UPCAST)
        b_hi, b_lo = _split_bf16(b.to(tl.float32), UPCAST)
        acc = tl.dot(a_lo, b_hi, acc=acc, input_precision=DOT_PRECISION)
        acc = tl.dot(a_hi, b_lo, acc=acc, input_precision=DOT_PRECISION)
        return tl.dot(a_hi, b_hi, acc=acc, input_precision=DOT_PRECISION)
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc=acc, input_precision=DOT_PRECISION)


@triton.jit
def _segment_program(g_ptr, seg_seq_ptr, seg_tau0_ptr, seq_bos_ptr, seq_len_ptr,
                     H: tl.constexpr, VD: tl.constexpr, SEG: tl.constexpr, BV: tl.constexpr):
    """What a segment kernel's program works on: its V block, head and segment (V block fastest, then head,
    then segment), the segment's sequence start and length, its first token within the sequence, its token
    count and the head's decay."""
    pid = tl.program_id(0).to(tl.int64)
    NV: tl.constexpr = (VD + BV - 1) // BV
    iv = pid % NV
    sh = pid // NV
    h = sh % H
    seg = sh // H
    n = tl.load(seg_seq_ptr + seg)
    tau0 = tl.load(seg_tau0_ptr + seg)
    bos = tl.load(seq_bos_ptr + n)
    slen = tl.load(seq_len_ptr + n)
    seg_len = tl.minimum(SEG, slen - tau0)
    g = tl.load(g_ptr + h).to(tl.float32)
    return iv, h, seg, tau0, bos, slen, seg_len, g


@triton.jit
def _segment_delta_kernel(
    k_ptr, v_ptr, g_ptr, delta_ptr,
    seg_seq_ptr, seg_tau0_ptr, seq_bos_ptr, seq_len_ptr,
    H: tl.constexpr, KD: tl.constexpr, VD: tl.constexpr, KP: tl.constexpr,
    SEG: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, REVERSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DYN_LOOP: tl.constexpr, SEG_CHUNKS: tl.constexpr, UPCAST: tl.constexpr,
    MASK_COLS: tl.constexpr, SPLIT_BF16: tl.constexpr = False, USE_TMA: tl.constexpr = False,
):
    """delta[seg, h, :, vblock] = sum over the segment's tokens of exp(g (end-1-t)) k_t^T v_t."""
    iv, h, seg, tau0, bos, slen, seg_len, g = _segment_program(
        g_ptr, seg_seq_ptr, seg_tau0_ptr, seq_bos_ptr, seq_len_ptr, H, VD, SEG, BV)

    offs_k = tl.arange(0, KP)
    offs_v = iv * BV + tl.arange(0, BV)
    mask_k = offs_k < KD
    mask_v = offs_v < VD
    tl.static_assert(not (USE_TMA and REVERSE), "TMA tiles in the forward order only")
    acc = _delta_loop(k_ptr, v_ptr, tau0, seg_len, slen, bos, h, g, iv, H, KD, VD, KP, C, BV, REVERSE,
                      DOT_PRECISION, DYN_LOOP, SEG_CHUNKS, UPCAST, MASK_COLS, SPLIT_BF16, USE_TMA)
    base = (seg * H + h) * (KD * VD)
    tl.store(delta_ptr + base + offs_k[:, None] * VD + offs_v[None, :], acc, mask=mask_k[:, None] & mask_v[None, :])


@triton.jit
def _delta_loop(k_ptr, v_ptr, tau0, seg_len, slen, bos, h, g, iv,
                H: tl.constexpr, KD: tl.constexpr, VD: tl.constexpr, KP: tl.constexpr, C: tl.constexpr,
                BV: tl.constexpr, REVERSE: tl.constexpr, DOT_PRECISION: tl.constexpr, DYN_LOOP: tl.constexpr,
                SEG_CHUNKS: tl.constexpr, UPCAST: tl.constexpr, MASK_COLS: tl.constexpr, SPLIT_BF16: tl.constexpr,
                USE_TMA: tl.constexpr):
    """sum over a segment's tokens of exp(g (end-1-t)) k_t^T v_t for one V block: ``[KP, BV]`` float32."""
    acc = tl.zeros([KP, BV], dtype=tl.float32)
    vi = _virtual_index(C, REVERSE)
    col_v = (iv * BV).to(tl.int32)
    if USE_TMA:
        k_desc = _seq_descriptor(k_ptr, bos, slen, H, KD, C, KP)
        v_desc = _seq_descriptor(v_ptr, bos, slen, H, VD, C, BV)
        col_k_head = (h * KD).to(tl.int32)  # the descriptors' columns span the heads
        col_v_head = (h * VD).to(tl.int32) + col_v
    # the interpreter needs a constant trip count (extra chunks are fully masked no-ops)
    for ci in range(0, tl.cdiv(seg_len, C) if DYN_LOOP else SEG_CHUNKS):
        c0 = ci * C
        cl = tl.maximum(tl.minimum(C, seg_len - c0), 0)
        if USE_TMA:
            row = (tau0 + c0).to(tl.int32)
            b_k = k_desc.load([row, col_k_head])
            b_v = v_desc.load([row, col_v_head])
        else:
            b_k = tl.load(_chunk_block(k_ptr, tau0, c0, cl, slen, bos, h, H, KD, 0, C, KP, REVERSE),
                          boundary_check=(0, 1) if MASK_COLS else (0,), padding_option="zero")
            b_v = tl.load(_chunk_block(v_ptr, tau0, c0, cl, slen, bos, h, H, VD, col_v, C, BV, REVERSE),
                          boundary_check=(0, 1) if MASK_COLS else (0,), padding_option="zero")
        w = tl.where(vi < cl, tl.exp(g * (cl - 1 - vi).to(tl.float32)), 0.0)
        kw = (b_k.to(tl.float32) * w[:, None]).to(b_v.dtype)
        acc = _mm(tl.trans(kw), b_v, acc * tl.exp(g * cl.to(tl.float32)), DOT_PRECISION, UPCAST, SPLIT_BF16)
    return acc


@triton.jit
def _scan_tile(delta_ptr, s_first, j, h, H: tl.constexpr, KD: tl.constexpr, VD: tl.constexpr, tile):
    """Pointers to a program's tile of the state slot of a sequence's segment j."""
    return delta_ptr + ((s_first + j) * H + h) * (KD * VD) + tile


@triton.jit
def _scan_load(delta_ptr, s_first, n_segs, j, h, H: tl.constexpr, KD: tl.constexpr, VD: tl.constexpr, tile, mask):
    """The delta of a sequence's segment j (zeros past its last segment)."""
    return tl.load(_scan_tile(delta_ptr, s_first, j, h, H, KD, VD, tile), mask=mask & (j < n_segs), other=0.0)


@triton.jit
def _segment_scan_kernel(
    delta_ptr, g_ptr, h0_ptr, ht_ptr, seq_seg0_ptr, seq_len_ptr,
    H: tl.constexpr, KD: tl.constexpr, VD: tl.constexpr, VP: tl.constexpr,
    SEG: tl.constexpr, BK: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
    DYN_LOOP: tl.constexpr, MAX_SEGS: tl.constexpr,
):
    """Per (sequence, head, K-block): replace each segment's delta by the state entering it; write S_T."""
    NK: tl.constexpr = (KD + BK - 1) // BK
    pid = tl.program_id(0).to(tl.int64)
    ik = pid % NK
    nh = pid // NK
    h = nh % H
    n = nh // H
    g = tl.load(g_ptr + h).to(tl.float32)
    slen = tl.load(seq_len_ptr + n)
    s_first = tl.load(seq_seg0_ptr + n)
    s_end = tl.load(seq_seg0_ptr + n + 1)
    offs_k = ik * BK + tl.arange(0, BK)
    offs_v = tl.arange(0, VP)
    mask = (offs_k < KD)[:, None] & (offs_v < VD)[None, :]
    tile = offs_k[:, None] * VD + offs_v[None, :]
    state_off = (n * H + h) * (KD * VD)
    if HAS_H0:
        S = tl.load(h0_ptr + state_off + tile, mask=mask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, VP], dtype=tl.float32)
    # Each step's delta is loaded four steps ahead (d0..d3 rotate): the loop is a chain, and Triton does not
    # pipeline these loads, so one DRAM round trip per segment bounded it (0.92 ms of a 17.7 ms forward at 1M,
    # 128 segments, on an H200; run of 09c75c5). Constant trip count for the interpreter; extra steps are masked.
    n_segs = s_end - s_first
    d0 = _scan_load(delta_ptr, s_first, n_segs, 0, h, H, KD, VD, tile, mask)
    d1 = _scan_load(delta_ptr, s_first, n_segs, 1, h, H, KD, VD, tile, mask)
    d2 = _scan_load(delta_ptr, s_first, n_segs, 2, h, H, KD, VD, tile, mask)
    d3 = _scan_load(delta_ptr, s_first, n_segs, 3, h, H, KD, VD, tile, mask)
    for j in range(0, n_segs if DYN_LOOP else MAX_SEGS):
        d4 = _scan_load(delta_ptr, s_first, n_segs, j + 4, h, H, KD, VD, tile, mask)
        tl.store(_scan_tile(delta_ptr, s_first, j, h, H, KD, VD, tile), S, mask=mask & (j < n_segs))
        seg_len = tl.maximum(tl.minimum(SEG, slen - j * SEG), 0)
        S = S * tl.exp(g * seg_len.to(tl.float32)) + d0
        d0, d1, d2, d3 = d1, d2, d3, d4
    if STORE_HT:
        tl.store(ht_ptr + state_off + tile, S, mask=mask)


@triton.jit
def _segment_output_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, state_ptr, o_ptr,
    seg_seq_ptr, seg_tau0_ptr, seq_bos_ptr, seq_len_ptr, scale,
    H: tl.constexpr, KD: tl.constexpr, VD: tl.constexpr, KP: tl.constexpr,
    SEG: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, REVERSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DYN_LOOP: tl.constexpr, SEG_CHUNKS: tl.constexpr, UPCAST: tl.constexpr,
    MASK_COLS: tl.constexpr,
    FACTORED_DECAY: tl.constexpr, SPLIT_BF16: tl.constexpr = False, USE_TMA: tl.constexpr = False,
    WEIGHT_K: tl.constexpr = False,
):
    """o of one (segment, head, V-block): walk the chunks from the entering state kept in registers."""
    iv, h, seg, tau0, bos, slen, seg_len, g = _segment_program(
        g_ptr, seg_seq_ptr, seg_tau0_ptr, seq_bos_ptr, seq_len_ptr, H, VD, SEG, BV)
    offs_k = tl.arange(0, KP)
    offs_v = iv * BV + tl.arange(0, BV)
    S = tl.load(state_ptr + (seg * H + h) * (KD * VD) + offs_k[:, None] * VD + offs_v[None, :],
                mask=(offs_k < KD)[:, None] & (offs_v < VD)[None, :], other=0.0)
    tl.static_assert(not (USE_TMA and REVERSE), "TMA tiles in the forward order only")
    _output_loop(q_ptr, k_ptr, v_ptr, o_ptr, S, tau0, seg_len, slen, bos, h, g, iv, scale, H, KD, VD, KP, C, BV,
                 REVERSE, DOT_PRECISION, DYN_LOOP, SEG_CHUNKS, UPCAST, MASK_COLS, FACTORED_DECAY, SPLIT_BF16, USE_TMA,
                 WEIGHT_K)


@triton.jit
def _output_loop(q_ptr, k_ptr, v_ptr, o_ptr, S, tau0, seg_len, slen, bos, h, g, iv, scale,
                 H: tl.constexpr, KD: tl.constexpr, VD: tl.constexpr, KP: tl.constexpr, C: tl.constexpr,
                 BV: tl.constexpr, REVERSE: tl.constexpr, DOT_PRECISION: tl.constexpr, DYN_LOOP: tl.constexpr,
                 SEG_CHUNKS: tl.constexpr, UPCAST: tl.constexpr, MASK_COLS: tl.constexpr,
                 FACTORED_DECAY: tl.constexpr, SPLIT_BF16: tl.constexpr, USE_TMA: tl.constexpr,
                 WEIGHT_K: tl.constexpr = False):
    """Write o of a segment's chunks for one V block, from the entering state ``S`` ``[KP, BV]`` float32."""
    vi = _virtual_index(C, REVERSE)
    col_v = (iv * BV).to(tl.int32)
    causal = vi[:, None] >= vi[None, :]
    if FACTORED_DECAY:
        # exp(g (t_i - t_j)) = exp(g (t_i - C/2)) * exp(-g (t_j - C/2)): two [C] vectors instead of a
        # [C, C] table held in registers; exact in float32 while |g| C / 2 stays far from 88 (host checks)
        row_decay = tl.exp(g * (vi - C // 2).to(tl.float32))
        col_decay = tl.exp(-g * (vi - C // 2).to(tl.float32))
    else:
        intra_decay = tl.exp(tl.where(causal, g * (vi[:, None] - vi[None, :]).to(tl.float32), float("-inf")))
    q_decay = tl.exp(g * (vi + 1).to(tl.float32))  # decay of the entering state seen by row i
    if USE_TMA:
        q_desc = _seq_descriptor(q_ptr, bos, slen, H, KD, C, KP)
        k_desc = _seq_descriptor(k_ptr, bos, slen, H, KD, C, KP)
        v_desc = _seq_descriptor(v_ptr, bos, slen, H, VD, C, BV)
        o_desc = _seq_descriptor(o_ptr, bos, slen, H, VD, C, BV)
        col_k_head = (h * KD).to(tl.int32)  # the descriptors' columns span the heads
        col_v_head = (h * VD).to(tl.int32) + col_v
    # the interpreter needs a constant trip count (extra chunks are fully masked no-ops)
    for ci in range(0, tl.cdiv(seg_len, C) if DYN_LOOP else SEG_CHUNKS):
        c0 = ci * C
        cl = tl.maximum(tl.minimum(C, seg_len - c0), 0)
        if USE_TMA:
            row = (tau0 + c0).to(tl.int32)
            b_q = q_desc.load([row, col_k_head])
            b_k = k_desc.load([row, col_k_head])
            b_v = v_desc.load([row, col_v_head])
        else:
            b_q = tl.load(_chunk_block(q_ptr, tau0, c0, cl, slen, bos, h, H, KD, 0, C, KP, REVERSE),
                          boundary_check=(0, 1) if MASK_COLS else (0,), padding_option="zero")
            b_k = tl.load(_chunk_block(k_ptr, tau0, c0, cl, slen, bos, h, H, KD, 0, C, KP, REVERSE),
                          boundary_check=(0, 1) if MASK_COLS else (0,), padding_option="zero")
            b_v = tl.load(_chunk_block(v_ptr, tau0, c0, cl, slen, bos, h, H, VD, col_v, C, BV, REVERSE),
                          boundary_check=(0, 1) if MASK_COLS else (0,), padding_option="zero")
        dt = b_v.dtype
        A = _mm(b_q, tl.trans(b_k), None, DOT_PRECISION, UPCAST, SPLIT_BF16)
        if FACTORED_DECAY:
            A = tl.where(causal, A * row_decay[:, None] * col_decay[None, :], 0.0)
        else:
            A = A * intra_decay
        # inter-chunk term: the decay of the entering state scales output rows (not q: fewer casts)
        b_o = _mm(b_q, S.to(dt), None, DOT_PRECISION, UPCAST, SPLIT_BF16) * q_decay[:, None]
        b_o = _mm(A.to(dt), b_v, b_o, DOT_PRECISION, UPCAST, SPLIT_BF16)
        if USE_TMA:
            o_desc.store([row, col_v_head], (b_o * scale).to(o_ptr.dtype.element_ty))
        else:
            tl.store(_chunk_block(o_ptr, tau0, c0, cl, slen, bos, h, H, VD, col_v, C, BV, REVERSE),
                     (b_o * scale).to(o_ptr.dtype.element_ty), boundary_check=(0, 1) if MASK_COLS else (0,))
        w = tl.where(vi < cl, tl.exp(g * (cl - 1 - vi).to(tl.float32)), 0.0)
        if WEIGHT_K:  # k_w^T from registers: a 32-bit product needs no transposed k copy (weight_k_wanted)
            kw = (b_k.to(tl.float32) * w[:, None]).to(dt)
            S = _mm(tl.trans(kw), b_v, S * tl.exp(g * cl.to(tl.float32)), DOT_PRECISION, UPCAST, SPLIT_BF16)
        else:
            vw = (b_v.to(tl.float32) * w[:, None]).to(dt)  # weight the [C, BV] tile, not the [C, K] one
            S = _mm(tl.trans(b_k), vw, S * tl.exp(g * cl.to(tl.float32)), DOT_PRECISION, UPCAST, SPLIT_BF16)


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, state_ptr, o_ptr, scale,
    H: tl.constexpr, KD: tl.constexpr, VD: tl.constexpr, KP: tl.constexpr, BV: tl.constexpr,
):
    """One token per sequence: S = exp(g) S + k^T v in place (float32), o = scale * q S."""
    NV: tl.constexpr = (VD + BV - 1) // BV
    pid = tl.program_id(0).to(tl.int64)
    iv = pid % NV
    bh = pid // NV
    h = bh % H
    offs_k = tl.arange(0, KP)
    offs_v = iv * BV + tl.arange(0, BV)
    mask_k = offs_k < KD
    mask_v = offs_v < VD
    mask = mask_k[:, None] & mask_v[None, :]
    g = tl.load(g_ptr + h).to(tl.float32)
    b_q = tl.load(q_ptr + bh * KD + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    b_k = tl.load(k_ptr + bh * KD + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    b_v = tl.load(v_ptr + bh * VD + offs_v, mask=mask_v, other=0.0).to(tl.float32)
    ptr = state_ptr + bh * (KD * VD) + offs_k[:, None] * VD + offs_v[None, :]
    S = tl.load(ptr, mask=mask, other=0.0)
    S = S * tl.exp(g) + b_k[:, None] * b_v[None, :]
    tl.store(ptr, S, mask=mask)
    o = tl.sum(b_q[:, None] * S, axis=0) * scale
    tl.store(o_ptr + bh * VD + offs_v, o, mask=mask_v)
