import pytest
import torch

from sala.convert.teacher import TeacherError, fetch_default_teacher, load_teacher, teacher_spec
from sala.convert.transfer import ConvertOptions, convert_model


def test_missing_and_wrong_paths_give_clear_errors(tmp_path):
    with pytest.raises(TeacherError, match="not found"):
        load_teacher(tmp_path / "nope")
    with pytest.raises(TeacherError, match="no config.json"):
        load_teacher(tmp_path)
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(TeacherError, match="not a .gguf"):
        load_teacher(tmp_path / "w.bin")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "w.bin").unlink()
    with pytest.raises(TeacherError, match="no weights"):
        load_teacher(tmp_path)


def test_hf_folder_roundtrip(llama_factory, tmp_path):
    teacher = llama_factory(tie=True)
    teacher.save_pretrained(tmp_path / "t")
    model, tok, spec = load_teacher(tmp_path / "t")
    assert tok is None and spec.model_type == "llama" and spec.tie_word_embeddings
    assert spec.num_kv_heads == 2 and spec.rope_theta == 5000.0
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, teacher(ids).logits)


def test_rope_scaling_is_refused():
    from transformers import LlamaConfig

    cfg = LlamaConfig(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(TeacherError, match="RoPE scaling"):
        teacher_spec(cfg)


def test_qwen3_teacher_norms_are_carried(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
    t = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        t.model.layers[1].self_attn.q_norm.weight.uniform_(0.5, 1.5)
    spec = teacher_spec(t.config)
    assert spec.qk_norm
    m, rep = convert_model(t, spec, [0])
    assert torch.equal(m.model.layers[1].self_attn.q_norm.weight, t.model.layers[1].self_attn.q_norm.weight)
    assert any("q/k norms are dropped" in n for n in rep["notes"])


@pytest.mark.slow
def test_default_teacher_smollm2_converts_exactly():
    """The real SmolLM2-135M (fetched once into the cache): all-attention conversion with RoPE kept
    reproduces it; the default hybrid conversion does not (NoPE + fresh lightning layers)."""
    folder = fetch_default_teacher()
    teacher, tok, spec = load_teacher(folder)
    assert (spec.model_type, spec.num_layers, spec.num_heads, spec.num_kv_heads) == ("llama", 30, 9, 3)
    assert spec.rope_theta == 100000.0 and spec.tie_word_embeddings
    ids = tok("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    opts = ConvertOptions(keep_rope=True, attn_output_gate=False)
    model, rep = convert_model(teacher, spec, list(range(30)), opts)
    assert model.config.pad_token_id is None  # SmolLM2 pads with EOS: no frozen embedding row
    with torch.no_grad():
        want = teacher(ids).logits.float()
        got = model(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert tok.decode(got[0, -1].argmax()) == tok.decode(want[0, -1].argmax())
