"""InfLLM-V2 Triton kernels against the reference ops (sala.ops.infllmv2_reference).

Without CUDA the kernels run through the Triton interpreter (TRITON_INTERPRET=1, set here before any Triton
kernel is defined) at small shapes; with CUDA the same checks run compiled at the release shape.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

from sala.ops import infllmv2_reference as ref  # noqa: E402
from sala.ops import infllmv2_triton_attn as ta  # noqa: E402
from sala.ops import infllmv2_triton_select as ts  # noqa: E402
from sala.ops.infllmv2_triton import infllmv2_attention_triton, infllmv2_varlen_triton, select_blocks_triton  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
if CUDA:  # release settings and shape
    P = ref.SparseParams(kernel_size=32, kernel_stride=16, block_size=64, init_blocks=1, window_size=2048, topk=64)
    T_LONG, D = 8192 + 63, 128
else:  # same structure at toy size: pool stride 4, 2 local blocks, 5 selected
    P = ref.SparseParams(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, window_size=32, topk=3)
    T_LONG, D = 127, 16  # 127 % 4 == 3 and 127 % 16 == 15: the visibility quirk on both levels


def make(T, Hq, Hk, Tq=None, dtype=torch.float32, seed=0, d=D):
    g = torch.Generator().manual_seed(seed)
    Tq = Tq or T
    q = torch.randn(Tq, Hq, d, generator=g) * 1.5
    k = torch.randn(T, Hk, d, generator=g)
    v = torch.randn(T, Hk, d, generator=g)
    return (x.to(DEV, dtype) for x in (q, k, v))


def reference_selection(q, k, params=P, decode=False):
    Tq, T = q.shape[0], k.shape[0]
    scale = q.shape[-1] ** -0.5
    k1 = ref.compress_keys(k, params.kernel_size, params.kernel_stride)
    k2 = ref.compress_keys(k, params.kernel_size2, params.kernel_stride2)
    pos = torch.arange(T - Tq, T, device=q.device)
    if decode:
        v1 = v2 = None
    else:
        v1 = ref.visible_counts(pos, T, k1.shape[0], params.kernel_stride)
        v2 = ref.visible_counts(pos, T, k2.shape[0], params.kernel_stride2)
    s1 = ref.stage1_scores(q, k1, k2, scale, v1, v2)
    qb = pos // params.block_size
    bsc = ref.block_scores(s1, qb, -(-T // params.block_size), params)
    idx = ref.select_blocks(bsc, qb, params.n_select)
    return k1, k2, s1, bsc, idx


# ---------------------------------------------------------------- stage 1, pooling, selection


@pytest.mark.parametrize(
    "T,Hq,Hk,Tq,decode",
    [(T_LONG, 16, 2, None, False), (T_LONG - 20, 12, 1, 40, False), (T_LONG, 16, 1, 1, True), (T_LONG - 1, 3, 1, 33, False)],
)
def test_stage1_scores_and_selection_match_reference(T, Hq, Hk, Tq, decode):
    q, k, _ = make(T, Hq, Hk, Tq, seed=T + Hq)
    k1, k2, s1, bsc, idx_ref = reference_selection(q, k, decode=decode)
    scores = torch.zeros(k.shape[1], q.shape[0], k1.shape[0], device=DEV)
    idx = ts.select_blocks_chunk(q, k1, k2, q.shape[-1] ** -0.5, P, T - q.shape[0], T, decode=decode,
                                 scores_out=scores, lse_splits=3 if decode else 1)
    torch.testing.assert_close(scores, s1, rtol=2e-5, atol=1e-6)
    assert torch.equal(idx, idx_ref)
    # the pooled block scores carried by the keys, where the kernel keeps them (blocks up to the query's own)
    keys = ts.block_keys(q, k1, ts.k2_lse(q, k2, q.shape[-1] ** -0.5, T - q.shape[0],
                                          ts.visibility_offsets(T, k2.shape[0], P.kernel_stride2, decode),
                                          P.kernel_stride2),
                         q.shape[-1] ** -0.5, T - q.shape[0],
                         ts.visibility_offsets(T, k1.shape[0], P.kernel_stride, decode), P, bsc.shape[-1])
    mine = ts.keys_to_scores(keys)
    qb = torch.arange(T - q.shape[0], T, device=DEV) // P.block_size
    past = torch.arange(bsc.shape[-1], device=DEV)[None, :] <= qb[:, None]
    torch.testing.assert_close(mine[:, past], bsc.float()[:, past], rtol=2e-5, atol=1e-6)
    assert torch.all(mine[:, ~past & (torch.arange(bsc.shape[-1], device=DEV)[None, :] >= P.init_blocks)] == float("-inf"))


@pytest.mark.parametrize("decode", [False, True])
def test_unmasked_tiles_match_masked_and_reference(decode, monkeypatch):
    """Rows far enough from the start take the unmasked K1 tiles (64 chunks each): same scores and blocks."""
    T = 4 * 64 * P.kernel_stride + 37 if not CUDA else 3 * T_LONG
    Tq = 1 if decode else 6
    q, k, _ = make(T, 4, 1, Tq, seed=21)
    k1, k2, s1, bsc, idx_ref = reference_selection(q, k, decode=decode)
    out = {}
    for fast in (True, False):
        monkeypatch.setattr(ts, "FAST_TILES", fast)
        scores = torch.zeros(1, Tq, k1.shape[0], device=DEV)
        idx = ts.select_blocks_chunk(q, k1, k2, D ** -0.5, P, T - Tq, T, decode=decode, scores_out=scores)
        torch.testing.assert_close(scores, s1, rtol=2e-5, atol=1e-6)
        assert torch.equal(idx, idx_ref)
        out[fast] = scores
    assert torch.equal(out[True], out[False])


@pytest.mark.parametrize("row_topk", [True, False], ids=["row_topk", "int64_keys"])
@pytest.mark.parametrize("pattern", ["all_equal", "pairs"])
def test_selection_exact_ties_go_to_lower_block(pattern, row_topk, monkeypatch):
    """Keys built so that block scores tie exactly: the lower block index must win, as in the reference;
    through the default row top-k and through the int64-key fallback."""
    monkeypatch.setattr(ts, "ROW_TOPK", row_topk)
    T, Hq, Hk = T_LONG, 8, 1
    q, k, _ = make(T, Hq, Hk, seed=3)
    if pattern == "all_equal":  # every K1 chunk identical -> every non-forced block ties
        k = k[:1].expand(T, Hk, D).contiguous()
    else:  # keys repeat every two blocks -> blocks 2i+1 and 2i+3 tie, and so on
        period = 2 * P.block_size
        k = k[:period].repeat(T // period + 1, 1, 1)[:T].contiguous()
    k1, k2, s1, bsc, idx_ref = reference_selection(q, k)
    idx = select_blocks_triton(q, k1, k2, P, D ** -0.5, T)
    # the reference really has ties at the selection boundary on many rows
    qb = torch.arange(T, device=DEV) // P.block_size
    cand = bsc.float().masked_fill(torch.arange(bsc.shape[-1], device=DEV)[None, None, :] > qb[None, :, None], float("-inf"))
    top = cand.sort(-1, descending=True).values
    n_sel = idx_ref.shape[-1]
    tie_rows = (top[..., n_sel - 1] == top[..., n_sel]) & torch.isfinite(top[..., n_sel])
    assert tie_rows.sum() >= 5
    assert torch.equal(idx, idx_ref)


def test_selection_bf16_rounds_scores_like_reference():
    """bf16 inputs: scores are rounded to bf16 before pooling; flips only between blocks whose reference
    scores are within one bf16 rounding step."""
    T, Hq, Hk = T_LONG, 8, 1
    q, k, _ = make(T, Hq, Hk, dtype=torch.bfloat16, seed=7)
    k1, k2, s1, bsc, idx_ref = reference_selection(q, k)
    scores = torch.zeros(Hk, T, k1.shape[0], device=DEV)
    idx = ts.select_blocks_chunk(q, k1, k2, D ** -0.5, P, 0, T, scores_out=scores)
    assert torch.all(scores == scores.bfloat16().float())  # rounded like the release kernel
    torch.testing.assert_close(scores, s1.float(), rtol=1e-2, atol=1e-3)
    diff = (idx != idx_ref).any(-1)
    assert diff.float().mean() < 0.2
    for h, r in diff.nonzero().tolist():
        a = bsc[h, r, idx[h, r][idx[h, r] >= 0].long()].float().sort().values
        b = bsc[h, r, idx_ref[h, r][idx_ref[h, r] >= 0].long()].float().sort().values
        assert torch.allclose(a, b, rtol=1.6e-2, atol=0)


def test_chunked_selection_equals_unchunked():
    T, Hq, Hk = T_LONG, 8, 2
    q, k, _ = make(T, Hq, Hk, seed=11)
    k1 = ref.compress_keys(k, P.kernel_size, P.kernel_stride)
    k2 = ref.compress_keys(k, P.kernel_size2, P.kernel_stride2)
    whole = select_blocks_triton(q, k1, k2, P, D ** -0.5, T)
    n_blocks = -(-T // P.block_size)
    chunked = select_blocks_triton(q, k1, k2, P, D ** -0.5, T, key_budget=Hk * n_blocks * P.block_size)
    assert torch.equal(whole, chunked)


# ---------------------------------------------------------------- stage 2


def _stage2_inputs(T, Hq, Hk, Tq=None, dtype=torch.float32, seed=0):
    q, k, v = make(T, Hq, Hk, Tq, dtype=dtype, seed=seed)
    idx = reference_selection(q, k)[-1]
    return q, k, v, idx


@pytest.mark.parametrize("T,Hq,Hk,Tq", [(T_LONG, 8, 2, 48), (T_LONG - 5, 3, 1, 37)])
def test_stage2_forward_matches_reference(T, Hq, Hk, Tq):
    q, k, v, idx = _stage2_inputs(T, Hq, Hk, Tq, seed=5)
    Tq = q.shape[0]
    pos = torch.arange(T - Tq, T, device=DEV)
    o_ref = ref.block_sparse_attention(q, k, v, idx, pos, P.block_size, D ** -0.5)
    o, lse = ta.sparse_attn_forward(q, k, v, idx, T - Tq, P.block_size, D ** -0.5)
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-5)
    o2, lse2 = ta.sparse_attn_forward(q, k, v, idx, T - Tq, P.block_size, D ** -0.5,
                                      forced=(P.init_blocks, P.local_blocks), rows_per_pass=max(1, Tq // 3))
    torch.testing.assert_close(o2, o_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse2, lse, rtol=1e-5, atol=1e-5)
    o3, _ = ta.sparse_attn_forward(q, k, v, idx, T - Tq, P.block_size, D ** -0.5, splits=3)
    torch.testing.assert_close(o3, o_ref, rtol=1e-4, atol=1e-5)


def _reference_grads(q, k, v, idx):
    """(o, do, (dq, dk, dv)) of the reference stage 2 under a random output gradient."""
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    o_ref = ref.block_sparse_attention(qr, kr, vr, idx, torch.arange(q.shape[0], device=DEV), P.block_size, D ** -0.5)
    do = torch.randn_like(o_ref)
    o_ref.backward(do)
    return o_ref, do, (qr.grad, kr.grad, vr.grad)


def _assert_triton_matches(q, k, v, idx, o_ref, do, grads, forced):
    qt, kt, vt = (x.clone().requires_grad_() for x in (q, k, v))
    o = ta.block_sparse_attention_triton(qt, kt, vt, idx, 0, P.block_size, D ** -0.5, forced=forced, forced_bwd=forced)
    o.backward(do)
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-5)
    for mine, want in zip((qt.grad, kt.grad, vt.grad), grads):
        torch.testing.assert_close(mine, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("Hq,Hk", [(9, 3), (8, 2)])
def test_union_rest_pass_matches_reference(Hq, Hk, overlap, monkeypatch):
    """UNION_LANES on: the rest pass walks the union of several rows' selections (forward and dq), on random
    selections (disjoint) and on rows whose queries nearly coincide (shared blocks)."""
    monkeypatch.setattr(ta, "UNION_LANES", 16)
    T = T_LONG
    q, k, v = make(T, Hq, Hk, seed=21)
    if overlap:  # neighbouring rows almost the same query: they pick the same blocks
        q = q[:, :1] * 0 + q.mean(0, keepdim=True) + 0.01 * q
    idx = reference_selection(q, k)[-1]
    _assert_triton_matches(q, k, v, idx, *_reference_grads(q, k, v, idx), forced=(P.init_blocks, P.local_blocks))
    if overlap:  # the case is what it says: most neighbouring rows share a non-forced block
        shared = [(set(idx[0, r].tolist()) & set(idx[0, r + 1].tolist())) - {-1} for r in range(T // 2, T - 1)]
        assert sum(len(x) > P.init_blocks + P.local_blocks + 1 for x in shared) > len(shared) // 2


@pytest.mark.parametrize("Hq,Hk", [(8, 1), (9, 3), (12, 2)])
def test_stage2_gradients_match_reference_autograd(Hq, Hk):
    """Groups of 8, 3 (SmolLM2's 9/3 heads: the multi-row kernels pad it to 4 lanes) and 6 (to 8); forced
    blocks in a shared pass, or all per row."""
    q, k, v, idx = _stage2_inputs(T_LONG, Hq, Hk, seed=9)
    expected = _reference_grads(q, k, v, idx)
    for forced in ((P.init_blocks, P.local_blocks), None):
        _assert_triton_matches(q, k, v, idx, *expected, forced=forced)


# ---------------------------------------------------------------- whole op, decode, varlen


@pytest.mark.parametrize("T,Hq,Hk,Tq,d", [(T_LONG, 8, 2, None, D), (T_LONG - 30, 12, 1, 20, D), (T_LONG - 7, 8, 1, 9, 64)])
def test_full_op_matches_reference(T, Hq, Hk, Tq, d):
    q, k, v = make(T, Hq, Hk, Tq, seed=13, d=d)
    o_ref = ref.infllmv2_attention(q, k, v, P, d ** -0.5)
    o = infllmv2_attention_triton(q, k, v, P, d ** -0.5, key_budget=Hk * 2 * P.block_size * (-(-T // P.block_size)))
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-5)


def test_decode_with_cached_compressed_keys_matches_reference():
    T, Hq, Hk = T_LONG + 1, 16, 1
    q, k, v = make(T, Hq, Hk, 1, seed=17)
    k1 = ref.compress_keys(k, P.kernel_size, P.kernel_stride)
    k2 = ref.compress_keys(k, P.kernel_size2, P.kernel_stride2)
    got: dict = {}
    o_ref = ref.infllmv2_attention(q, k, v, P, D ** -0.5, k1=k1, k2=k2, decode=True, internals=got)
    o = infllmv2_attention_triton(q, k, v, P, D ** -0.5, k1=k1, k2=k2, decode=True)
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(select_blocks_triton(q, k1, k2, P, D ** -0.5, T, decode=True), got["topk_idx"])


def test_varlen_batch_equals_each_sequence():
    Hq, Hk = 4, 1
    lens = [70, 45] if not CUDA else [5000, 3000]
    qs, ks, vs = zip(*(make(L, Hq, Hk, seed=L) for L in lens))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=DEV, dtype=torch.int32)
    o = infllmv2_varlen_triton(torch.cat(qs), torch.cat(ks), torch.cat(vs), cu, cu, P, D ** -0.5)
    want = torch.cat([ref.infllmv2_attention(a, b, c, P, D ** -0.5) for a, b, c in zip(qs, ks, vs)])
    torch.testing.assert_close(o, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- one-row decode path, specialization


def _reference_row_topk(scores, n_select, width, qb):
    """What the reference select_blocks does with one row of block scores (stable sort: ties -> lower)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :n_select]
    idx = torch.sort(order, dim=-1).values.to(torch.int32)
    idx = idx.masked_fill(idx > qb, -1)
    return torch.nn.functional.pad(idx, (0, width - idx.shape[-1]), value=-1)[:, None]


