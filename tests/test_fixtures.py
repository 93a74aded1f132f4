"""Every case of the released reference's tiny fixtures, reproduced in float32.

Logits within 1e-4 absolute; sparse internals (stage-1 scores, block scores) close; ``topk_idx`` identical
except rows whose stored boundary gap is below 1e-4 (a benign flip under a different summation order).
"""

from __future__ import annotations

import copy

import pytest
import torch

from sala.modeling import CACHE_FIELD

LOGIT_TOL = 1e-4
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.fixture(params=DEVICES)
def model(request, tiny_model):
    """The fixture model on each device: CPU runs the reference ops, CUDA the Triton kernels."""
    yield tiny_model.to(request.param)
    tiny_model.cpu()  # the session-wide model goes back to the CPU for every other test


def _sparse_layers(model):
    return [i for i, m in enumerate(model.config.mixer_types) if m == "minicpm4"]


@pytest.mark.parametrize("case", ["a", "a_short"])
def test_dense_prefill(model, cases, case):
    with torch.no_grad():
        logits = model(cases[f"{case}.input_ids"].to(model.device)).logits.cpu()
    assert logits.dtype == torch.float32
    assert (logits - cases[f"{case}.logits"]).abs().max() < LOGIT_TOL


@pytest.mark.parametrize("case", ["c1024", "c1151"])
def test_sparse_prefill_logits(model, cases, case):
    """The sparse path on each device (on CUDA: the Triton InfLLM-V2 and Lightning kernels)."""
    with torch.no_grad():
        logits = model(cases[f"{case}.input_ids"].to(model.device)).logits.cpu()
    assert (logits - cases[f"{case}.logits"]).abs().max() < LOGIT_TOL


@pytest.mark.parametrize("case", ["c1024", "c1151"])
def test_sparse_prefill_and_internals(tiny_model, cases, case):
    tiny_model = tiny_model.cpu()
    layers = _sparse_layers(tiny_model)
    captured = {}
    for i in layers:
        captured[i] = {}
        tiny_model.model.layers[i].self_attn.capture = captured[i]
    try:
        with torch.no_grad():
            logits = tiny_model(cases[f"{case}.input_ids"]).logits
    finally:
        for i in layers:
            tiny_model.model.layers[i].self_attn.capture = None
    assert (logits - cases[f"{case}.logits"]).abs().max() < LOGIT_TOL
    for i in layers:
        got = captured[i]
        for name in ("stage1_score", "block_score"):
            ref = cases[f"{case}.L{i}.{name}"]
            assert got[name].shape == ref.shape
            assert torch.equal(torch.isposinf(got[name]), torch.isposinf(ref)), f"L{i} {name}: forced blocks differ"
            assert torch.equal(torch.isneginf(got[name]), torch.isneginf(ref)), f"L{i} {name}: empty windows differ"
            fin = torch.isfinite(ref)
            torch.testing.assert_close(got[name][fin], ref[fin], rtol=1e-4, atol=1e-6)
        ref_idx = cases[f"{case}.L{i}.topk_idx"]
        gap = cases[f"{case}.L{i}.topk_boundary_gap"]
        differs = (got["topk_idx"] != ref_idx).any(-1)
        fragile = gap < 1e-4  # NaN (no real choice) compares False: such rows must match
        assert not (differs & ~fragile).any(), f"L{i}: topk_idx differs on {int((differs & ~fragile).sum())} robust rows"


def _decode_case(model, cases, case, n_steps):
    """Prefill with a cache, then one token per step with a growing mask and explicit positions."""
    dev = model.device
    ids = cases[f"{case}.prompt_ids"].to(dev)
    gen = cases[f"{case}.generated_ids"].to(dev)
    T = ids.shape[1]
    layers = _sparse_layers(model)
    step_topk = {i: [] for i in layers}
    with torch.no_grad():
        out = model(ids, attention_mask=torch.ones_like(ids), use_cache=True)
        assert (out.logits[:, -1].cpu() - cases[f"{case}.prefill_last_logits"]).abs().max() < LOGIT_TOL
        cache = getattr(out, CACHE_FIELD)
        for step in range(n_steps):
            captured = {}
            for i in layers:
                captured[i] = {}
                model.model.layers[i].self_attn.capture = captured[i]
            out = model(
                gen[:, step : step + 1],
                attention_mask=torch.ones(1, T + step + 1, dtype=torch.long, device=dev),
                position_ids=torch.tensor([[T + step]], device=dev),
                past_key_values=cache,
                use_cache=True,
            )
            assert (out.logits[:, -1].cpu() - cases[f"{case}.step_logits"][:, step]).abs().max() < LOGIT_TOL, f"step {step}"
            assert int(out.logits[0, -1].argmax()) == int(gen[0, step + 1])
            for i in layers:
                if "topk_idx" in captured[i]:
                    step_topk[i].append(captured[i]["topk_idx"])
    for i in layers:
        model.model.layers[i].self_attn.capture = None
    return step_topk


def test_decode_dense(model, cases):
    topk = _decode_case(model, cases, "b", 16)
    assert all(len(v) == 0 for v in topk.values())  # 116 tokens < dense_len: never sparse


def test_decode_across_dense_len(model, cases):
    topk = _decode_case(model, cases, "d", 24)
    for i, steps in topk.items():
        ref = cases[f"d.L{i}.sparse_step_topk_idx"]
        assert len(steps) == ref.shape[0] == 13  # steps 11..23 reach 512 tokens
        assert torch.equal(torch.stack(steps).reshape(ref.shape).cpu(), ref)


def test_left_padded_batch(model, cases):
    dev = model.device
    mask, ids = cases["e.attention_mask"].to(dev), cases["e.input_ids"].to(dev)
    with torch.no_grad():
        given = model(ids, attention_mask=mask, position_ids=cases["e.position_ids"].to(dev)).logits.cpu()
        derived = model(ids, attention_mask=mask).logits.cpu()  # positions from the mask
    real = mask.bool().cpu()
    assert (given - cases["e.logits"])[real].abs().max() < LOGIT_TOL
    assert (derived - cases["e.logits"])[real].abs().max() < LOGIT_TOL


@pytest.mark.parametrize("case,n", [("b", 17), ("d", 25)])
def test_generate_greedy_matches_reference(model, cases, case, n):
    ids = cases[f"{case}.prompt_ids"].to(model.device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    assert torch.equal(out[:, ids.shape[1] :].cpu(), cases[f"{case}.generated_ids"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_triton_path_close_to_bf16_reference(tiny_model, cases):
    """bf16 on CUDA: the Triton kernels (sparse and lightning) against the reference ops on the same card."""
    from sala.ops import reference_ops

    model = copy.deepcopy(tiny_model).to("cuda", torch.bfloat16)  # a copy: the session model stays fp32
    ids = cases["c1151.input_ids"].cuda()
    with torch.no_grad():
        fast = model(ids).logits
        with reference_ops():
            ref = model(ids).logits
    assert torch.isfinite(fast).all()
    assert (fast - ref).norm() / ref.norm() < 2e-2
    assert (fast.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
