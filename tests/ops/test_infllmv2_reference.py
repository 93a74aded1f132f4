"""Regression tests of the InfLLM-V2 reference itself (memory bound, chunking) and of its dispatch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from sala.ops import dispatch
from sala.ops import infllmv2_reference as ref

P = ref.SparseParams(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, window_size=32, topk=3)


def test_reference_memory_is_o_t_times_selected():
    """At T = 4096 a single T x T float32 matrix is 64 MiB; the sparse reference must peak far below it
    (measured as the growth of the peak RSS of a fresh process)."""
    code = textwrap.dedent(
        """
        import resource, torch
        from sala.ops import infllmv2_reference as ref
        P = ref.SparseParams(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, window_size=32, topk=3)
        torch.manual_seed(0)
        T = 4096
        q, k, v = torch.randn(T, 2, 16), torch.randn(T, 1, 16), torch.randn(T, 1, 16)
        ref.infllmv2_attention(q[:256], k[:256], v[:256], P, 0.25, chunk_elems=1 << 18)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = ref.infllmv2_attention(q, k, v, P, 0.25, chunk_elems=1 << 18)
        assert torch.isfinite(out).all()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    grown = int(res.stdout.strip().splitlines()[-1])
    assert grown < (4096 * 4096 * 4) // 4, grown


def test_reference_chunked_stage1_equals_unchunked():
    torch.manual_seed(1)
    T = 301
    q, k, v = torch.randn(T, 8, 16), torch.randn(T, 2, 16), torch.randn(T, 2, 16)
    small: dict = {}
    whole: dict = {}
    o_small = ref.infllmv2_attention(q, k, v, P, 0.25, chunk_elems=3000, internals=small)
    o_whole = ref.infllmv2_attention(q, k, v, P, 0.25, chunk_elems=1 << 30, internals=whole)
    assert torch.equal(small["topk_idx"], whole["topk_idx"])
    torch.testing.assert_close(small["stage1_score"], whole["stage1_score"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(o_small, o_whole, rtol=1e-6, atol=1e-6)


def test_dispatch_cpu_takes_reference_and_force_switch():
    torch.manual_seed(2)
    q, k, v = torch.randn(90, 4, 16), torch.randn(90, 1, 16), torch.randn(90, 1, 16)
    assert not dispatch.use_triton(q, k, v)
    want = ref.infllmv2_attention(q, k, v, P, 0.25)
    assert torch.equal(dispatch.sparse_attention(q, k, v, P, 0.25), want)
    assert torch.equal(dispatch.dense_attention(q, k, v, 0.25), ref.dense_attention(q, k, v, 0.25))
    if torch.cuda.is_available():
        qc, kc, vc = q.cuda(), k.cuda(), v.cuda()
        assert dispatch.use_triton(qc, kc, vc)
        with dispatch.reference_ops():
            assert not dispatch.use_triton(qc, kc, vc)


@pytest.mark.parametrize("Tq", [50, 1, 20])
def test_dense_attention_batch_equals_each_row(Tq):
    """A leading batch dimension: the same as attending each row alone (causal, bottom-right aligned)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(3, Tq, 6, 8, generator=g), torch.randn(3, 50, 2, 8, generator=g), torch.randn(3, 50, 2, 8, generator=g)
    got = dispatch.dense_attention(q, k, v, 0.3)
    assert got.shape == q.shape
    for b in range(3):
        torch.testing.assert_close(got[b], ref.dense_attention(q[b], k[b], v[b], 0.3), rtol=1e-6, atol=1e-6)


def test_sparse_layer_dense_batch_matches_each_row_alone(monkeypatch):
    """Unpadded rows below dense_len run as one batched call; the output equals each row run on its own."""
    from sala import ops
    from sala.layers.sparse import SparseAttention
    from sala.testing import small_config

    cfg = small_config(vocab_size=50, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, lightning_nkv=4)
    torch.manual_seed(4)
    layer = SparseAttention(cfg, 0).double()
    x = torch.randn(3, 40, 32, dtype=torch.float64)
    pos = torch.arange(40).expand(3, 40)
    assert 40 < layer.dense_len
    calls = []
    real = ops.dense_attention
    monkeypatch.setattr(ops, "dense_attention", lambda *a: calls.append(a[0].shape) or real(*a))
    batched = layer(x, pos)
    assert calls == [(3, 40, 4, 8)]  # one call for the three rows
    rows = torch.cat([layer(x[b:b + 1], pos[:1]) for b in range(3)])
    torch.testing.assert_close(batched, rows, rtol=1e-12, atol=1e-12)
