import math

import pytest
import torch

from sala import SALAForCausalLM
from sala.convert.teacher import TeacherError, teacher_spec
from sala.convert.transfer import ConvertOptions, build_config, convert_model, expand_kv_heads, save_converted


def _equivalent_opts():
    return ConvertOptions(keep_rope=True, attn_output_gate=False, sparse={"dense_len": 4096})


@pytest.mark.parametrize("tie", [False, True])
def test_all_attention_conversion_reproduces_teacher_logits(llama_factory, tie):
    teacher = llama_factory(tie=tie)
    spec = teacher_spec(teacher.config)
    model, report = convert_model(teacher, spec, list(range(4)), _equivalent_opts())
    assert report["mup"]["residual_scale"] == 1.0 and report["mup"]["logit_divisor"] == 1.0
    ids = torch.randint(0, 97, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = teacher(ids).logits.float()
        got = model(ids, use_cache=False).logits
    assert want.abs().max() > 0.5  # not a degenerate comparison
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_equivalence_fails_without_rope(llama_factory):
    """The test above can fail: dropping RoPE (NoPE, the hybrid's default) changes the function."""
    teacher = llama_factory()
    spec = teacher_spec(teacher.config)
    model, _ = convert_model(teacher, spec, list(range(4)),
                             ConvertOptions(keep_rope=False, attn_output_gate=False, sparse={"dense_len": 4096}))
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (model(ids, use_cache=False).logits - teacher(ids).logits).abs().max()
    assert diff > 1e-2


def test_expand_kv_heads_matches_teacher_gqa():
    w = torch.randn(2 * 3, 5)  # 2 kv heads of dim 3
    e = expand_kv_heads(w, 2, 4)
    assert torch.equal(e[0:3], w[0:3]) and torch.equal(e[3:6], w[0:3])
    assert torch.equal(e[6:9], w[3:6]) and torch.equal(e[9:12], w[3:6])


def test_lightning_layers_take_teacher_projections(llama_factory):
    teacher = llama_factory()
    spec = teacher_spec(teacher.config)
    model, report = convert_model(teacher, spec, [0, 3])
    assert report["lightning_layers"] == [1, 2] and report["attention_layers"] == [0, 3]
    t_attn = teacher.model.layers[1].self_attn
    s_attn = model.model.layers[1].self_attn
    assert torch.equal(s_attn.q_proj.weight, t_attn.q_proj.weight)
    assert torch.equal(s_attn.o_proj.weight, t_attn.o_proj.weight)
    assert torch.equal(s_attn.k_proj.weight, expand_kv_heads(t_attn.k_proj.weight, 2, 4))
    assert torch.equal(s_attn.q_norm.weight, torch.ones(8))  # Llama has no q/k norm: ones
    assert torch.equal(s_attn.o_norm.weight, torch.ones(32))
    z = s_attn.z_proj.weight
    assert abs(z.std().item() - 0.2) < 0.05  # normal(0, initializer_range)
    kept = model.model.layers[0].self_attn
    assert not kept.use_rope and kept.o_gate is not None
    assert torch.equal(kept.k_proj.weight, teacher.model.layers[0].self_attn.k_proj.weight)
    assert "model.layers.1.self_attn.z_proj.weight" in report["new_tensors"]
    assert "model.layers.0.self_attn.o_gate.weight" in report["new_tensors"]
    assert not any("mlp" in n or "embed" in n for n in report["new_tensors"])


def test_neutral_mup_and_config_fields(llama_factory):
    teacher = llama_factory(layers=3)
    cfg = build_config(teacher_spec(teacher.config), [0])
    assert cfg.scale_emb == 1.0 and cfg.dim_model_base == 32
    assert cfg.scale_depth == math.sqrt(3) and cfg.residual_scale == 1.0
    assert cfg.rope_theta == 5000.0 and cfg.rms_norm_eps == 1e-5
    assert cfg.lightning_nkv == 4 and cfg.num_key_value_heads == 2
    assert not cfg.attn_use_rope and cfg.sparse_config["dense_len"] == 256


def test_saved_checkpoint_reloads_strictly(llama_factory, tmp_path):
    teacher = llama_factory(tie=True)
    model, report = convert_model(teacher, teacher_spec(teacher.config), [1])
    save_converted(model, tmp_path / "out", report=report)
    again = SALAForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(again(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
    assert (tmp_path / "out" / "conversion.json").is_file()


def test_unsupported_teacher_is_refused():
    from transformers import GPT2Config

    with pytest.raises(TeacherError, match="unsupported teacher architecture"):
        teacher_spec(GPT2Config())


def test_head_dim_mismatch_is_refused_for_kept_layers(llama_factory):
    from transformers import LlamaConfig

    spec = teacher_spec(LlamaConfig(hidden_size=32, num_attention_heads=4, head_dim=16, num_hidden_layers=2,
                                    intermediate_size=8, vocab_size=10))
    with pytest.raises(TeacherError, match="head_dim"):
        build_config(spec, [0])
    assert build_config(spec, []).lightning_layers == [0, 1]
