"""Teacher Transformer -> SALA hybrid: config and weight transfer (SPEC section 5, HALO initialisation).

Lightning layers take q/k/v/o from the teacher's attention with the K/V heads expanded to the query
heads (``repeat_interleave`` over heads, HALO's "un-sharing"), the teacher's q/k norms where it has them
(else ones); ``z_proj`` and ``o_norm`` are new (normal(0, initializer_range), ones). Kept attention
layers become sparse layers without RoPE (NoPE) and with a new ``o_gate``. Embeddings, norms, MLPs and
the LM head are copied. A plain Llama gets neutral muP (``scale_emb`` 1, ``scale_depth`` sqrt(L) so the
residual factor is 1, ``dim_model_base`` = hidden), a MiniCPM teacher keeps its own muP values.

With every layer kept as attention, ``keep_rope=True``, no output gate and dense attention, the SALA
model computes the teacher's function (tested to 1e-4 in float32).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import SPARSE_DEFAULTS, SALAConfig
from ..modeling import SALAForCausalLM
from .layer_map import mixer_types
from .teacher import TeacherError, TeacherSpec


@dataclass
class ConvertOptions:
    """Knobs of the conversion; the defaults are the release's choices."""

    keep_rope: bool = False  # kept attention layers keep the teacher's RoPE (equivalence tests)
    attn_output_gate: bool = True  # new o_gate on kept attention layers
    lightning_output_gate: bool = True  # z_proj on lightning layers
    lightning_output_norm: bool = True  # o_norm on lightning layers
    qk_norm: bool = True  # per-head q/k RMSNorm on lightning layers (teacher's weights or ones)
    sparse: dict = field(default_factory=dict)  # overrides of the chosen sparse_config
    max_position_embeddings: int | None = None  # default: max(teacher's, 524288)
    seed: int = 0


