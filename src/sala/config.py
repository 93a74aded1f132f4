"""``SALAConfig``: the released MiniCPM-SALA ``config.json`` as a transformers config.

Reads every key of the release (refcode.md section 2) with the release's defaults, normalizes the mixer
type aliases, and validates at construction so that a bad config fails at load time with an error that
names the key and the value.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

SPARSE = "minicpm4"
LIGHTNING = "lightning-attn"

MIXER_ALIASES = {
    "minicpm4": SPARSE,
    "minicpm": SPARSE,
    "standard": SPARSE,
    "attention": SPARSE,
    "attn": SPARSE,
    "sparse": SPARSE,
    "lightning-attn": LIGHTNING,
    "lightning_attn": LIGHTNING,
    "lightning": LIGHTNING,
}

SPARSE_DEFAULTS = {
    "kernel_size": 32,
    "kernel_stride": 16,
    "init_blocks": 1,
    "block_size": 64,
    "window_size": 2048,
    "topk": 64,
    "use_nope": False,
    "dense_len": 8192,
}

LIGHTNING_SCALES = ("1/sqrt(d)", "1/d", "1")


class ConfigError(ValueError):
    """An invalid SALA configuration; the message names the key and the value."""


def _bad(key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"invalid MiniCPM-SALA config: {key}={value!r}: {why}")


class SALAConfig(PretrainedConfig):
    """Configuration of a MiniCPM-SALA hybrid model (``model_type = "minicpm_sala"``).

    Defaults are those of the 9B release. ``mixer_types[i]`` is ``"minicpm4"`` (InfLLM-V2 sparse attention)
    or ``"lightning-attn"`` (aliases accepted); when absent every layer is sparse attention.
    """

    model_type = "minicpm_sala"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 73448,
        hidden_size: int = 4096,
        intermediate_size: int = 16384,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int = 2,
        head_dim: int | None = 128,
        lightning_nh: int | None = None,
        lightning_nkv: int | None = None,
        lightning_head_dim: int | None = None,
        lightning_scale: str = "1/sqrt(d)",
        lightning_use_rope: bool = True,
        attn_use_rope: bool = False,
        qk_norm: bool = True,
        use_output_norm: bool = True,
        use_output_gate: bool = True,
        attn_use_output_gate: bool = True,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        hidden_act: str = "silu",
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        max_position_embeddings: int = 524288,
        scale_emb: float = 12,
        scale_depth: float = 1.4,
        dim_model_base: int = 256,
        mup_denominator: int = 32,
        initializer_range: float = 0.1,
        pretraining_tp: int = 1,
        use_cache: bool = True,
        shift_labels: bool = True,
        mixer_types: list[str] | None = None,
        sparse_config: dict | None = None,
        prefill_chunk_tokens: int | None = 32768,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = (2, 73440),
        pad_token_id: int | None = 2,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        kwargs.pop("auto_map", None)  # the release's remote-code map; sala is the local implementation
        if rope_scaling not in (None, {}):
            # Not stored: transformers 5 reinterprets `rope_scaling`; the release uses plain RoPE only.
            raise _bad("rope_scaling", rope_scaling, "RoPE scaling is not used by MiniCPM-SALA; set it to null")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        # The release's config class falls back to num_key_value_heads when lightning_nkv is missing.
        self.lightning_nh = lightning_nh if lightning_nh is not None else num_attention_heads
        self.lightning_nkv = lightning_nkv if lightning_nkv is not None else num_key_value_heads
        self.lightning_head_dim = lightning_head_dim if lightning_head_dim is not None else self.head_dim
        self.lightning_scale = lightning_scale
        self.lightning_use_rope = lightning_use_rope
        self.attn_use_rope = attn_use_rope
        self.qk_norm = qk_norm
        self.use_output_norm = use_output_norm
        self.use_output_gate = use_output_gate
        self.attn_use_output_gate = attn_use_output_gate
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.scale_emb = scale_emb
        self.scale_depth = scale_depth
        self.dim_model_base = dim_model_base
        self.mup_denominator = mup_denominator
        self.initializer_range = initializer_range
        self.pretraining_tp = pretraining_tp
        self.use_cache = use_cache
        self.shift_labels = shift_labels
        # sala's own: cached forwards longer than this run in chunks of it (at least dense_len), so a 1M-token
        # prompt through generate() never holds whole-prompt activations; None runs every input in one piece.
        self.prefill_chunk_tokens = prefill_chunk_tokens
        if mixer_types is None:
            mixer_types = [SPARSE] * num_hidden_layers
        self.mixer_types = [self._normalize_mixer(i, m) for i, m in enumerate(mixer_types)]
        if sparse_config is None and SPARSE in self.mixer_types:
            sparse_config = dict(SPARSE_DEFAULTS)
        if sparse_config is not None and not isinstance(sparse_config, dict):
            raise _bad("sparse_config", sparse_config, "must be a mapping of InfLLM-V2 settings")
        self.sparse_config = None if sparse_config is None else {**SPARSE_DEFAULTS, **sparse_config}
        if isinstance(eos_token_id, tuple):
            eos_token_id = list(eos_token_id)
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate_sala()

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _normalize_mixer(i: int, m: Any) -> str:
        key = str(m).strip().lower() if isinstance(m, str) else m
        if key not in MIXER_ALIASES:
            raise _bad(f"mixer_types[{i}]", m, f"unknown mixer type; expected one of {sorted(MIXER_ALIASES)}")
        return MIXER_ALIASES[key]

    @property
    def sparse_layers(self) -> list[int]:
        return [i for i, m in enumerate(self.mixer_types) if m == SPARSE]

    @property
    def lightning_layers(self) -> list[int]:
        return [i for i, m in enumerate(self.mixer_types) if m == LIGHTNING]

    @property
    def sparse_head_dim(self) -> int:
        """Sparse layers recompute their head size as hidden // heads, as the release does."""
        return self.hidden_size // self.num_attention_heads

    def branch_safe_chunk(self, tokens: int) -> int:
        """A prefill chunk length raised to ``dense_len`` when there are sparse layers.

        A sparse layer takes its dense or sparse branch from the longest position in the forward, so a chunk
        shorter than ``dense_len`` would run the first positions of a long prompt densely where the prompt in
        one piece runs them sparse: chunks of at least ``dense_len`` keep chunked equal to one piece."""
        if self.sparse_layers and self.sparse_config:
            return max(tokens, int(self.sparse_config.get("dense_len", 0)))
        return tokens

    @property
    def residual_scale(self) -> float:
        return self.scale_depth / self.num_hidden_layers**0.5

    @property
    def logit_divisor(self) -> float:
        return self.hidden_size / self.dim_model_base

    @property
    def lightning_q_scale(self) -> float:
        d = self.head_dim
        return {"1/sqrt(d)": d**-0.5, "1/d": 1.0 / d}.get(self.lightning_scale, 1.0)

    # --------------------------------------------------------------- validation
    def validate_sala(self) -> None:
        """Raise ``ConfigError`` naming the key and value of the first inconsistency."""

        def positive(key: str):
            val = getattr(self, key)
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise _bad(key, val, "must be a positive integer")

        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "lightning_nkv", "max_position_embeddings"):
            positive(key)
        if self.prefill_chunk_tokens is not None:
            positive("prefill_chunk_tokens")
        if len(self.mixer_types) != self.num_hidden_layers:
            raise _bad("mixer_types", self.mixer_types,
                       f"has {len(self.mixer_types)} entries but num_hidden_layers={self.num_hidden_layers}")
        if self.hidden_act != "silu":
            raise _bad("hidden_act", self.hidden_act, "only 'silu' (SwiGLU) is supported")
        if self.lightning_scale not in LIGHTNING_SCALES:
            raise _bad("lightning_scale", self.lightning_scale, f"expected one of {LIGHTNING_SCALES}")
        if self.attention_bias:
            raise _bad("attention_bias", self.attention_bias, "the release has no biases")
        if not self.rms_norm_eps > 0:
            raise _bad("rms_norm_eps", self.rms_norm_eps, "must be > 0")
        if self.dim_model_base <= 0:
            raise _bad("dim_model_base", self.dim_model_base, "must be > 0")
        if self.lightning_layers:
            if self.num_attention_heads % self.lightning_nkv:
                raise _bad("lightning_nkv", self.lightning_nkv,
                           f"num_attention_heads={self.num_attention_heads} is not divisible by it")
            if self.lightning_use_rope and self.head_dim % 2:
                raise _bad("head_dim", self.head_dim, "RoPE needs an even head dimension")
        if self.sparse_layers:
            if self.hidden_size % self.num_attention_heads:
                raise _bad("hidden_size", self.hidden_size,
                           f"not divisible by num_attention_heads={self.num_attention_heads} (sparse layers)")
            if self.num_attention_heads % self.num_key_value_heads:
                raise _bad("num_key_value_heads", self.num_key_value_heads,
                           f"num_attention_heads={self.num_attention_heads} is not divisible by it")
            if self.attn_use_rope and self.sparse_head_dim % 2:
                raise _bad("hidden_size", self.hidden_size, "RoPE in sparse layers needs an even head dimension")
            self._validate_sparse_config()

    def _validate_sparse_config(self) -> None:
        sc = self.sparse_config
        if not isinstance(sc, dict):
            raise _bad("sparse_config", sc, "must be a mapping when any layer is 'minicpm4'")
        unknown = set(sc) - set(SPARSE_DEFAULTS)
        if unknown:
            raise _bad("sparse_config", sorted(unknown), f"unknown keys; expected {sorted(SPARSE_DEFAULTS)}")
        for key in ("kernel_size", "kernel_stride", "block_size", "window_size", "topk"):
            val = sc[key]
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise _bad(f"sparse_config.{key}", val, "must be a positive integer")
        if not isinstance(sc["init_blocks"], int) or sc["init_blocks"] < 0:
            raise _bad("sparse_config.init_blocks", sc["init_blocks"], "must be a non-negative integer")
        if not isinstance(sc["dense_len"], int) or isinstance(sc["dense_len"], bool):
            raise _bad("sparse_config.dense_len", sc["dense_len"], "must be an integer (-1 forces the sparse path)")
        if sc["kernel_size"] != 2 * sc["kernel_stride"]:
            raise _bad("sparse_config.kernel_size", sc["kernel_size"],
                       f"InfLLM-V2 compresses with kernel_size == 2 * kernel_stride ({2 * sc['kernel_stride']})")
        if sc["block_size"] % sc["kernel_stride"]:
            raise _bad("sparse_config.block_size", sc["block_size"],
                       f"must be a multiple of kernel_stride={sc['kernel_stride']}")
        if sc["window_size"] % sc["block_size"]:
            raise _bad("sparse_config.window_size", sc["window_size"],
                       f"must be a multiple of block_size={sc['block_size']}")
        if sc["use_nope"] not in (True, False):
            raise _bad("sparse_config.use_nope", sc["use_nope"], "must be a boolean")


def release_config(**overrides) -> SALAConfig:
    """The 9B release's config (sparse layers 0, 9, 16, 17, 22, 29, 30, 31), with optional overrides."""
    sparse = {0, 9, 16, 17, 22, 29, 30, 31}
    kw: dict[str, Any] = dict(
        mixer_types=[SPARSE if i in sparse else LIGHTNING for i in range(32)],
        lightning_nh=32, lightning_nkv=32, lightning_head_dim=128,
        sparse_config=dict(SPARSE_DEFAULTS),
    )
    kw.update(overrides)
    return SALAConfig(**kw)
