"""Decode graphs: the static-buffer plumbing, run on the CPU through the eager backend, equals plain decoding."""

from __future__ import annotations

import torch

from sala.engine.graphs import EagerBackend, _segments, disable_decode_graphs, enable_decode_graphs
from sala.modeling import CACHE_FIELD
from sala.testing import make_model, random_ids, small_config

MIX = ["lightning", "lightning", "minicpm4", "lightning", "minicpm4", "lightning"]


def _model():
    return make_model(small_config(num_hidden_layers=6, mixer_types=MIX))


def _decode(model, ids, steps):
    """Greedy steps after a prefill; returns the per-step logits and the cache."""
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = getattr(out, CACHE_FIELD)
        logits = [out.logits[:, -1]]
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            out = model(tok, past_key_values=cache, use_cache=True)
            logits.append(out.logits[:, -1])
            tok = out.logits[:, -1:].argmax(-1)
    return torch.stack(logits, 1), cache


def test_segments_group_consecutive_lightning_layers():
    segs = _segments(["lightning-attn", "lightning-attn", "minicpm4", "lightning-attn", "minicpm4", "lightning-attn"])
    assert [(s.layers, s.lightning) for s in segs] == [([0, 1], True), ([2], False), ([3], True), ([4], False), ([5], True)]


def test_graph_decoding_equals_plain_decoding():
    model = _model()
    ids = random_ids(model.config, 2, 40)
    ref, ref_cache = _decode(model, ids, 6)
    runner = enable_decode_graphs(model, EagerBackend())
    calls = []
    original = runner.run
    runner.run = lambda *a: calls.append(1) or original(*a)
    got, cache = _decode(model, ids, 6)
    assert len(calls) == 6  # every decode step went through the runner, the prefill did not
    assert len(runner.graphs) == 3  # one per lightning run, batch 2
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(cache.layers, ref_cache.layers):
        if getattr(a, "state", None) is not None:
            torch.testing.assert_close(a.state, b.state, atol=1e-5, rtol=1e-5)
    disable_decode_graphs(model)
    assert model.model.decode_runner is None


def test_interleaved_generations_keep_their_own_states():
    """Two caches decoded in turns share the graphs' buffers; each must still equal decoding it alone."""
    model = _model()
    a_ids, b_ids = random_ids(model.config, 1, 30, seed=3), random_ids(model.config, 1, 50, seed=4)
    ref_a, _ = _decode(model, a_ids, 4)
    ref_b, _ = _decode(model, b_ids, 4)
    enable_decode_graphs(model, EagerBackend())
    with torch.no_grad():
        caches, toks, logits = {}, {}, {"a": [], "b": []}
        for name, ids in (("a", a_ids), ("b", b_ids)):
            out = model(ids, use_cache=True)
            caches[name] = getattr(out, CACHE_FIELD)
            logits[name].append(out.logits[:, -1])
            toks[name] = out.logits[:, -1:].argmax(-1)
        for _ in range(4):
            for name in ("a", "b"):
                out = model(toks[name], past_key_values=caches[name], use_cache=True)
                logits[name].append(out.logits[:, -1])
                toks[name] = out.logits[:, -1:].argmax(-1)
    torch.testing.assert_close(torch.stack(logits["a"], 1), ref_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(logits["b"], 1), ref_b, atol=1e-5, rtol=1e-5)


def test_steps_that_do_not_qualify_take_the_plain_loop():
    model = _model()
    runner = enable_decode_graphs(model, EagerBackend())
    ids = random_ids(model.config, 1, 20)
    with torch.no_grad():
        model(ids, use_cache=True)  # prefill: T > 1
        model(ids[:, :1], use_cache=True)  # one token, but a fresh cache (no states): the runner declines
    assert runner.graphs == {}


def test_apply_decode_graphs_modes_on_a_cpu_model():
    """auto: graphs only on a CUDA model (here none, and an earlier runner is removed); on: refused off CUDA
    with a message naming the device; off: none; anything else: refused."""
    import pytest

    from sala.engine.graphs import apply_decode_graphs

    model = _model()
    enable_decode_graphs(model, EagerBackend())
    assert apply_decode_graphs(model, "auto") is None and model.model.decode_runner is None
    assert apply_decode_graphs(model, "off") is None
    with pytest.raises(ValueError, match="CUDA device; it is on cpu"):
        apply_decode_graphs(model, "on")
    with pytest.raises(ValueError, match="one of"):
        apply_decode_graphs(model, "yes")
