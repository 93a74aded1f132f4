"""Model behaviour beyond the fixtures: any valid config, cache consistency, save/load, bf16, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import sala
from sala import CheckpointError, ConfigError, SALAConfig, SALAForCausalLM
from sala.modeling import CACHE_FIELD
from sala.testing import make_model, random_ids, small_config


CONFIGS = {
    "gqa3_9heads": dict(num_attention_heads=9, num_key_value_heads=3, lightning_nkv=9, hidden_size=144, head_dim=16),
    "gqa6": {},
    "lightning_gqa": dict(lightning_nkv=3),
    "all_lightning": dict(mixer_types=["lightning"] * 4),
    "all_sparse_rope": dict(mixer_types=["minicpm4"] * 4, attn_use_rope=True),
    "no_gates_norms": dict(qk_norm=False, use_output_norm=False, use_output_gate=False, attn_use_output_gate=False),
    "head_dim_32": dict(head_dim=32, num_attention_heads=3, num_key_value_heads=1, lightning_nkv=3),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_then_decode_equals_full_forward(name):
    cfg = small_config(**CONFIGS[name])
    model = make_model(cfg)
    ids = random_ids(cfg, 2, 90)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :70], use_cache=True)
        cache = getattr(out, CACHE_FIELD)
        steps = [out.logits]
        for t in range(70, 90):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    inc = torch.cat(steps, dim=1)
    assert full.shape == (2, 90, cfg.vocab_size)
    torch.testing.assert_close(inc, full, atol=2e-5, rtol=1e-4)


def test_chunked_prefill_on_sparse_path_equals_one_shot():
    """A prefill continued on top of a cache (q_len > 1) equals one prefill of the whole sequence, sparse path on."""
    cfg = small_config(sparse_config=dict(kernel_size=32, kernel_stride=16, init_blocks=1, block_size=64,
                                          window_size=64, topk=2, dense_len=256))
    model = make_model(cfg)
    ids = random_ids(cfg, 1, 700)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        first = model(ids[:, :300], use_cache=True)
        rest = model(ids[:, 300:], past_key_values=getattr(first, CACHE_FIELD), use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits[:, :0], rest.logits], 1), full[:, 300:], atol=2e-5, rtol=1e-4)


def test_left_padding_equals_each_row_alone():
    cfg = small_config()
    model = make_model(cfg)
    a, b = random_ids(cfg, 1, 50, seed=3), random_ids(cfg, 1, 80, seed=4)
    ids = torch.full((2, 80), cfg.pad_token_id)
    ids[0, 30:], ids[1] = a[0], b[0]
    mask = torch.ones(2, 80, dtype=torch.long)
    mask[0, :30] = 0
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        alone_a = model(a).logits
        alone_b = model(b).logits
    torch.testing.assert_close(batch[0, 30:], alone_a[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(batch[1], alone_b[0], atol=2e-5, rtol=1e-4)


def test_generate_left_padded_batch_matches_single_rows():
    cfg = small_config()
    model = make_model(cfg)
    a, b = random_ids(cfg, 1, 20, seed=5), random_ids(cfg, 1, 33, seed=6)
    ids = torch.full((2, 33), cfg.pad_token_id)
    ids[0, 13:], ids[1] = a[0], b[0]
    mask = (torch.arange(33)[None] >= torch.tensor([[13], [0]])).long()
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=cfg.pad_token_id, eos_token_id=None)
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, **kw)
        ra = model.generate(a, attention_mask=torch.ones_like(a), **kw)
        rb = model.generate(b, attention_mask=torch.ones_like(b), **kw)
    assert torch.equal(batch[0, 33:], ra[0, 20:])
    assert torch.equal(batch[1, 33:], rb[0, 33:])


def test_generate_sampling_runs_and_is_seeded():
    cfg = small_config()
    model = make_model(cfg)
    ids = random_ids(cfg, 1, 12)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        with torch.no_grad():
            outs.append(model.generate(ids, max_new_tokens=10, do_sample=True, temperature=0.9, top_p=0.9,
                                       eos_token_id=None, pad_token_id=0))
    assert outs[0].shape == (1, 22) and torch.equal(outs[0], outs[1])


def test_save_load_round_trip_with_auto_classes(tmp_path):
    cfg = small_config()
    model = make_model(cfg)
    ids = random_ids(cfg, 1, 40)
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    with torch.no_grad():
        ref = model(ids).logits
        for folder in ("single", "sharded"):
            again = AutoModelForCausalLM.from_pretrained(str(tmp_path / folder)).eval()
            assert isinstance(again, SALAForCausalLM)
            torch.testing.assert_close(again(ids).logits, ref, atol=0, rtol=0)
    assert isinstance(AutoConfig.from_pretrained(str(tmp_path / "single")), SALAConfig)
    assert type(AutoModel.from_pretrained(str(tmp_path / "single"))).__name__ == "SALAModel"


def test_release_tensor_names(fixture_dir):
    """Loading uses the official names; every tensor of the release layout is consumed and nothing else exists."""
    from sala.config import release_config

    with torch.device("meta"):
        model = SALAForCausalLM(release_config())
    names = set(model.state_dict())
    assert "model.layers.0.self_attn.o_gate.weight" in names
    assert {f"model.layers.1.self_attn.{n}.weight" for n in ("z_proj", "q_norm", "k_norm", "o_norm")} <= names
    assert model.state_dict()["model.layers.1.self_attn.k_proj.weight"].shape == (4096, 4096)
    assert model.state_dict()["model.layers.0.self_attn.k_proj.weight"].shape == (256, 4096)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(9.477e9, rel=2e-3)
    assert set(load_file(str(fixture_dir / "model.safetensors"))) == set(
        SALAForCausalLM(SALAConfig.from_pretrained(str(fixture_dir))).state_dict()
    )


def test_bfloat16_close_to_float32(tiny_model, cases):
    ids = cases["c1151.input_ids"][:, :700]  # crosses dense_len: sparse path in bf16
    bf = SALAForCausalLM(tiny_model.config).eval()
    bf.load_state_dict(tiny_model.state_dict())
    bf = bf.to(torch.bfloat16)
    with torch.no_grad():
        ref = tiny_model(ids).logits
        got = bf(ids).logits
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    rel = (got - ref).norm() / ref.norm()
    assert rel < 3e-2, f"bf16 relative error {rel:.3g}"
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


# ---------------------------------------------------------------- bad input
def _write_checkpoint(model, folder):
    model.save_pretrained(folder)
    return folder / "model.safetensors"


def test_missing_tensor_is_an_error(tmp_path):
    model = make_model(small_config())
    path = _write_checkpoint(model, tmp_path)
    sd = load_file(str(path))
    del sd["model.layers.1.self_attn.o_gate.weight"]
    save_file(sd, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="o_gate"):
        SALAForCausalLM.from_pretrained(str(tmp_path))


def test_wrong_shape_is_an_error(tmp_path):
    model = make_model(small_config())
    path = _write_checkpoint(model, tmp_path)
    sd = load_file(str(path))
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.randn(32, 96)
    save_file(sd, str(path), metadata={"format": "pt"})
    with pytest.raises((CheckpointError, RuntimeError, ValueError), match="k_proj"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path))


def test_unexpected_tensor_is_an_error(tmp_path):
    model = make_model(small_config())
    path = _write_checkpoint(model, tmp_path)
    sd = load_file(str(path))
    sd["model.layers.1.self_attn.q_norm.weight"] = torch.ones(16)  # a lightning-only tensor on a sparse layer
    save_file(sd, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="q_norm"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path))


def test_corrupt_file_is_an_error(tmp_path):
    model = make_model(small_config())
    path = _write_checkpoint(model, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path))


def test_missing_shard_is_an_error(tmp_path):
    model = make_model(small_config())
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    next(tmp_path.glob("model-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="shard .* is missing"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path))


def test_mismatched_config_is_an_error(tmp_path):
    model = make_model(small_config())
    _write_checkpoint(model, tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["mixer_types"] = ["minicpm4", "minicpm4", "lightning", "minicpm4"]  # layer 0 weights are lightning-shaped
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises((CheckpointError, RuntimeError, ValueError)):
        AutoModelForCausalLM.from_pretrained(str(tmp_path))


def test_invalid_config_file_is_an_error(tmp_path):
    model = make_model(small_config())
    _write_checkpoint(model, tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["num_key_value_heads"] = 4
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="num_key_value_heads=4"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("bad", [-1, 97, 10_000])
def test_token_ids_out_of_range(bad):
    cfg = small_config()
    model = make_model(cfg)
    ids = random_ids(cfg, 1, 10)
    ids[0, 4] = bad
    with pytest.raises(ValueError, match=f"token id {bad} is out of range"):
        model(ids)


def test_context_longer_than_maximum():
    cfg = small_config(max_position_embeddings=64)
    model = make_model(cfg)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=64"):
        model(random_ids(cfg, 1, 65))
    with torch.no_grad():
        out = model(random_ids(cfg, 1, 64), use_cache=True)
        with pytest.raises(ValueError, match="65 tokens exceeds"):
            model(random_ids(cfg, 1, 1), past_key_values=getattr(out, CACHE_FIELD))


def test_attention_mask_of_wrong_length():
    cfg = small_config()
    model = make_model(cfg)
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(random_ids(cfg, 1, 10), attention_mask=torch.ones(1, 9, dtype=torch.long))


def test_training_step_has_gradients_everywhere():
    cfg = small_config()
    model = make_model(cfg).train()
    ids = random_ids(cfg, 2, 70)
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def test_import_registers_auto_classes():
    assert AutoConfig.for_model("minicpm_sala").__class__ is SALAConfig
    assert sala.SALAForCausalLM is SALAForCausalLM


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = small_config()
    model = make_model(cfg).train()
    ids = random_ids(cfg, 2, 70)
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("how", ["cu_seqlens", "position_ids"])
def test_packed_documents_equal_separate_forwards(how):
    """Documents packed into one row (training) give each document's own logits and gradients flow; the
    sparse path is on (dense_len 128) so both attention kinds and the lightning state are checked."""
    cfg = small_config(sparse_config=dict(kernel_size=32, kernel_stride=16, init_blocks=1, block_size=64,
                                          window_size=64, topk=2, dense_len=128))
    model = make_model(cfg)
    docs = [random_ids(cfg, 1, n, seed=10 + n) for n in (150, 37, 300)]
    row = torch.cat(docs, dim=1)
    bounds = torch.tensor([0, 150, 187, 487])
    if how == "cu_seqlens":
        kw = {"cu_seqlens": bounds}
    else:
        kw = {"position_ids": torch.cat([torch.arange(d.shape[1]) for d in docs])[None]}
    with torch.no_grad():
        packed = model(row, **kw)
        alone = [model(d).logits for d in docs]
    assert getattr(packed, CACHE_FIELD) is None
    for d, (s, e) in zip(alone, zip(bounds[:-1].tolist(), bounds[1:].tolist())):
        torch.testing.assert_close(packed.logits[:, s:e], d, atol=2e-5, rtol=1e-4)
    model.train()
    loss = model(row, labels=row, **kw).loss
    loss.backward()
    assert torch.isfinite(loss) and model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_packed_documents_bad_boundaries():
    cfg = small_config()
    model = make_model(cfg)
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0"):
        model(random_ids(cfg, 1, 20), cu_seqlens=torch.tensor([0, 5, 19]))
    with pytest.raises(ValueError, match="batch size 1"):
        model(random_ids(cfg, 2, 20), cu_seqlens=torch.tensor([0, 5, 20]))


def test_single_left_padded_row_is_not_taken_for_packing():
    cfg = small_config()
    model = make_model(cfg)
    ids = random_ids(cfg, 1, 30)
    mask = torch.ones(1, 30, dtype=torch.long)
    mask[0, :6] = 0
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits  # positions 1,1,...,0,1,2 from the mask
        alone = model(ids[:, 6:]).logits
    torch.testing.assert_close(padded[:, 6:], alone, atol=2e-5, rtol=1e-4)


def test_lightning_kernel_runs_in_the_autocast_dtype(monkeypatch):
    """Under bf16 autocast the q/k norms return float32; the kernel must still get bf16 (not a float32 promote)."""
    from sala import ops
    from sala.testing import make_model, random_ids, small_config

    seen = []
    real = ops.lightning_prefill

    def spy(q, k, v, *a, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(ops, "lightning_prefill", spy)
    model = make_model(small_config(), 0)
    ids = random_ids(model.config, 2, 24, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, use_cache=False)
    assert seen and all(d == (torch.bfloat16,) * 3 for d in seen)
    seen.clear()
    model(ids, use_cache=False)
    assert seen and all(d == (torch.float32,) * 3 for d in seen)