@pytest.mark.parametrize("n_cols,n_select,width,qb", [(300, 5, 5, 299), (37, 7, 7, 30), (5, 8, 6, 4), (1, 5, 1, 0)])
def test_row_topk_matches_stable_sort_with_ties_and_infinities(n_cols, n_select, width, qb):
    from sala.ops.infllmv2_triton_topk import row_topk

    g = torch.Generator().manual_seed(n_cols)
    s = torch.randint(0, 6, (3, n_cols), generator=g).float() * 0.25  # many exact ties
    s[0] = torch.randn(n_cols, generator=g).abs()
    s[:, qb + 1:] = float("-inf")  # future blocks
    s[1, :1] = float("inf")  # a forced block
    s[2, n_cols // 2:] = float("-inf")
    s = s.to(DEV)
    got = row_topk(s[:, None], n_select, width, qb, 1)
    assert torch.equal(got, _reference_row_topk(s, n_select, width, qb))


@pytest.mark.parametrize("T,Hq,Hk,pattern", [(T_LONG + 1, 16, 1, "random"), (T_LONG + 40, 8, 2, "random"),
                                             (T_LONG, 8, 1, "ties"), (40, 4, 1, "random"), (3, 4, 1, "random")])
def test_fused_decode_matches_reference(T, Hq, Hk, pattern, monkeypatch):
    """The five-launch decode path against the reference decode (selection and output), and against the
    general Triton path it replaces."""
    from sala.ops import infllmv2_triton as tri

    q, k, v = make(T, Hq, Hk, 1, seed=T + 3)
    if pattern == "ties":  # keys repeat every two blocks: exact ties between block scores
        period = 2 * P.block_size
        k = k[:period].repeat(T // period + 1, 1, 1)[:T].contiguous()
    k1 = ref.compress_keys(k, P.kernel_size, P.kernel_stride)
    k2 = ref.compress_keys(k, P.kernel_size2, P.kernel_stride2)
    got: dict = {}
    o_ref = ref.infllmv2_attention(q, k, v, P, D ** -0.5, k1=k1, k2=k2, decode=True, internals=got)
    monkeypatch.setattr(tri, "DECODE_FUSED", True)
    idx = select_blocks_triton(q, k1, k2, P, D ** -0.5, T, decode=True)
    o = infllmv2_attention_triton(q, k, v, P, D ** -0.5, k1=k1, k2=k2, decode=True)
    assert torch.equal(idx, got["topk_idx"])
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(tri, "DECODE_FUSED", False)
    assert torch.equal(select_blocks_triton(q, k1, k2, P, D ** -0.5, T, decode=True), idx)


def _capture_launches(monkeypatch, kernels):
    """Record the arguments of every launch of ``kernels`` (name -> list of (args, kwargs))."""
    seen = {name: [] for name in kernels}
    for name, kern in kernels.items():
        orig = kern.run

        def run(*args, _orig=orig, _name=name, **kwargs):
            seen[_name].append((args, {k_: v_ for k_, v_ in kwargs.items() if k_ not in ("grid", "warmup")}))
            return _orig(*args, **kwargs)

        monkeypatch.setattr(kern, "run", run)
    return seen


def _specialization(kern, args, kwargs):
    """Triton's own compile-cache key part for these launch arguments (types, int divisibility, ==1,
    constexprs, launch options), computed with the kernel's do_not_specialize list."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    dns = kern.kwargs.get("do_not_specialize") if hasattr(kern, "kwargs") else kern.do_not_specialize
    jf = JITFunction(kern.fn, do_not_specialize=dns)
    binder = create_function_from_signature(jf.signature, jf.params, BaseBackend)
    _, spec, options = binder(*args, **kwargs)
    return repr((spec, sorted(options.items())))


def test_kernels_do_not_recompile_across_lengths(monkeypatch):
    """A new sequence/context length must not create a new kernel specialization (it compiled a new
    kernel per divisibility of the length on the GPU: 0.5-1.9 s decode steps). Decode at consecutive
    cache lengths, prefill and backward at lengths of different divisibility: one key per kernel."""
    from sala.ops import infllmv2_triton_topk as ttop

    kernels = {n: getattr(ta, n) for n in ("_fwd_kernel", "_fwd_forced_kernel", "_bwd_dq_kernel",
                                           "_bwd_dq_forced_kernel", "_bwd_dkdv_kernel", "_merge_splits_kernel")}
    kernels.update({n: getattr(ts, n) for n in ("_k2_lse_kernel", "_block_key_kernel")})
    kernels["_row_topk_kernel"] = ttop._row_topk_kernel
    seen = _capture_launches(monkeypatch, kernels)
    Hq, Hk = 4, 1
    n_sel = P.n_select * P.block_size
    for T in (n_sel + 16 * 4, n_sel + 16 * 4 + 1, n_sel + 16 * 4 + 15):  # decode: 3 cache lengths
        q, k, v = make(T, Hq, Hk, 1, seed=T)
        k1 = ref.compress_keys(k, P.kernel_size, P.kernel_stride)
        k2 = ref.compress_keys(k, P.kernel_size2, P.kernel_stride2)
        infllmv2_attention_triton(q, k, v, P, D ** -0.5, k1=k1, k2=k2, decode=True)
    for T in (n_sel + 32, n_sel + 37):  # prefill + backward at two lengths (32 % 16 == 0, 37 % 16 != 0)
        q, k, v = make(T, Hq, Hk, seed=T)
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        infllmv2_attention_triton(q, k, v, P, D ** -0.5).sum().backward()
    for name, calls in seen.items():
        assert calls, f"{name} was not launched"
        keys = {_specialization(kernels[name], a, kw) for a, kw in calls}
        # decode and prefill legitimately differ in constexprs (rows per program, split mode): compare the
        # launches that share their constexpr values
        by_const: dict = {}
        for a, kw in calls:
            const = repr(sorted((k_, v_) for k_, v_ in kw.items()))
            by_const.setdefault(const, set()).add(_specialization(kernels[name], a, kw))
        for const, specs in by_const.items():
            assert len(specs) == 1, f"{name}: {len(specs)} specializations across lengths for {const}"
        assert keys


@pytest.mark.parametrize("T,Hq,Hk,Tq,pattern", [(T_LONG, 8, 2, 50, "random"), (T_LONG - 20, 12, 1, 40, "random"),
                                                (T_LONG, 8, 1, None, "ties"), (30, 4, 1, None, "random")])
def test_prefill_row_topk_selection_matches_reference(T, Hq, Hk, Tq, pattern, monkeypatch):
    """The default many-row selection is the Triton row top-k (ROW_TOPK): it is launched, and it gives the
    reference blocks, ties included, in one chunk and in several."""
    from sala.ops import infllmv2_triton_topk as ttop

    assert ts.ROW_TOPK is True  # the default the bench measured faster (H200, commit 82c7109)
    q, k, v = make(T, Hq, Hk, Tq, seed=T + 7)
    if pattern == "ties":
        period = 2 * P.block_size
        k = k[:period].repeat(T // period + 1, 1, 1)[:T].contiguous()
    k1, k2, _, _, idx_ref = reference_selection(q, k)
    seen = _capture_launches(monkeypatch, {"row": ttop._row_topk_kernel})
    assert torch.equal(select_blocks_triton(q, k1, k2, P, D ** -0.5, T), idx_ref)
    assert len(seen["row"]) == 1
    if pattern == "ties":
        return
    n_blocks = -(-T // P.block_size)
    chunked = select_blocks_triton(q, k1, k2, P, D ** -0.5, T, key_budget=Hk * n_blocks * P.block_size)
    assert torch.equal(chunked, idx_ref)
    o = infllmv2_attention_triton(q, k, v, P, D ** -0.5)
    torch.testing.assert_close(o, ref.infllmv2_attention(q, k, v, P, D ** -0.5), rtol=1e-4, atol=1e-5)


def test_decode_falls_back_to_general_path_when_row_topk_cannot_compile(monkeypatch):
    """A card that rejects the row top-k kernel (resources) must still decode, through the general path."""
    import triton

    from sala.ops import infllmv2_triton as tri

    def reject(*a, **kw):
        raise triton.OutOfResources(300000, 232448, "shared memory")

    monkeypatch.setattr(tri, "decode_select_triton", reject)
    monkeypatch.setattr(tri, "DECODE_FUSED", True)
    T = T_LONG + 1
    q, k, v = make(T, 8, 1, 1, seed=29)
    k1 = ref.compress_keys(k, P.kernel_size, P.kernel_stride)
    k2 = ref.compress_keys(k, P.kernel_size2, P.kernel_stride2)
    with pytest.warns(UserWarning, match="general path"):
        o = infllmv2_attention_triton(q, k, v, P, D ** -0.5, k1=k1, k2=k2, decode=True)
    assert tri.DECODE_FUSED is False
    torch.testing.assert_close(o, ref.infllmv2_attention(q, k, v, P, D ** -0.5, k1=k1, k2=k2, decode=True),
                               rtol=1e-4, atol=1e-5)


def test_prefill_falls_back_to_int64_keys_when_row_topk_cannot_compile(monkeypatch):
    """A card that rejects the row top-k kernel must still select (torch.topk on int64 keys), same blocks."""
    import triton

    def reject(*a, **kw):
        raise triton.OutOfResources(300000, 232448, "shared memory")

    monkeypatch.setattr(ts, "row_topk", reject)
    monkeypatch.setattr(ts, "ROW_TOPK", True)
    T = T_LONG
    q, k, _ = make(T, 8, 2, 40, seed=31)
    k1, k2, _, _, idx_ref = reference_selection(q, k)
    with pytest.warns(UserWarning, match="torch.topk"):
        idx = select_blocks_triton(q, k1, k2, P, D ** -0.5, T)
    assert ts.ROW_TOPK is False
    assert torch.equal(idx, idx_ref)


def test_prefill_rows_wider_than_row_kernel_use_int64_keys(monkeypatch):
    """Rows with more blocks than the row kernel holds (contexts over 2M tokens at block 64) take the
    int64-key top-k: simulated by lowering the limit below this sequence's block count."""
    from sala.ops import infllmv2_triton_topk as ttop

    T = T_LONG
    q, k, _ = make(T, 8, 1, 30, seed=37)
    k1, k2, _, _, idx_ref = reference_selection(q, k)
    monkeypatch.setattr(ts, "MAX_ROW_BLOCKS", -(-T // P.block_size) - 1)
    seen = _capture_launches(monkeypatch, {"row": ttop._row_topk_kernel})
    assert torch.equal(select_blocks_triton(q, k1, k2, P, D ** -0.5, T), idx_ref)
    assert seen["row"] == []
