"""Cache accounting and the bounded memory of the sparse path."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from sala.cache import SALACache, cache_bytes_per_token, lightning_state_bytes
from sala.config import release_config
from sala.modeling import CACHE_FIELD
from sala.testing import make_model, random_ids, small_config


def test_release_cache_sizes_match_the_spec():
    cfg = release_config()
    kv = 8 * 2 * 2 * 128 * 2  # 8 sparse layers x (K+V) x 2 heads x 128 x bf16 = 8 KiB
    per_tok = cache_bytes_per_token(cfg, torch.bfloat16)
    assert kv == 8192
    assert kv < per_tok < kv * 1.05  # + compressed keys (1/16 + 1/64 of K)
    assert abs(per_tok * (1 << 20) / 2**30 - 8.3) < 0.05  # SPEC: about 8.3 GiB at 1M tokens
    assert lightning_state_bytes(cfg) == 24 * 32 * 128 * 128 * 4  # 48 MiB fp32
    assert SALACache.fixed_bytes_per_sequence(cfg) == 48 * 2**20


def test_cache_reports_its_memory(tiny_model, cases):
    ids = cases["c1024.input_ids"][:, :600]
    with torch.no_grad():
        cache = getattr(tiny_model(ids, use_cache=True), CACHE_FIELD)
    cfg = tiny_model.config
    assert cache.get_seq_length() == 600
    held = cache.nbytes()
    # fp32 K/V of 600 tokens in 2 sparse layers (+ growth headroom) and 2 fp32 lightning states
    assert held >= 600 * cache_bytes_per_token(cfg, torch.float32) * 0.9
    assert held <= 2 * 1024 * cache_bytes_per_token(cfg, torch.float32) + lightning_state_bytes(cfg) + 65536
    assert cache.batch_size == 1


def test_cache_select_and_repeat():
    cfg = small_config()
    model = make_model(cfg)
    ids = random_ids(cfg, 2, 30)
    with torch.no_grad():
        cache = getattr(model(ids, use_cache=True), CACHE_FIELD)
        cache.batch_select_indices(torch.tensor([1]))
        one = model(ids[1:, :1], past_key_values=cache).logits
        full = model(torch.cat([ids[1:], ids[1:, :1]], 1), use_cache=False).logits[:, -1:]
    torch.testing.assert_close(one, full, atol=2e-5, rtol=1e-4)


def test_sparse_path_memory_is_far_below_t_squared():
    """Peak memory of the reference sparse op at T = 32768: a T x T fp32 matrix alone would be 4 GiB; the op
    must stay below a quarter of that (measured as the peak RSS growth of a fresh process)."""
    T = 32768
    code = textwrap.dedent(f"""
        import resource, torch
        from sala.ops.infllmv2_reference import SparseParams, infllmv2_attention
        torch.manual_seed(0)
        q = torch.randn({T}, 16, 16); k = torch.randn({T}, 1, 16); v = torch.randn({T}, 1, 16)
        p = SparseParams(kernel_size=32, kernel_stride=16, block_size=64, init_blocks=1, window_size=128, topk=4)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        o = infllmv2_attention(q, k, v, p, scale=0.25)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert torch.isfinite(o).all()
        print((peak - base) * 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    grown = int(out.stdout.strip().splitlines()[-1])
    t_squared = T * T * 4
    assert grown * 4 < t_squared, f"sparse path grew RSS by {grown / 2**20:.0f} MiB; T x T fp32 is {t_squared / 2**30:.0f} GiB"


def test_grow_buffer_keeps_rows_and_grows_by_a_quarter():
    from sala.cache import ALIGN, GROWTH, _GrowBuffer

    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n, 2, 3, generator=g) for n in [5] + [37] * 300 + [1] * 20]
    buf = _GrowBuffer(chunks[0])
    for c in chunks[1:]:
        before = buf.data.shape[0]
        buf.append(c)
        cap = buf.data.shape[0]
        assert cap >= buf.length
        if cap != before:  # grew: by the factor (aligned), or just to what was needed
            assert cap <= max(buf.length, -(-int(before * GROWTH) // ALIGN) * ALIGN)
    torch.testing.assert_close(buf.view(), torch.cat(chunks), rtol=0, atol=0)
    assert buf.data.shape[0] <= GROWTH * buf.length + ALIGN  # doubling could hold up to 2x


def _prefill_and_decode(model, ids, steps, reserve):
    from sala.engine.generation import forward_chunk, prefill

    logits, cache = prefill(model, ids, chunk_size=64, reserve=reserve)
    outs = [logits]
    tok = logits.argmax(-1, keepdim=True)
    for _ in range(steps):
        step_logits, cache = forward_chunk(model, tok, cache, keep=1)
        outs.append(step_logits[:, -1])
        tok = step_logits[:, -1].argmax(-1, keepdim=True)
    return torch.cat(outs), cache


def test_reserve_sizes_the_cache_exactly_and_changes_nothing():
    from sala.cache import SparseLayerCache

    cfg = small_config()
    model = make_model(cfg)
    T, steps = 300, 7
    ids = random_ids(cfg, 1, T)
    with torch.no_grad():
        grown_logits, grown = _prefill_and_decode(model, ids, steps, reserve=None)
        exact_logits, exact = _prefill_and_decode(model, ids, steps, reserve=T + steps)
    torch.testing.assert_close(exact_logits, grown_logits, rtol=0, atol=0)
    sparse = [layer for layer in exact.layers if isinstance(layer, SparseLayerCache)]
    assert sparse
    for layer in sparse:
        assert layer.keys[0].length == T + steps
        assert layer.keys[0].data.shape[0] == T + steps  # allocated once, at the reserved size
        assert layer.values[0].data.shape[0] == T + steps
    assert exact.nbytes() < grown.nbytes()


def test_reserve_rejects_a_negative_count():
    import pytest

    with pytest.raises(ValueError, match="reserve"):
        SALACache(small_config()).reserve(-1)
