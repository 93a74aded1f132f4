"""SALAConfig reads every key of the release and rejects invalid configs with a message naming key and value."""

from __future__ import annotations

import json

import pytest

from sala.config import LIGHTNING, SPARSE, ConfigError, SALAConfig, release_config

RELEASE_KEYS = {
    "vocab_size": 73448, "hidden_size": 4096, "intermediate_size": 16384, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128, "lightning_nh": 32, "lightning_nkv": 32,
    "lightning_head_dim": 128, "lightning_scale": "1/sqrt(d)", "lightning_use_rope": True, "attn_use_rope": False,
    "qk_norm": True, "use_output_norm": True, "use_output_gate": True, "attn_use_output_gate": True,
    "attention_bias": False, "attention_dropout": 0.0, "hidden_act": "silu", "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0, "max_position_embeddings": 524288, "scale_emb": 12, "scale_depth": 1.4,
    "dim_model_base": 256, "mup_denominator": 32, "initializer_range": 0.1, "pretraining_tp": 1,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": [2, 73440], "pad_token_id": 2,
    "use_cache": True, "shift_labels": True,
}


def release_json() -> dict:
    sparse = {0, 9, 16, 17, 22, 29, 30, 31}
    return {
        "architectures": ["MiniCPMSALAForCausalLM"], "model_type": "minicpm_sala",
        "auto_map": {"AutoConfig": "configuration_minicpm_sala.MiniCPMSALAConfig"},
        "rope_scaling": None, "torch_dtype": "bfloat16", "transformers_version": "4.57.1",
        **RELEASE_KEYS,
        "mixer_types": ["minicpm4" if i in sparse else "lightning-attn" for i in range(32)],
        "sparse_config": {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64,
                          "window_size": 2048, "topk": 64, "use_nope": False, "dense_len": 8192},
    }


def test_release_config_reads_every_key(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(release_json()))
    cfg = SALAConfig.from_pretrained(str(tmp_path))
    for key, value in RELEASE_KEYS.items():
        assert getattr(cfg, key) == value, key
    assert cfg.sparse_layers == [0, 9, 16, 17, 22, 29, 30, 31]
    assert cfg.sparse_config["dense_len"] == 8192 and cfg.sparse_config["topk"] == 64
    assert abs(cfg.residual_scale - 1.4 / 32**0.5) < 1e-12
    assert cfg.logit_divisor == 16
    assert cfg.lightning_q_scale == 128**-0.5
    assert release_config().to_dict()["mixer_types"] == cfg.to_dict()["mixer_types"]


def test_defaults_are_the_release():
    cfg = release_config()
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.lightning_nkv) == (4096, 32, 2, 32)
    assert cfg.sparse_config["window_size"] == 2048


@pytest.mark.parametrize("alias", ["lightning", "lightning_attn", "lightning-attn", "LIGHTNING"])
def test_lightning_aliases(alias):
    cfg = SALAConfig(num_hidden_layers=2, mixer_types=["minicpm4", alias])
    assert cfg.mixer_types == [SPARSE, LIGHTNING]


@pytest.mark.parametrize("alias", ["minicpm", "attention", "attn", "standard"])
def test_sparse_aliases(alias):
    assert SALAConfig(num_hidden_layers=1, mixer_types=[alias]).mixer_types == [SPARSE]


def test_lightning_nkv_falls_back_to_num_key_value_heads():
    cfg = SALAConfig(num_hidden_layers=1, mixer_types=["lightning"], num_attention_heads=8, num_key_value_heads=4,
                     hidden_size=64, head_dim=8)
    assert cfg.lightning_nkv == 4


def test_round_trip(tmp_path):
    cfg = release_config()
    cfg.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "auto_map" not in saved  # no pointer to remote code that is not there
    again = SALAConfig.from_pretrained(str(tmp_path))
    assert again.mixer_types == cfg.mixer_types and again.sparse_config == cfg.sparse_config


@pytest.mark.parametrize(
    "change,key,value",
    [
        ({"mixer_types": ["minicpm4", "mamba"]}, "mixer_types[1]", "mamba"),
        ({"num_key_value_heads": 3}, "num_key_value_heads", "3"),
        ({"lightning_nkv": 5}, "lightning_nkv", "5"),
        ({"mixer_types": ["minicpm4"]}, "mixer_types", "minicpm4"),
        ({"sparse_config": {"window_size": 100}}, "sparse_config.window_size", "100"),
        ({"sparse_config": {"kernel_size": 48}}, "sparse_config.kernel_size", "48"),
        ({"sparse_config": {"block_size": 40}}, "sparse_config.block_size", "40"),
        ({"sparse_config": {"topk": 0}}, "sparse_config.topk", "0"),
        ({"sparse_config": {"windowsize": 128}}, "sparse_config", "windowsize"),
        ({"sparse_config": "yes"}, "sparse_config", "yes"),
        ({"lightning_scale": "1/e"}, "lightning_scale", "1/e"),
        ({"hidden_act": "gelu"}, "hidden_act", "gelu"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling", "linear"),
        ({"vocab_size": 0}, "vocab_size", "0"),
        ({"hidden_size": 102}, "hidden_size", "102"),
    ],
)
def test_invalid_configs_name_key_and_value(change, key, value):
    kw = dict(num_hidden_layers=2, mixer_types=["minicpm4", "lightning"], hidden_size=64, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, lightning_nkv=4, intermediate_size=128, vocab_size=100)
    kw.update(change)
    with pytest.raises(ConfigError) as err:
        SALAConfig(**kw)
    assert key in str(err.value) and value in str(err.value)


def test_invalid_config_fails_at_load(tmp_path):
    data = release_json()
    data["mixer_types"][3] = "flash"
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"mixer_types\[3\]"):
        SALAConfig.from_pretrained(str(tmp_path))
