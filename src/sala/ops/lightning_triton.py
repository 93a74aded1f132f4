"""Lightning attention on GPU through Triton: prefill (forward + backward) and in-place batch decode.

Same semantics and layout as :mod:`sala.ops.lightning_reference` (SPEC section 3): q, k, v
``[B, T, H, D]``, per-head log decay ``g_gamma [H]``, float32 states ``[N, H, K, V]``, varlen through
``cu_seqlens`` with ``B == 1``. Kernels live in :mod:`sala.ops.lightning_triton_kernels`.

Precision: q/k/v in float32 or bfloat16 (float16 works too); every product accumulates in float32 and the
state stays float32. With float32 inputs the matrix products use TF32 by default (``precision="tf32"``,
what fla and so the release do); ``precision="ieee"`` gives full float32 products at a large speed cost;
``precision="bf16x3"`` splits each float32 operand into two bfloat16 halves and sums three bf16 products
(finer than TF32, ~2^-16 relative; measured slower than TF32: 11.8 ms at best against 9.0 ms for the TF32
default of the time and 5.9 ms for the current one, at T=131072 on an H200, bench/results/lightning.md).

Backward needs no new kernel: with dS_t the gradient flowing into S_t,

    dq = forward(do, v, k; initial S0^T)                       (same recurrence as o)
    dk = reverse(v, do, q; initial dS_T^T / (exp(g) scale))     (dS runs back in time)
    dv = reverse(k, q, do; initial dS_T / (exp(g) scale)),      dS0 = exp(g) scale * its final state

where ``forward(a, b, c)`` is the lightning forward with (q, k, v) = (a, b, c) and ``reverse`` runs each
sequence back to front. Each such pass is a state pass (``segment_states``: the state entering every segment,
from its second and third operands) and an output pass (``segment_outputs``). The state passes of dq and dk
need not run: dq's segment states are the forward's transposed (S0^T and sums of v^T k), dk's are dv's
transposed; so the backward runs one state pass and three output passes.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton

from . import lightning_triton_kernels as _kn
from .host_value import OncePerTensor

__all__ = ["lightning_attn_triton", "lightning_decode_triton", "lightning_forward", "choose_segment_len"]

CHUNK = 64
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
PRECISIONS = ("tf32", "ieee", "bf16x3")  # float32 products (bf16/fp16 inputs ignore it)


def _pad_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


# Output passes: (tokens per chunk, V block, warps, pipeline stages) per (input dtype, precision of float32
# products). bf16/fp16: the sweep's fastest at T=131072 on an H100 (bench/results/lightning.md). float32 with
# TF32: 64-token chunks (every product on wgmma, which needs 64 rows; 32-token chunks leave three of four on
# mma.sync), one stage, and the state update on decay-weighted k (``weight_k_wanted``: no transposed k copy in
# shared memory): two programs per SM; 6.12 against 8.79 ms for the former 32-token chunks on two stages at
# T=131072, same run on an H200 (run of cf76c0a). float32 "ieee": kept at 64 tokens and 8 warps (not measured
# otherwise). bf16x3 runs bf16 tiles, so it starts from bf16's settings.
_DEFAULT_CFG = {
    (torch.float32, "tf32"): (CHUNK, 64, 4, 1),
    (torch.float32, "ieee"): (CHUNK, 64, 8, 2),
    (torch.bfloat16, None): (CHUNK, 64, 4, 2),
    (torch.float16, None): (CHUNK, 64, 4, 2),
}

# Pass 1 (the segment deltas, forward and backward) where its settings differ from the output passes'. 16-bit
# inputs: one 128-wide V block (k is read once per V block; bf16 128K on an H200: pass 1 0.61 against 0.84 ms,
# the forward 2.14 against 2.42 ms, run of b031d6c). float32 TF32: the 32-token chunks and two stages it had
# when the output passes shared them (offline sm_90: 132 registers, 49 KB, three programs per SM).
_DELTA_CFG = {
    (torch.float32, "tf32"): {"C": 32, "num_stages": 2},
    (torch.bfloat16, None): {"BV": 128},
    (torch.float16, None): {"BV": 128},
}


def _cfg_key(dtype: torch.dtype, precision: str) -> tuple:
    if dtype == torch.float32 and precision != "bf16x3":
        return (dtype, precision)
    return (torch.bfloat16 if dtype == torch.float32 else dtype, None)


def _default_cfg(dtype: torch.dtype, precision: str) -> tuple[int, int, int, int]:
    return _DEFAULT_CFG.get(_cfg_key(dtype, precision), (CHUNK, 32, 8, 2))


def _launch_cfg(vd: int, dtype: torch.dtype, precision: str = "tf32", pass_one: bool = False) -> dict:
    """Chunk, block and warp choices (measured: see bench/results/lightning.md); the environment
    variables SALA_LIGHTNING_CHUNK / _BV / _WARPS / _STAGES override them (used by the benchmark).
    ``pass_one``: the segment-delta launch, which keeps its own defaults where it has them (``_DELTA_CFG``; the
    variables above reach it elsewhere) and whose chunk, V block, warps and stages SALA_LIGHTNING_DELTA_CHUNK /
    _DELTA_BV / _DELTA_WARPS / _DELTA_STAGES set apart (benchmark candidates: it reads k once per V block, so a
    wider block reads k fewer times, at more registers per program). SALA_LIGHTNING_MAXNREG caps the other
    passes' registers per thread (a benchmark candidate: more programs per SM at the price of spills;
    ``bench/sm90_offline.py`` counts both)."""
    chunk, bv, warps, stages = _default_cfg(dtype, precision)
    chunk = int(os.environ.get("SALA_LIGHTNING_CHUNK", chunk))
    bv = int(os.environ.get("SALA_LIGHTNING_BV", bv))
    warps = int(os.environ.get("SALA_LIGHTNING_WARPS", warps))
    stages = int(os.environ.get("SALA_LIGHTNING_STAGES", stages))
    if pass_one:  # its own defaults where it has them, then its own variables
        own = _DELTA_CFG.get(_cfg_key(dtype, precision), {})
        chunk = int(os.environ.get("SALA_LIGHTNING_DELTA_CHUNK", own.get("C", chunk)))
        bv = int(os.environ.get("SALA_LIGHTNING_DELTA_BV", own.get("BV", bv)))
        warps = int(os.environ.get("SALA_LIGHTNING_DELTA_WARPS", own.get("num_warps", warps)))
        stages = int(os.environ.get("SALA_LIGHTNING_DELTA_STAGES", own.get("num_stages", stages)))
    if chunk not in (16, 32, 64, 128):
        raise ValueError(f"SALA_LIGHTNING_CHUNK / _DELTA_CHUNK must be 16, 32, 64 or 128, got {chunk}")
    cfg = {
        # tokens per chunk (intra-chunk [C, C] tile); always divides the segment (a multiple of CHUNK)
        "C": chunk,
        "BV": min(bv, _pad_dim(vd)),
        "num_warps": warps,
        "num_stages": stages,
    }
    maxnreg = os.environ.get("SALA_LIGHTNING_MAXNREG")
    if maxnreg and not pass_one and not _INTERPRET:  # a compile option of the GPU backend only
        cfg["maxnreg"] = int(maxnreg)
    return cfg


# Segment rule per input width: (least (segment, head) pairs of parallel work, longest segment).
# 16-bit inputs: >= 512 pairs, up to 16384 tokens (8192 beat 4096 at T=131072 and 1M, H=32: 2.456 vs
# 2.571 ms and 19.38 vs 19.78 ms; 16384 beat 8192 at 1M: 16.66 / 16.65 vs 16.77 / 16.81 ms in two runs; same
# runs on an H200; fewer segment states to write, scan and read). 128K at H=32 keeps 8192 (512 pairs).
# float32: >= 512 pairs, up to 8192 tokens (8192 beat 4096 at 128K: 5.94 / 5.84 vs 6.10 / 5.92 ms in two runs
# on an H200, with the 64-token output chunks of cf76c0a; the H100 sweep had chosen 4096 with 32-token ones).
_SEG_RULE = {2: (512, 16384), 4: (512, 8192)}


def choose_segment_len(total_tokens: int, n_heads: int, dtype: torch.dtype = torch.float32) -> int:
    """Tokens per segment: as long as possible (fewer states in memory) while leaving enough
    (segment, head) pairs of parallel work (see ``_SEG_RULE``). A power of two in [64, max]."""
    env = os.environ.get("SALA_LIGHTNING_SEG")
    if env:
        return int(env)
    pairs, longest = _SEG_RULE[2 if dtype.itemsize <= 2 else 4]
    want = max(1, total_tokens * n_heads // pairs)
    seg = 1 << max(0, want.bit_length() - 1)
    return int(min(longest, max(CHUNK, seg)))


_TABLES: dict = {}


def _segment_table(lens: list[int], seg: int, device) -> tuple[torch.Tensor, ...]:
    """int64 tables: per segment (sequence, start); per sequence (bos, length, first segment). Cached per
    (lengths, segment length, device)."""
    key = (tuple(lens), seg, str(device))
    if key not in _TABLES:
        if len(_TABLES) >= 64:
            _TABLES.clear()
        _TABLES[key] = _build_segment_table(lens, seg, device)
    return _TABLES[key]


def _build_segment_table(lens: list[int], seg: int, device) -> tuple[torch.Tensor, ...]:
    lens_t = torch.tensor(lens, dtype=torch.int64)
    bos = torch.zeros_like(lens_t)
    if len(lens) > 1:
        bos[1:] = torch.cumsum(lens_t, 0)[:-1]
    nseg = (lens_t + seg - 1) // seg
    seg0 = torch.zeros(len(lens) + 1, dtype=torch.int64)
    seg0[1:] = torch.cumsum(nseg, 0)
    total = int(seg0[-1])
    seg_seq = torch.repeat_interleave(torch.arange(len(lens), dtype=torch.int64), nseg)
    seg_tau0 = (torch.arange(total, dtype=torch.int64) - seg0[seg_seq]) * seg
    return tuple(t.to(device) for t in (seg_seq, seg_tau0, bos, lens_t, seg0))


def _sequence_lengths(B: int, T: int, cu_seqlens: torch.Tensor | None) -> list[int]:
    if cu_seqlens is None:
        return [T] * B
    if B != 1:
        raise ValueError(f"with cu_seqlens the batch must be packed into B == 1, got B={B}")
    bounds = cu_seqlens.detach().to("cpu", torch.int64)
    if bounds.dim() != 1 or int(bounds[0]) != 0 or int(bounds[-1]) != T or bool((bounds[1:] < bounds[:-1]).any()):
        raise ValueError(f"cu_seqlens must be non-decreasing from 0 to T={T}, got {bounds.tolist()}")
    return (bounds[1:] - bounds[:-1]).tolist()


_DECAY_MAX = OncePerTensor(lambda g: float(g.detach().abs().max()))


def factored_decay_ok(g: torch.Tensor, chunk: int = CHUNK) -> bool:
    """Whether the intra-chunk decay of ``chunk``-token chunks may be factored as exp(g (i - C/2))
    exp(-g (j - C/2)): needs exp(|g| C / 2) far from float32 overflow (e^88). Reads g on the host, once per
    tensor and version: a layer passes the same decay tensor in every call, and a host sync per call would
    keep the CPU from queuing kernels ahead of the GPU."""
    return _DECAY_MAX(g) * (chunk // 2) < 60.0


@dataclass(frozen=True)
class _Plan:
    """How a packed batch is cut into segments and launched (shared by the state and output passes)."""

    lens: list[int]
    seg: int
    tables: tuple[torch.Tensor, ...]  # seg_seq, seg_tau0, seq_bos, seq_len, seq_seg0
    max_segs: int

    @property
    def nseg(self) -> int:
        return self.tables[0].numel()


def _plan(q: torch.Tensor, cu_seqlens: torch.Tensor | None, segment_len: int | None) -> _Plan:
    B, T, H, _ = q.shape
    lens = _sequence_lengths(B, T, cu_seqlens)
    seg = segment_len or choose_segment_len(B * T, H, q.dtype)
    if seg % CHUNK:
        raise ValueError(f"segment_len must be a multiple of {CHUNK}, got {seg}")
    return _Plan(lens, seg, _segment_table(lens, seg, q.device), max([-(-n // seg) for n in lens] + [1]))


def _common(plan: _Plan, H: int, KD: int, VD: int, q_dtype: torch.dtype, precision: str, reverse: bool,
            pass_one: bool = False) -> dict:
    cfg = _launch_cfg(VD, q_dtype, precision, pass_one)
    KP = _pad_dim(KD)
    return dict(H=H, KD=KD, VD=VD, KP=KP, SEG=plan.seg, C=cfg["C"], BV=cfg["BV"], REVERSE=reverse,
                DOT_PRECISION="tf32" if precision == "bf16x3" else precision,
                DYN_LOOP=not _INTERPRET, SEG_CHUNKS=-(-plan.seg // cfg["C"]), UPCAST=_INTERPRET,
                MASK_COLS=KP != KD or VD % cfg["BV"] != 0,
                SPLIT_BF16=precision == "bf16x3" and q_dtype == torch.float32,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                **({"maxnreg": cfg["maxnreg"]} if "maxnreg" in cfg else {}))


def _scratch(size: int, alignment: int, stream):
    """Global memory for the tensor descriptors a kernel builds on the device (Triton asks the allocator)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Give Triton an allocator for device-built descriptors unless the caller's context already has one
    (Triton keeps it per context: each thread that launches needs one). The check reads Triton 3.6's private
    state; where that differs, ours is set (an allocator of torch memory, as any caller's would be)."""
    try:
        from triton.runtime import _allocation

        if _allocation._allocator.get() is not _allocation._NULL_ALLOCATOR:
            return
    except (ImportError, AttributeError):
        pass
    triton.set_allocator(_scratch)


@functools.lru_cache(maxsize=None)
def _has_tma(device: torch.device) -> bool:
    """Hopper (sm_90) or newer: the TMA unit."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def tma_wanted(common: dict, pass_one: bool = False) -> bool:
    """Whether a launch with these settings moves its tiles with the TMA unit where the GPU has one (the
    default for the forward-order passes: a bf16 forward at 128K took 2.10 against 2.20 ms, forward+backward
    7.46 against 7.69 ms on an H200; bench/results/lightning.md). Off with SALA_LIGHTNING_TMA=0 (output passes) /
    SALA_LIGHTNING_DELTA_TMA=0 (pass 1); under the interpreter off unless set to 1. Needs head dims that are
    powers of two (the descriptor's box is the tile) and segments of whole chunks; not on the bf16x3 or ieee
    paths. Not in the reverse order, whose short last chunk starts at a negative row: the interpreter zero-fills
    it, the H200 stopped on an illegal instruction (the bf16 backward with a partial first chunk, run of 00ee18d)."""
    flag = os.environ.get("SALA_LIGHTNING_DELTA_TMA" if pass_one else "SALA_LIGHTNING_TMA", "0" if _INTERPRET else "1")
    return not (flag in ("", "0") or common["REVERSE"] or common["MASK_COLS"] or common["SPLIT_BF16"]
                or common["DOT_PRECISION"] != "tf32"
                or common["SEG"] % common["C"])  # a chunk cut by its segment's end would store into the next one


def _use_tma(common: dict, device: torch.device, pass_one: bool = False) -> bool:
    """``tma_wanted`` on a device that has the unit (sm_90+; any under the interpreter), with an allocator for
    the descriptors the kernels build."""
    if not tma_wanted(common, pass_one):
        return False
    if _INTERPRET:
        return True
    if not _has_tma(device):
        return False
    _ensure_allocator()
    return True


def weight_k_wanted(dtype: torch.dtype, precision: str = "tf32") -> bool:
    """Whether the output passes weight k (not v) by each token's decay to the chunk's end before the state
    update ``S += k_w^T v``: the weighted k^T then comes from registers, where a 32-bit (TF32) product takes it
    in any order, instead of a transposed copy of the k tile in shared memory (wgmma reads 32-bit operands
    K-major only). Offline sm_90, float32 64-token chunks on one stage: 115 against 147 KB of shared memory, two
    programs per SM instead of one. The float32 forward at 128K on an H200, V block 32: 8.10 ms with it, 16.25
    without; V block 64 (the default): 6.12 ms.
    The default for float32 inputs with TF32 products; 16-bit tiles transpose freely (bf16: 40 B of spill, no
    gain offline). SALA_LIGHTNING_WEIGHT_K=1/0 forces it; o and states are the same up to rounding either way."""
    env = os.environ.get("SALA_LIGHTNING_WEIGHT_K")
    if env is not None:
        return env not in ("", "0")
    return dtype == torch.float32 and precision == "tf32"


def segment_states(
    k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, plan: _Plan, initial_state: torch.Tensor | None = None,
    *, reverse: bool = False, output_final_state: bool = True, precision: str = "tf32",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Passes 1-2: the float32 state entering every segment ``[nseg, H, K, V]`` (from k and v only) and
    each sequence's final state ``[N, H, K, V]`` (None unless asked)."""
    _, _, H, KD = k.shape
    VD = v.shape[-1]
    nseg, N = plan.nseg, len(plan.lens)
    seg_seq, seg_tau0, seq_bos, seq_len = plan.tables[:4]
    states = torch.empty(max(nseg, 1), H, KD, VD, dtype=torch.float32, device=k.device)
    ht = torch.empty(N, H, KD, VD, dtype=torch.float32, device=k.device) if output_final_state else None
    if initial_state is not None:
        initial_state = initial_state.to(torch.float32).contiguous()
    if nseg:
        common = _common(plan, H, KD, VD, k.dtype, precision, reverse, pass_one=True)
        _kn._segment_delta_kernel[(nseg * H * triton.cdiv(VD, common["BV"]),)](
            k, v, g, states, seg_seq, seg_tau0, seq_bos, seq_len, **common,
            USE_TMA=_use_tma(common, k.device, pass_one=True))
    if nseg or output_final_state:
        scan_segments(states, g, plan, initial_state, ht)
    return states, ht


def scan_segments(states: torch.Tensor, g: torch.Tensor, plan: _Plan, initial_state: torch.Tensor | None,
                  ht: torch.Tensor | None) -> None:
    """Pass 2, in place: each segment's delta becomes the state entering it; each sequence's final state goes
    to ``ht`` (when given). One program per (sequence, head, K block of ``BK`` rows) walks the segments in order:
    SALA_LIGHTNING_SCAN_BK sets BK (a benchmark candidate: 16 doubles the programs of a long sequence, whose
    128 heads x K blocks at H=32 leave some of an H100's 132 SMs idle, each walking 128 segments at 1M)."""
    _, H, KD, VD = states.shape
    N = len(plan.lens)
    BK = int(os.environ.get("SALA_LIGHTNING_SCAN_BK", 16 if KD <= 64 else 32))
    _kn._segment_scan_kernel[(N * H * triton.cdiv(KD, BK),)](
        states, g, initial_state if initial_state is not None else states, ht if ht is not None else states,
        plan.tables[4], plan.tables[3], H=H, KD=KD, VD=VD, VP=_pad_dim(VD), SEG=plan.seg, BK=BK,
        HAS_H0=initial_state is not None, STORE_HT=ht is not None, num_warps=4,
        DYN_LOOP=not _INTERPRET, MAX_SEGS=plan.max_segs if _INTERPRET else 1,
    )


def segment_outputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, states: torch.Tensor, plan: _Plan,
    scale: float, *, reverse: bool = False, out_dtype: torch.dtype = torch.float32, precision: str = "tf32",
    factored_decay: bool | None = None,
) -> torch.Tensor:
    """Pass 3: o of every segment from the state entering it (``segment_states``)."""
    B, T, H, KD = q.shape
    VD = v.shape[-1]
    o = torch.empty(B, T, H, VD, dtype=out_dtype, device=q.device)
    if plan.nseg:
        seg_seq, seg_tau0, seq_bos, seq_len = plan.tables[:4]
        common = _common(plan, H, KD, VD, q.dtype, precision, reverse)
        # asked for (None: whenever safe) and safe at this launch's chunk length
        factored = factored_decay is not False and factored_decay_ok(g, common["C"])
        tma = _use_tma(common, q.device)
        _kn._segment_output_kernel[(plan.nseg * H * triton.cdiv(VD, common["BV"]),)](
            q, k, v, g, states, o, seg_seq, seg_tau0, seq_bos, seq_len, float(scale), **common,
            FACTORED_DECAY=factored, USE_TMA=tma, WEIGHT_K=weight_k_wanted(q.dtype, precision),
        )
    return o


def lightning_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    *,
    reverse: bool = False,
    out_dtype: torch.dtype = torch.float32,
    output_final_state: bool = True,
    precision: str = "tf32",
    segment_len: int | None = None,
    factored_decay: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Raw forward (no autograd). q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, all one dtype, contiguous.

    ``factored_decay=False`` forces the exact ``[C, C]`` intra-chunk decay table; otherwise the factored form
    is used wherever it is safe at the launch's chunk length (:func:`factored_decay_ok`, read once per ``g``)."""
    g = g.to(device=q.device, dtype=torch.float32).contiguous()
    plan = _plan(q, cu_seqlens, segment_len)
    states, ht = segment_states(k, v, g, plan, initial_state, reverse=reverse,
                                output_final_state=output_final_state, precision=precision)
    o = segment_outputs(q, k, v, g, states, plan, scale, reverse=reverse, out_dtype=out_dtype,
                        precision=precision, factored_decay=factored_decay)
    return o, ht


def _prepare(q, k, v):
    dtype = q.dtype if q.dtype in _SUPPORTED else torch.float32
    if not (k.dtype == v.dtype == dtype):
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
        dtype = dtype if dtype in _SUPPORTED else torch.float32
    return tuple(x.to(dtype).contiguous() for x in (q, k, v))


# The forward keeps its segment states for the backward (dq's states are their transposes) while they
# take at most this share of the bytes of q, k and v; past it (short segments, small head dims) the
# backward recomputes them instead (SALA_LIGHTNING_SAVED_STATES_SHARE overrides it; the benchmark's
# "sala-states-recomputed" variant sets 0). At H=32, D=128 and 8192-token segments the states are 4%.
SAVED_STATES_MAX_SHARE = 0.25


class _LightningAttn(torch.autograd.Function):
    """Backward in five passes instead of nine: dq's segment states are the transposes of the forward's
    (kept, or recomputed past ``SAVED_STATES_MAX_SHARE``), and dk's the transposes of dv's, so one state
    pass serves dk and dv (module docstring: the three backward recurrences)."""

    @staticmethod
    def forward(ctx, q, k, v, g, scale, initial_state, cu_seqlens, out_dtype, precision, segment_len):
        ctx.set_materialize_grads(False)
        qc, kc, vc = _prepare(q, k, v)
        gf = g.to(device=qc.device, dtype=torch.float32).contiguous()
        kw = dict(precision=precision)
        plan = _plan(qc, cu_seqlens, segment_len)
        states, ht = segment_states(kc, vc, gf, plan, initial_state, **kw)
        o = segment_outputs(qc, kc, vc, gf, states, plan, scale, out_dtype=out_dtype, **kw)
        qkv_bytes = sum(x.numel() * x.element_size() for x in (qc, kc, vc))
        share = float(os.environ.get("SALA_LIGHTNING_SAVED_STATES_SHARE", SAVED_STATES_MAX_SHARE))
        keep = plan.nseg > 0 and states.numel() * 4 <= share * qkv_bytes
        ctx.save_for_backward(qc, kc, vc, gf, initial_state, states if keep else None)
        ctx.scale, ctx.plan, ctx.kw = scale, plan, kw
        ctx.in_dtypes = (q.dtype, k.dtype, v.dtype)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0, states = ctx.saved_tensors
        scale, plan, kw = ctx.scale, ctx.plan, ctx.kw
        if do is None:
            do = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
        do = do.to(q.dtype).contiguous()
        # dq = forward(do, v, k; S0^T): its states are the forward's, transposed
        if states is None:
            h0t = h0.float().transpose(-1, -2).contiguous() if h0 is not None else None
            states_t, _ = segment_states(v, k, g, plan, h0t, output_final_state=False, **kw)
        else:
            states_t = states.transpose(-1, -2).contiguous()
        dq = segment_outputs(do, v, k, g, states_t, plan, scale, out_dtype=ctx.in_dtypes[0], **kw)
        del states_t
        # dv = reverse(k, q, do; dS_T) and dk = reverse(v, do, q; dS_T^T): one state pass for both
        # (dS_t gets exp(g)^(T-t) dht; the reversed forward applies exp(g)^(t'), one step more)
        init = (dht.float() * torch.exp(-g)[None, :, None, None] / scale).contiguous() if dht is not None else None
        need_dh0 = h0 is not None and ctx.needs_input_grad[5]
        ds_states, dsf = segment_states(q, do, g, plan, init, reverse=True, output_final_state=need_dh0, **kw)
        dv = segment_outputs(k, q, do, g, ds_states, plan, scale, reverse=True, out_dtype=ctx.in_dtypes[2], **kw)
        ds_states = ds_states.transpose(-1, -2).contiguous()
        dk = segment_outputs(v, do, q, g, ds_states, plan, scale, reverse=True, out_dtype=ctx.in_dtypes[1], **kw)
        dh0 = (dsf * (torch.exp(g) * scale)[None, :, None, None]).to(h0.dtype) if need_dh0 else None
        return dq, dk, dv, None, None, dh0, None, None, None, None


def lightning_attn_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_gamma: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype = torch.float32,
    precision: str = "tf32",
    segment_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked lightning attention; differentiable in q, k, v and ``initial_state``.

    Returns (o ``[B, T, H, V]`` in ``out_dtype``, final states float32 ``[N, H, K, V]``).
    """
    if q.dim() != 4 or k.shape[:3] != q.shape[:3] or v.shape[:3] != q.shape[:3] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"expected q, k [B, T, H, K] and v [B, T, H, V]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if g_gamma.shape != (q.shape[2],):
        raise ValueError(f"g_gamma must have shape [H]=[{q.shape[2]}], got {tuple(g_gamma.shape)}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None and tuple(initial_state.shape) != (N, q.shape[2], q.shape[3], v.shape[3]):
        raise ValueError(f"initial_state must be [N, H, K, V], got {tuple(initial_state.shape)}")
    if g_gamma.requires_grad:
        g_gamma = g_gamma.detach()  # the decay is a fixed function of the head count (SPEC 3)
    return _LightningAttn.apply(q, k, v, g_gamma, scale, initial_state, cu_seqlens, out_dtype, precision, segment_len)


def lightning_decode_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_gamma: torch.Tensor,
    state: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """One token per sequence: q, k ``[B, H, K]``, v ``[B, H, V]``; ``state [B, H, K, V]`` float32 and
    contiguous is updated in place. Returns o float32 ``[B, H, V]``."""
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError("lightning decode state must be a contiguous float32 tensor")
    B, H, KD = q.shape
    VD = v.shape[-1]
    if tuple(state.shape) != (B, H, KD, VD):
        raise ValueError(f"state must be [B, H, K, V]=[{B}, {H}, {KD}, {VD}], got {tuple(state.shape)}")
    scale = KD**-0.5 if scale is None else float(scale)
    q, k, v = (x.contiguous() for x in (q, k, v))
    g = g_gamma.to(device=q.device, dtype=torch.float32).contiguous()
    o = torch.empty(B, H, VD, dtype=torch.float32, device=q.device)
    BV = min(32, _pad_dim(VD))
    grid = (B * H * triton.cdiv(VD, BV),)
    _kn._decode_kernel[grid](q, k, v, g, state, o, scale, H=H, KD=KD, VD=VD, KP=_pad_dim(KD), BV=BV, num_warps=4)
    return o