def choose_sparse_config(spec: TeacherSpec, overrides: dict | None = None) -> dict:
    """InfLLM-V2 settings for a converted model, with the reasoning in ``sparse_config_reason``.

    The block geometry (compression kernel 32 / stride 16, 64-token blocks, 1 initial block) is about
    token counts, not model width, so the release's values stay. Attention is dense up to
    ``dense_len = min(8192, teacher context)``: inside the context the teacher was trained on, the kept
    layers attend exactly as it did; beyond it InfLLM-V2 takes over. The local window is a quarter of
    that (at most the release's 2048) and ``topk`` the release's 64 blocks, so a sparse query reads about
    ``window + 64 * 64`` keys.
    """
    dense_len = min(8192, max(SPARSE_DEFAULTS["block_size"] * 4, spec.max_position_embeddings))
    window = min(SPARSE_DEFAULTS["window_size"], max(SPARSE_DEFAULTS["block_size"], (dense_len // 4) // 64 * 64))
    cfg = dict(SPARSE_DEFAULTS, dense_len=dense_len, window_size=window)
    cfg.update(overrides or {})
    return cfg


def sparse_config_reason(cfg: dict) -> str:
    return (f"dense attention below {cfg['dense_len']} tokens (the teacher's context, at most 8192); above it "
            f"InfLLM-V2 with {cfg['block_size']}-token blocks, top-{cfg['topk']} blocks + a {cfg['window_size']}-token "
            f"local window + {cfg['init_blocks']} initial block, compression kernel {cfg['kernel_size']}/{cfg['kernel_stride']}")


def build_config(spec: TeacherSpec, attention_layers: list[int], opts: ConvertOptions | None = None) -> SALAConfig:
    """The SALA config of a teacher converted with the given attention layers."""
    opts = opts or ConvertOptions()
    if attention_layers and spec.num_heads * spec.head_dim != spec.hidden_size:
        raise TeacherError(
            f"teacher heads x head_dim = {spec.num_heads} x {spec.head_dim} != hidden_size {spec.hidden_size}: "
            "SALA's sparse layers use head_dim = hidden // heads, so no layer of this teacher can stay attention "
            "(convert all layers to lightning, or pick another teacher)"
        )
    if spec.mup is not None:
        mup = dict(spec.mup)
    else:
        # Neutral muP: the SALA model computes plain Llama numerics (residual factor and logit divisor 1).
        mup = {"scale_emb": 1.0, "scale_depth": math.sqrt(spec.num_layers), "dim_model_base": spec.hidden_size}
    return SALAConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        lightning_nh=spec.num_heads,
        lightning_nkv=spec.num_heads,  # K/V heads are expanded to the query heads
        lightning_head_dim=spec.head_dim,
        lightning_scale="1/sqrt(d)",
        lightning_use_rope=True,
        attn_use_rope=opts.keep_rope,
        qk_norm=opts.qk_norm,
        use_output_norm=opts.lightning_output_norm,
        use_output_gate=opts.lightning_output_gate,
        attn_use_output_gate=opts.attn_output_gate,
        rms_norm_eps=spec.rms_norm_eps,
        rope_theta=spec.rope_theta,
        max_position_embeddings=opts.max_position_embeddings or max(spec.max_position_embeddings, 524288),
        initializer_range=spec.initializer_range,
        mixer_types=mixer_types(spec.num_layers, attention_layers),
        sparse_config=choose_sparse_config(spec, opts.sparse),
        bos_token_id=spec.bos_token_id,
        eos_token_id=spec.eos_token_id,
        pad_token_id=_pad_id(spec),
        tie_word_embeddings=spec.tie_word_embeddings,
        **mup,
    )


def _pad_id(spec: TeacherSpec) -> int | None:
    """The teacher's pad id unless it is a real token (SmolLM2 pads with EOS): an embedding's padding_idx
    gets no gradient, which would freeze the EOS embedding during training."""
    eos = spec.eos_token_id if isinstance(spec.eos_token_id, list) else [spec.eos_token_id]
    return None if spec.pad_token_id in set(eos) | {spec.bos_token_id} else spec.pad_token_id


def expand_kv_heads(w: torch.Tensor, num_kv: int, num_heads: int) -> torch.Tensor:
    """``[kv * d, in]`` -> ``[heads * d, in]``: each K/V head repeated for the query heads that share it."""
    if num_heads % num_kv:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv} K/V heads")
    rep = num_heads // num_kv
    d = w.shape[0] // num_kv
    return w.view(num_kv, d, w.shape[1]).repeat_interleave(rep, dim=0).reshape(num_heads * d, w.shape[1])


def transferred_state(teacher_sd: dict[str, torch.Tensor], spec: TeacherSpec, config: SALAConfig) -> tuple[dict, list[str]]:
    """The SALA tensors taken from the teacher, and the notes on what was approximated."""
    out: dict[str, torch.Tensor] = {}
    notes: list[str] = []
    copy_names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        copy_names.append("lm_head.weight")
    for name in copy_names:
        if name == "lm_head.weight" and name not in teacher_sd:
            out[name] = teacher_sd["model.embed_tokens.weight"]  # tied teacher, untied student
            continue
        out[name] = teacher_sd[name]
    for i, mixer in enumerate(config.mixer_types):
        p = f"model.layers.{i}."
        for n in ("input_layernorm.weight", "post_attention_layernorm.weight",
                  "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                  "self_attn.q_proj.weight", "self_attn.o_proj.weight"):
            out[p + n] = teacher_sd[p + n]
        k, v = teacher_sd[p + "self_attn.k_proj.weight"], teacher_sd[p + "self_attn.v_proj.weight"]
        if mixer == "lightning-attn":
            k = expand_kv_heads(k, spec.num_kv_heads, spec.num_heads)
            v = expand_kv_heads(v, spec.num_kv_heads, spec.num_heads)
            if config.qk_norm and spec.qk_norm:
                out[p + "self_attn.q_norm.weight"] = teacher_sd[p + "self_attn.q_norm.weight"]
                out[p + "self_attn.k_norm.weight"] = teacher_sd[p + "self_attn.k_norm.weight"]
        elif spec.qk_norm:
            notes.append(f"layer {i}: the teacher's q/k norms are dropped (sparse layers have none)")
        out[p + "self_attn.k_proj.weight"] = k
        out[p + "self_attn.v_proj.weight"] = v
    return out, notes + list(spec.notes)


def convert_model(teacher, spec: TeacherSpec, attention_layers: list[int], opts: ConvertOptions | None = None,
                  dtype: torch.dtype = torch.float32) -> tuple[SALAForCausalLM, dict]:
    """Build the SALA model from a loaded teacher; returns (model, report)."""
    opts = opts or ConvertOptions()
    config = build_config(spec, attention_layers, opts)
    torch.manual_seed(opts.seed)
    model = SALAForCausalLM(config).to(torch.float32)  # fresh params: normal(0, initializer_range), norms 1
    teacher_sd = {k: v.detach() for k, v in teacher.state_dict().items()}
    state, notes = transferred_state(teacher_sd, spec, config)
    own = model.state_dict()
    for name, t in state.items():
        if name not in own:
            raise TeacherError(f"internal: transferred tensor {name} has no place in the SALA model")
        if own[name].shape != t.shape:
            raise TeacherError(f"{name}: teacher shape {tuple(t.shape)} != SALA shape {tuple(own[name].shape)}")
        with torch.no_grad():
            own[name].copy_(t.to(torch.float32))
    model = model.to(dtype)
    new = sorted(n for n in own if n not in state and not (config.tie_word_embeddings and n == "lm_head.weight"))
    report = {
        "attention_layers": list(attention_layers),
        "lightning_layers": config.lightning_layers,
        "sparse_config": config.sparse_config,
        "sparse_config_reason": sparse_config_reason(config.sparse_config),
        "mup": {"scale_emb": config.scale_emb, "scale_depth": config.scale_depth,
                "dim_model_base": config.dim_model_base, "residual_scale": config.residual_scale,
                "logit_divisor": config.logit_divisor},
        "options": asdict(opts),
        "teacher": spec.to_dict(),
        "transferred_tensors": len(state),
        "new_tensors": new,
        "notes": notes,
    }
    return model, report


def save_converted(model: SALAForCausalLM, out_dir: str | Path, tokenizer=None, report: dict | None = None) -> Path:
    """Write config.json, model.safetensors, the tokenizer and conversion.json into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if report is not None:
        (out / "conversion.json").write_text(json.dumps(report, indent=1, default=str))
    return out
