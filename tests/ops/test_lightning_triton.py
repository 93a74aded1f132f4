"""Triton lightning kernels against the reference, on random inputs.

Without CUDA the kernels run through the Triton interpreter (TRITON_INTERPRET=1, set here before the
kernels module is first imported) at small shapes; with CUDA the same tests run at real shapes (head dims
64/128, thousands of tokens, 9 and 32 heads). float32 inputs use TF32 products on the GPU (as fla does),
hence the GPU tolerance; ``precision="ieee"`` is checked tightly.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sala.ops import dispatch  # noqa: E402
from sala.ops.lightning_reference import (  # noqa: E402
    lightning_attn_chunked,
    lightning_attn_recurrent,
    lightning_decay,
    lightning_decode_step,
)
from sala.ops.lightning_triton import lightning_attn_triton, lightning_decode_triton  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
# (T, H, D, segment_len): small under the interpreter, real on the GPU. segment_len forces several
# segments per sequence so the cross-segment scan is exercised.
SHAPES = [(3000, 9, 64, 1024), (4100, 32, 128, None)] if CUDA else [(150, 3, 16, 64), (200, 2, 32, 128)]
TOL = {torch.float32: 5e-3 if CUDA else 1e-5, torch.bfloat16: 2e-2}


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert torch.isfinite(a).all()
    return float((a - b).norm() / b.norm())


def rand(*shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(device=DEV, dtype=dtype)


def inputs(B, T, H, D, dtype, seed):
    return tuple(rand(B, T, H, D, dtype=dtype, seed=seed + i) for i in range(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_h0", [False, True])
def test_forward_matches_float64(shape, dtype, with_h0):
    T, H, D, seg = shape
    q, k, v = inputs(2, T, H, D, dtype, seed=1)
    g = lightning_decay(H).to(DEV)
    h0 = rand(2, H, D, D, seed=9) if with_h0 else None
    o, s = lightning_attn_triton(q, k, v, g, initial_state=h0, segment_len=seg)
    assert o.dtype == torch.float32 and s.dtype == torch.float32 and o.shape == (2, T, H, D)
    ro, rs = lightning_attn_recurrent(*(x.cpu() for x in (q, k, v)), g.cpu(), initial_state=None if h0 is None else h0.cpu(),
                                      dtype=torch.float64) if not CUDA else lightning_attn_chunked(
        *(x.double() for x in (q, k, v)), g, initial_state=None if h0 is None else h0.double())
    assert rel(o, ro) < TOL[dtype]
    assert rel(s, rs) < TOL[dtype]


def test_ieee_precision_is_tight():
    T, H, D, seg = SHAPES[0]
    q, k, v = inputs(1, T, H, D, torch.float32, seed=2)
    g = lightning_decay(H).to(DEV)
    o, s = lightning_attn_triton(q, k, v, g, precision="ieee", segment_len=seg)
    ro, rs = lightning_attn_chunked(*(x.double() for x in (q, k, v)), g)
    assert rel(o, ro) < 1e-5 and rel(s, rs) < 1e-5


@pytest.mark.parametrize("with_h0", [False, True])
def test_bf16x3_precision_is_finer_than_bf16(with_h0):
    """precision="bf16x3" (float32 operands as two bfloat16 halves, three products): close to float64
    (~2^-16 relative), far tighter than one bf16 product (~3e-3) and than TF32 (the GPU tolerance)."""
    T, H, D, seg = SHAPES[0]
    q, k, v = inputs(2, T, H, D, torch.float32, seed=16)
    g = lightning_decay(H).to(DEV)
    h0 = rand(2, H, D, D, seed=17) if with_h0 else None
    o, s = lightning_attn_triton(q, k, v, g, initial_state=h0, precision="bf16x3", segment_len=seg)
    ro, rs = lightning_attn_chunked(*(x.double() for x in (q, k, v)), g,
                                    initial_state=None if h0 is None else h0.double())
    assert rel(o, ro) < 2e-4 and rel(s, rs) < 2e-4
    qb, kb, vb = (x.bfloat16() for x in (q, k, v))
    ob, _ = lightning_attn_triton(qb, kb, vb, g, initial_state=h0, segment_len=seg)
    assert rel(o, ro) < rel(ob, ro) / 10  # the lo halves really contribute


def test_bf16x3_backward_matches_reference_autograd():
    H, D = (3, 32) if not CUDA else (9, 64)
    B, T = 2, (150 if not CUDA else 2500)
    q, k, v = (x.requires_grad_(True) for x in inputs(B, T, H, D, torch.float32, seed=18))
    g = lightning_decay(H).to(DEV)
    h0 = rand(B, H, D, D, seed=19).requires_grad_(True)
    do, dht = rand(B, T, H, D, seed=20), rand(B, H, D, D, seed=21)
    seg = 64 if not CUDA else 512
    ours = grads_of(lambda a, b, c, h: lightning_attn_triton(a, b, c, g, initial_state=h, segment_len=seg,
                                                             precision="bf16x3"), [q, k, v, h0], do, dht)
    leaves64 = [x.detach().double().requires_grad_(True) for x in (q, k, v, h0)]
    ref = grads_of(lambda a, b, c, h: lightning_attn_chunked(a, b, c, g, initial_state=h), leaves64,
                   do.double(), dht.double())
    for a, b in zip(ours, ref):
        assert rel(a, b) < 2e-4


LAUNCH_ENV = ("SALA_LIGHTNING_CHUNK", "SALA_LIGHTNING_BV", "SALA_LIGHTNING_WARPS", "SALA_LIGHTNING_STAGES",
              "SALA_LIGHTNING_SEG", "SALA_LIGHTNING_DELTA_CHUNK", "SALA_LIGHTNING_DELTA_BV", "SALA_LIGHTNING_DELTA_WARPS",
              "SALA_LIGHTNING_MAXNREG", "SALA_LIGHTNING_TMA", "SALA_LIGHTNING_DELTA_TMA", "SALA_LIGHTNING_SCAN_BK",
              "SALA_LIGHTNING_DELTA_STAGES", "SALA_LIGHTNING_WEIGHT_K")


def test_launch_defaults_are_the_measured_winners(monkeypatch):
    """bench/results/lightning.md: float32 with TF32 runs its output passes on 64-token chunks, one stage and the
    state update on weighted k (6.12 vs 8.79 ms at 128K for the 32-token chunks it had, H200), pass 1 on 32-token
    chunks and two stages; the ieee path keeps 64-token chunks on 8 warps; bf16 (and bf16x3's bf16 tiles) 64-token
    chunks on 4 warps; 16-bit inputs take segments up to 16384 tokens, float32 up to 8192."""
    from sala.ops.lightning_triton import _launch_cfg, choose_segment_len, weight_k_wanted

    for var in LAUNCH_ENV:
        monkeypatch.delenv(var, raising=False)

    def cfg(dtype, precision="tf32"):
        c = _launch_cfg(128, dtype, precision)
        return c["C"], c["BV"], c["num_warps"], c["num_stages"]

    assert cfg(torch.float32) == (64, 64, 4, 1)
    one = _launch_cfg(128, torch.float32, "tf32", pass_one=True)
    assert (one["C"], one["BV"], one["num_warps"], one["num_stages"]) == (32, 64, 4, 2)  # pass 1 keeps its own
    assert _launch_cfg(128, torch.bfloat16, pass_one=True)["BV"] == 128
    assert weight_k_wanted(torch.float32) and not weight_k_wanted(torch.bfloat16)
    assert not weight_k_wanted(torch.float32, "ieee") and not weight_k_wanted(torch.float32, "bf16x3")
    monkeypatch.setenv("SALA_LIGHTNING_WEIGHT_K", "0")
    assert not weight_k_wanted(torch.float32)
    monkeypatch.setenv("SALA_LIGHTNING_WEIGHT_K", "1")
    assert weight_k_wanted(torch.bfloat16)
    monkeypatch.delenv("SALA_LIGHTNING_WEIGHT_K")
    assert cfg(torch.float32, "ieee") == (64, 64, 8, 2)
    assert cfg(torch.bfloat16) == cfg(torch.float16) == cfg(torch.float32, "bf16x3") == (64, 64, 4, 2)
    assert _launch_cfg(32, torch.float32)["BV"] == 32  # never wider than the padded head dim
    assert choose_segment_len(131072, 32, torch.bfloat16) == 8192
    assert choose_segment_len(1 << 20, 32, torch.bfloat16) == 16384
    assert choose_segment_len(8192, 32, torch.bfloat16) == 512
    assert choose_segment_len(131072, 32, torch.float32) == choose_segment_len(1 << 20, 32) == 8192
    assert choose_segment_len(65536, 32, torch.float32) == 4096
    assert choose_segment_len(200, 3, torch.bfloat16) == 64
    monkeypatch.setenv("SALA_LIGHTNING_CHUNK", "16")
    assert cfg(torch.float32, "ieee")[0] == 16


def test_register_cap_reaches_the_gpu_launches_only(monkeypatch):
    """SALA_LIGHTNING_MAXNREG: a launch option of the output passes on the GPU backend; pass 1 and the
    interpreter never see it."""
    from sala.ops import lightning_triton as lt
    from sala.ops.lightning_triton import _launch_cfg

    monkeypatch.setenv("SALA_LIGHTNING_MAXNREG", "168")
    monkeypatch.setattr(lt, "_INTERPRET", False)
    assert _launch_cfg(128, torch.bfloat16)["maxnreg"] == 168
    assert "maxnreg" not in _launch_cfg(128, torch.bfloat16, pass_one=True)
    monkeypatch.setattr(lt, "_INTERPRET", True)
    assert "maxnreg" not in _launch_cfg(128, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_settings_match_float64(dtype, monkeypatch):
    """No segment length, precision or launch setting given: the library defaults (float32: TF32 with
    32-token chunks; bf16: 64-token chunks, the 16-bit segment rule) over several segments, forward,
    final state and gradients against float64 autograd of the reference."""
    for var in LAUNCH_ENV:
        monkeypatch.delenv(var, raising=False)
    H, D = (3, 32) if not CUDA else (9, 128)
    T = 200 if not CUDA else 20000  # 4 segments of 64 tokens (interpreter); 79 of 256 (GPU, bf16)
    q, k, v = (x.requires_grad_(True) for x in inputs(2, T, H, D, dtype, seed=26))
    g = lightning_decay(H).to(DEV)
    h0 = rand(2, H, D, D, seed=27).requires_grad_(True)
    do, dht = rand(2, T, H, D, seed=28), rand(2, H, D, D, seed=29)
    o, s = lightning_attn_triton(q, k, v, g, initial_state=h0)
    ours = grads_of(lambda a, b, c, h: lightning_attn_triton(a, b, c, g, initial_state=h), [q, k, v, h0], do, dht)
    leaves64 = [x.detach().double().requires_grad_(True) for x in (q, k, v, h0)]
    ro, rs = lightning_attn_chunked(*leaves64[:3], g, initial_state=leaves64[3])
    assert rel(o, ro) < TOL[dtype] and rel(s, rs) < TOL[dtype]
    ref = grads_of(lambda a, b, c, h: lightning_attn_chunked(a, b, c, g, initial_state=h), leaves64,
                   do.double(), dht.double())
    assert [a.dtype for a in ours] == [dtype, dtype, dtype, torch.float32]
    for a, b in zip(ours, ref):
        assert rel(a, b) < (TOL[dtype] if dtype == torch.float32 else 3e-2)


@pytest.mark.parametrize("chunk,seg", [(32, 64), (128, 64), (128, 256)])
def test_other_chunk_lengths_match_reference(chunk, seg, monkeypatch):
    """SALA_LIGHTNING_CHUNK=32 / 128 on the ieee path (whose default stays 64): forward and gradients equal
    the 64-token chunking's reference, with several segments per sequence and an initial state; 128-token
    chunks longer than the segment (its one chunk partly masked) and spanning two 64-token ones."""
    from sala.ops.lightning_triton import _launch_cfg

    monkeypatch.setenv("SALA_LIGHTNING_CHUNK", str(chunk))
    assert _launch_cfg(32, torch.float32, "ieee")["C"] == chunk
    H, D = (3, 32) if not CUDA else (9, 64)
    T, seg = (150 if seg < 256 else 600, seg) if not CUDA else (2500, 512)
    q, k, v = (x.requires_grad_(True) for x in inputs(2, T, H, D, torch.float32, seed=22))
    g = lightning_decay(H).to(DEV)
    h0 = rand(2, H, D, D, seed=23).requires_grad_(True)
    do, dht = rand(2, T, H, D, seed=24), rand(2, H, D, D, seed=25)
    ours = grads_of(lambda a, b, c, h: lightning_attn_triton(a, b, c, g, initial_state=h, segment_len=seg,
                                                             precision="ieee"), [q, k, v, h0], do, dht)
    o, s = lightning_attn_triton(q, k, v, g, initial_state=h0, segment_len=seg, precision="ieee")
    leaves64 = [x.detach().double().requires_grad_(True) for x in (q, k, v, h0)]
    ro, rs = lightning_attn_chunked(*leaves64[:3], g, initial_state=leaves64[3])
    assert rel(o, ro) < 1e-5 and rel(s, rs) < 1e-5
    ref = grads_of(lambda a, b, c, h: lightning_attn_chunked(a, b, c, g, initial_state=h), leaves64,
                   do.double(), dht.double())
    for a, b in zip(ours, ref):
        assert rel(a, b) < 1e-5


@pytest.mark.parametrize("delta_bv,delta_warps,delta_chunk", [("16", None, None), ("128", "8", None),
                                                               (None, "8", None), (None, None, "128")])
def test_pass_one_launch_overrides_match_float64(delta_bv, delta_warps, delta_chunk, monkeypatch):
    """SALA_LIGHTNING_DELTA_BV / _DELTA_WARPS / _DELTA_CHUNK change only pass 1's launch (its V blocks and
    chunks need not be the output pass's): forward, final state and gradients (the backward's reverse pass 1
    too) still equal float64."""
    from sala.ops.lightning_triton import _common, _plan

    for var in LAUNCH_ENV:
        monkeypatch.delenv(var, raising=False)
    for var, val in (("SALA_LIGHTNING_DELTA_BV", delta_bv), ("SALA_LIGHTNING_DELTA_WARPS", delta_warps),
                     ("SALA_LIGHTNING_DELTA_CHUNK", delta_chunk)):
        if val is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, val)
    H, D = (2, 32) if not CUDA else (9, 128)
    T, seg = (200, 64) if not CUDA else (5000, 1024)
    q, k, v = (x.requires_grad_(True) for x in inputs(1, T, H, D, torch.float32, seed=31))
    plan = _plan(q, None, seg)
    base = _common(plan, H, D, D, q.dtype, "ieee", False)
    cfg = _common(plan, H, D, D, q.dtype, "ieee", False, pass_one=True)
    assert cfg["BV"] == (min(int(delta_bv), D) if delta_bv else base["BV"])
    assert cfg["num_warps"] == (int(delta_warps) if delta_warps else base["num_warps"])
    assert cfg["C"] == (int(delta_chunk) if delta_chunk else base["C"]) and base["C"] == 64
    g = lightning_decay(H).to(DEV)
    do, dht = rand(1, T, H, D, seed=32), rand(1, H, D, D, seed=33)
    run = lambda a, b, c: lightning_attn_triton(a, b, c, g, segment_len=seg, precision="ieee")  # noqa: E731
    o, s = run(q, k, v)
    ours = grads_of(lambda a, b, c: run(a, b, c), [q, k, v], do, dht)
    leaves64 = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    ro, rs = lightning_attn_chunked(*leaves64, g)
    assert rel(o, ro) < 1e-5 and rel(s, rs) < 1e-5
    ref = grads_of(lambda a, b, c: lightning_attn_chunked(a, b, c, g), leaves64, do.double(), dht.double())
    for a, b in zip(ours, ref):
        assert rel(a, b) < 1e-5


class _LaunchRecorder:
    """Stands in for a Triton kernel: ``rec[grid](*args, **kw)`` notes kw, then launches the real one."""

    def __init__(self, kernel, calls: list):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.calls.append(kw)
            return self.kernel[grid](*args, **kw)
        return launch


@pytest.mark.parametrize("dtype,precision", [(torch.float32, "ieee"), (torch.float32, "tf32"), (torch.bfloat16, "tf32")])
def test_weighted_k_state_update_matches_float64(dtype, precision, monkeypatch):
    """SALA_LIGHTNING_WEIGHT_K=1: the output passes (forward and the backward's three) update the state from
    decay-weighted k instead of weighted v, on 64-token chunks and one stage in the output passes only
    (SALA_LIGHTNING_DELTA_STAGES keeps pass 1's): forward, final state and gradients still equal float64, over
    several segments with an initial state."""
    from sala.ops import lightning_triton as lt

    for var in LAUNCH_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SALA_LIGHTNING_WEIGHT_K", "1")
    monkeypatch.setenv("SALA_LIGHTNING_CHUNK", "64")
    monkeypatch.setenv("SALA_LIGHTNING_STAGES", "1")
    monkeypatch.setenv("SALA_LIGHTNING_DELTA_STAGES", "2")
    assert lt.weight_k_wanted(dtype, precision)
    assert lt._launch_cfg(128, dtype, precision)["num_stages"] == 1
    assert lt._launch_cfg(128, dtype, precision, pass_one=True)["num_stages"] == 2
    launches = []
    real = lt._kn._segment_output_kernel
    monkeypatch.setattr(lt._kn, "_segment_output_kernel", _LaunchRecorder(real, launches))
    H, D = (2, 32) if not CUDA else (9, 128)
    T, seg = (300, 128) if not CUDA else (5000, 1024)  # segments of several chunks: the state update matters
    q, k, v = (x.requires_grad_(True) for x in inputs(1, T, H, D, dtype, seed=61))
    g = lightning_decay(H).to(DEV)
    h0 = rand(1, H, D, D, seed=62).requires_grad_(True)
    do, dht = rand(1, T, H, D, seed=63), rand(1, H, D, D, seed=64)
    run = lambda a, b, c, h: lightning_attn_triton(a, b, c, g, initial_state=h, segment_len=seg,  # noqa: E731
                                                    precision=precision)
    o, s = run(q, k, v, h0)
    ours = grads_of(run, [q, k, v, h0], do, dht)
    assert launches and all(kw["WEIGHT_K"] for kw in launches)  # the forward's and the backward's output passes
    leaves64 = [x.detach().double().requires_grad_(True) for x in (q, k, v, h0)]
    ro, rs = lightning_attn_chunked(*leaves64[:3], g, initial_state=leaves64[3])
    tol = 1e-5 if precision == "ieee" else TOL[dtype]
    assert rel(o, ro) < tol and rel(s, rs) < tol
    ref = grads_of(lambda a, b, c, h: lightning_attn_chunked(a, b, c, g, initial_state=h), leaves64,
                   do.double(), dht.double())
    for a, b in zip(ours, ref):
        assert rel(a, b) < (tol if dtype == torch.float32 else 3e-2)


@pytest.mark.parametrize("bk", ["8", "32"])
def test_scan_k_blocks_match_reference(bk, monkeypatch):
    """SALA_LIGHTNING_SCAN_BK: pass 2's K rows per program (default 16 at head dim 32) changes nothing but the
    launch: states, outputs and the final state across several segments and sequences still equal float64."""
    for var in LAUNCH_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SALA_LIGHTNING_SCAN_BK", bk)
    q, k, v, cu, g, h0 = varlen_batch(torch.float32, seed=51)
    o, s = lightning_attn_triton(q, k, v, g, initial_state=h0, cu_seqlens=cu, segment_len=64 if not CUDA else 512,
                                 precision="ieee")
    ro, rs = lightning_attn_chunked(*(x.double() for x in (q, k, v)), g, initial_state=h0.double(), cu_seqlens=cu)
    assert rel(o, ro) < 1e-5 and rel(s, rs) < 1e-5
    # sequences of many segments (the scan loads each delta four segments ahead): 11 and 6 segments
    lens = [700, 0, 350] if not CUDA else [11 * 512 - 3, 0, 6 * 512]
    cu = torch.tensor([0] + lens, device=DEV).cumsum(0)
    q, k, v = inputs(1, sum(lens), 2, 16 if not CUDA else 64, torch.float32, seed=52)
    g = lightning_decay(2).to(DEV) * 0.05  # weak decay: early segments still weigh in the final state
    o, s = lightning_attn_triton(q, k, v, g, cu_seqlens=cu, segment_len=64 if not CUDA else 512, precision="ieee")
    ro, rs = lightning_attn_chunked(*(x.double() for x in (q, k, v)), g, cu_seqlens=cu)
    assert rel(o, ro) < 1e-5 and rel(s, rs) < 1e-5


def test_strong_and_zero_decay_take_the_exact_path():
    """|g| C / 2 past float32's exp range disables the factored intra-chunk decay; g = 0 is no decay."""
    from sala.ops.lightning_triton import factored_decay_ok

    g = torch.tensor([-3.0, -0.01, 0.0], device=DEV)
    assert not factored_decay_ok(g) and factored_decay_ok(g[1:])
    # the bound scales with the chunk: |g| 64 / 2 = 28.8 is safe, |g| 128 / 2 = 57.6 too, 256 / 2 is not
    assert factored_decay_ok(g[:1] * 0.3, 64) and factored_decay_ok(g[:1] * 0.3, 128)
    assert not factored_decay_ok(g[:1] * 0.3, 256)
    T, _, D, seg = SHAPES[0]
    q, k, v = inputs(1, T, 3, D, torch.float32, seed=15)
    for gg in (g, g[1:].repeat(2)[:3]):
        o, s = lightning_attn_triton(q, k, v, gg, precision="ieee", segment_len=seg)
        ro, rs = lightning_attn_chunked(*(x.double() for x in (q, k, v)), gg)
        assert rel(o, ro) < 1e-5 and rel(s, rs) < 1e-5


def test_bf16_output_dtype_and_segment_lengths_agree():
    T, H, D, _ = SHAPES[0]
    q, k, v = inputs(1, T, H, D, torch.bfloat16, seed=3)
    g = lightning_decay(H).to(DEV)
    o1, s1 = lightning_attn_triton(q, k, v, g, out_dtype=torch.bfloat16, segment_len=64)
    o2, s2 = lightning_attn_triton(q, k, v, g, out_dtype=torch.float32, segment_len=128)
    assert o1.dtype == torch.bfloat16
    assert rel(o1, o2) < 1e-2 and rel(s1, s2) < 1e-4


# an empty sequence, a single token, exact chunk multiples and partial chunks
VARLEN = [70, 0, 1, 129, 64] if not CUDA else [1500, 0, 1, 2049, 64, 777]
VARLEN_HD = (3, 32) if not CUDA else (9, 128)


def varlen_batch(dtype, seed):
    """The VARLEN batch packed in one row: q, k, v, cu_seqlens, decay, one initial state per sequence."""
    H, D = VARLEN_HD
    T = sum(VARLEN)
    cu = torch.tensor([0] + VARLEN, device=DEV).cumsum(0)
    q, k, v = inputs(1, T, H, D, dtype, seed=seed)
    return q, k, v, cu, lightning_decay(H).to(DEV), rand(len(VARLEN), H, D, D, seed=seed + 6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_matches_reference(dtype, monkeypatch):
    for var in LAUNCH_ENV:
        monkeypatch.delenv(var, raising=False)
    q, k, v, cu, g, h0 = varlen_batch(dtype, seed=4)
    o, s = lightning_attn_triton(q, k, v, g, initial_state=h0, cu_seqlens=cu, segment_len=64 if not CUDA else 512)
    ro, rs = lightning_attn_chunked(*(x.double() for x in (q, k, v)), g, initial_state=h0.double(), cu_seqlens=cu)
    assert rel(o, ro) < TOL[dtype] and rel(s, rs) < TOL[dtype]
    assert torch.equal(s[1], h0[1])  # the empty sequence passes its state through


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tma_tiles_match_block_pointers(dtype, monkeypatch):
    """SALA_LIGHTNING_TMA=1 / _DELTA_TMA=1: the output pass and pass 1 move their tiles through tensor
    descriptors bounded at each sequence's ends (zero rows outside, stores dropped) instead of boundary-checked
    block pointers. Varlen with partial chunks, an empty and a one-token sequence: forward, state and gradients
    (the backward's forward-order output pass takes descriptors too) equal the block-pointer path's and float64."""
    from sala.ops import lightning_triton as lt

    for var in LAUNCH_ENV:
        monkeypatch.delenv(var, raising=False)
    q, k, v, cu, g, h0 = (x.requires_grad_(True) if x.is_floating_point() and x.dim() == 4 else x
                          for x in varlen_batch(dtype, seed=41))
    do, dht = rand(*v.shape, seed=43), rand(*h0.shape, seed=44)
    seg = 64 if not CUDA else 512
    run = lambda a, b, c, h: lightning_attn_triton(a, b, c, g, initial_state=h, cu_seqlens=cu,  # noqa: E731
                                                   segment_len=seg)
    launched = []
    real_use = lt._use_tma
    monkeypatch.setattr(lt, "_use_tma", lambda *a, **kw: launched.append(real_use(*a, **kw)) or launched[-1])
    monkeypatch.setenv("SALA_LIGHTNING_TMA", "0")  # the GPU's default is on
    monkeypatch.setenv("SALA_LIGHTNING_DELTA_TMA", "0")
    plain = [run(q, k, v, h0), grads_of(run, [q, k, v, h0], do, dht)]
    assert launched and not any(launched)
    monkeypatch.setenv("SALA_LIGHTNING_TMA", "1")
    monkeypatch.setenv("SALA_LIGHTNING_DELTA_TMA", "1")
    launched.clear()
    tma = [run(q, k, v, h0), grads_of(run, [q, k, v, h0], do, dht)]
    assert any(launched) and not all(launched)  # the forward-order passes, not the reverse ones
    (o1, s1), (o2, s2) = plain[0], tma[0]
    # the same products on the same tiles; compiled apart on the GPU, whose bf16 gradients may round apart
    same = 1e-6 if not CUDA else (1e-5 if dtype == torch.float32 else 5e-3)
    assert rel(o2, o1) < same and rel(s2, s1) < same
    for a, b in zip(tma[1], plain[1]):
        assert rel(a, b) < same
    ro, rs = lightning_attn_chunked(*(x.detach().double() for x in (q, k, v)), g, initial_state=h0.detach().double(),
                                    cu_seqlens=cu)
    assert rel(o2, ro) < TOL[dtype] and rel(s2, rs) < TOL[dtype]


def test_descriptor_allocator_keeps_a_callers_own(monkeypatch):
    """The TMA path gives Triton an allocator for its device-built descriptors only where the caller's context
    has none, and still sets one where Triton's private state is not what 3.6 has."""
    from triton.runtime import _allocation

    from sala.ops import lightning_triton as lt

    mine = lambda size, alignment, stream: None  # noqa: E731
    token = _allocation._allocator.set(mine)
    try:
        lt._ensure_allocator()
        assert _allocation._allocator.get() is mine
        _allocation._allocator.set(_allocation._NULL_ALLOCATOR)
        lt._ensure_allocator()
        assert _allocation._allocator.get() is lt._scratch
        _allocation._allocator.set(mine)
        monkeypatch.delattr(_allocation, "_NULL_ALLOCATOR")
        lt._ensure_allocator()
        assert _allocation._allocator.get() is lt._scratch
    finally:
        _allocation._allocator.reset(token)


def grads_of(fn, leaves, do, dht):
    o, s = fn(*leaves)
    loss = (o.float() * do).sum() + ((s * dht).sum() if dht is not None else 0)
    return torch.autograd.grad(loss, [x for x in leaves if x is not None])


@pytest.mark.parametrize("keep_states", [True, False])
@pytest.mark.parametrize("case", ["h0_dht", "no_h0", "o_only", "varlen"])
def test_backward_matches_reference_autograd(case, keep_states, monkeypatch):
    """Both backward paths: the forward's segment states kept for dq, or recomputed (one state pass more)."""
    from sala.ops import lightning_triton as lt

    monkeypatch.setattr(lt, "SAVED_STATES_MAX_SHARE", 1e9 if keep_states else 0.0)
    state_passes = []
    real = lt.segment_states
    monkeypatch.setattr(lt, "segment_states", lambda *a, **kw: state_passes.append(1) or real(*a, **kw))
    H, D = (3, 32) if not CUDA else (9, 64)
    if case == "varlen":
        lens = VARLEN
        cu = torch.tensor([0] + lens, device=DEV).cumsum(0)
        B, T, N = 1, sum(lens), len(lens)
    else:
        cu, B, T, N = None, 2, (150 if not CUDA else 2500), 2
    q, k, v = (x.requires_grad_(True) for x in inputs(B, T, H, D, torch.float32, seed=5))
    g = lightning_decay(H).to(DEV)
    h0 = None if case == "no_h0" else rand(N, H, D, D, seed=11).requires_grad_(True)
    do = rand(B, T, H, D, seed=12)
    dht = None if case == "o_only" else rand(N, H, D, D, seed=13)
    seg = 64 if not CUDA else 512
    ours = grads_of(lambda a, b, c, h: lightning_attn_triton(a, b, c, g, initial_state=h, cu_seqlens=cu, segment_len=seg),
                    [q, k, v, h0], do, dht)
    leaves64 = [None if x is None else x.detach().double().requires_grad_(True) for x in (q, k, v, h0)]
    ref = grads_of(lambda a, b, c, h: lightning_attn_chunked(a, b, c, g, initial_state=h, cu_seqlens=cu),
                   leaves64, do.double(), None if dht is None else dht.double())
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert rel(a, b) < TOL[torch.float32]
    assert len(state_passes) == (2 if keep_states else 3)  # forward + dS (+ dq's when not kept)


def test_backward_bf16_inputs():
    T, H, D, seg = SHAPES[0]
    q, k, v = (x.requires_grad_(True) for x in inputs(1, T, H, D, torch.bfloat16, seed=6))
    g = lightning_decay(H).to(DEV)
    do = rand(1, T, H, D, seed=14)
    o, _ = lightning_attn_triton(q, k, v, g, segment_len=seg)
    gq, gk, gv = torch.autograd.grad((o * do).sum(), [q, k, v])
    assert gq.dtype == torch.bfloat16
    leaves = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    ro, _ = lightning_attn_chunked(*leaves, g)
    rq, rk, rv = torch.autograd.grad((ro * do.double()).sum(), leaves)
    for a, b in zip((gq, gk, gv), (rq, rk, rv)):
        assert rel(a, b) < 3e-2


@pytest.mark.parametrize("B", [1, 5] if not CUDA else [1, 16, 64])
def test_decode_updates_state_in_place(B):
    H, D = (3, 32) if not CUDA else (32, 128)
    q, k, v = (rand(B, H, D, seed=20 + i) for i in range(3))
    g = lightning_decay(H).to(DEV)
    state = rand(B, H, D, D, seed=23)
    ref_state = state.clone()
    o = lightning_decode_triton(q, k, v, g, state)
    ro = lightning_decode_step(q, k, v, g, ref_state)
    assert rel(o, ro) < 1e-5 and rel(state, ref_state) < 1e-6
    assert not torch.equal(state, rand(B, H, D, D, seed=23))  # really updated in place


def test_prefill_then_decode_equals_longer_prefill():
    T, H, D, seg = SHAPES[0]
    q, k, v = inputs(1, T + 3, H, D, torch.float32, seed=7)
    g = lightning_decay(H).to(DEV)
    full, full_s = lightning_attn_triton(q, k, v, g, precision="ieee", segment_len=seg)
    _, state = lightning_attn_triton(q[:, :T], k[:, :T], v[:, :T], g, precision="ieee", segment_len=seg)
    state = state.contiguous()
    for t in range(T, T + 3):
        o = lightning_decode_triton(q[:, t], k[:, t], v[:, t], g, state)
        assert rel(o, full[:, t]) < 1e-5
    assert rel(state, full_s) < 1e-5


def test_dispatch_routes_and_force_reference():
    H, D = 2, 16
    q, k, v = inputs(1, 70, H, D, torch.float32, seed=8)
    g = lightning_decay(H).to(DEV)
    ref = lightning_attn_chunked(q, k, v, g, D**-0.5)
    with dispatch.reference_ops():
        forced = dispatch.lightning_prefill(q, k, v, g, D**-0.5)
    assert torch.equal(forced[0], ref[0]) and torch.equal(forced[1], ref[1])
    routed = dispatch.lightning_prefill(q, k, v, g, D**-0.5)
    if CUDA:  # the Triton path: same function, different rounding
        assert rel(routed[0], ref[0]) < TOL[torch.float32] and not torch.equal(routed[0], ref[0])
    else:  # CPU tensors take the reference itself
        assert torch.equal(routed[0], ref[0])
    state, ref_state = rand(1, H, D, D, seed=30), rand(1, H, D, D, seed=30)
    o = dispatch.lightning_decode(q[:, 0], k[:, 0], v[:, 0], g, state, D**-0.5)
    ro = lightning_decode_step(q[:, 0], k[:, 0], v[:, 0], g, ref_state, D**-0.5)
    assert rel(o, ro) < 1e-5 and rel(state, ref_state) < 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs 2^31+ elements on a GPU")
def test_offsets_past_int32_are_exact():
    """B*T*H*D > 2^31: outputs past the boundary match the reference on an exact window (every decay
    is <= exp(-2^-8) per step, so 12288 steps from a zero state reproduce the state to ~1e-14)."""
    H, D = 32, 128
    T = 2**31 // (H * D) + 4096
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, T, H, D, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(3))
    g = lightning_decay(H).cuda()
    o, s = lightning_attn_triton(q, k, v, g, out_dtype=torch.bfloat16)
    w0 = T - 12288
    ro, rs = lightning_attn_chunked(*(x[:, w0:].float() for x in (q, k, v)), g)
    assert rel(o[:, -4096:], ro[:, -4096:]) < 2e-2 and rel(s, rs) < 2e-2
