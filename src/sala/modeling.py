"""MiniCPM-SALA as transformers models: ``SALAModel`` and ``SALAForCausalLM``.

Numerics follow the release (SPEC section 1): embeddings x ``scale_emb``; each residual branch x
``scale_depth / sqrt(num_layers)``; the final hidden state divided by ``hidden_size / dim_model_base``
before an untied ``lm_head``; logits in float32. Positions come from the attention mask
(``cumsum(mask) - 1``), so left-padded batches work.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .cache import SALACache
from .config import LIGHTNING, SALAConfig
from .layers import fusion
from .layers.common import RMSNorm, SwiGLU, add_rms_norm, residual_add
from .layers.lightning import LightningAttention
from .layers.sparse import SparseAttention
from .ops.linear_ce import chunked_linear_cross_entropy, chunked_linear_kl, cross_entropy_sum, kl_divergence_sum

try:  # transformers >= 4.56: checkpointing through the layer's __call__
    from transformers.modeling_layers import GradientCheckpointingLayer as _LayerBase
except ImportError:  # pragma: no cover
    _LayerBase = nn.Module


# transformers renamed the cache argument and output field from `past_key_values` to `cache` (5.2x); the
# models accept both names and answer with the one this transformers uses.
CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


def _pick_cache(past_key_values, kwargs):
    cache = kwargs.pop("cache", None)
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError("pass the cache as `cache` or `past_key_values`, not both")
    return past_key_values if past_key_values is not None else cache


def _packed_boundaries(cu_seqlens, position_ids, attention_mask, B, T):
    """Document boundaries of a packed row as int64 ``cu_seqlens`` (None when the input is not packed)."""
    unpadded = attention_mask is None or bool(attention_mask.all())
    if cu_seqlens is None and B == 1 and position_ids is not None and T > 1 and unpadded:
        starts = (position_ids[0, 1:] == 0).nonzero().flatten() + 1
        if starts.numel():
            cu_seqlens = torch.cat([starts.new_zeros(1), starts, starts.new_tensor([T])])
    if cu_seqlens is None:
        return None
    cu_seqlens = torch.as_tensor(cu_seqlens, dtype=torch.long, device=position_ids.device if position_ids is not None else None)
    if B != 1:
        raise ValueError(f"packed documents need batch size 1, got {B}")
    if not unpadded:
        raise ValueError("packed documents take no padding mask")
    if cu_seqlens.dim() != 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T or bool((cu_seqlens.diff() < 0).any()):
        raise ValueError(f"cu_seqlens must rise from 0 to the row length {T}, got {cu_seqlens.tolist()}")
    return cu_seqlens


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: missing, unexpected or mis-shaped tensors."""


class SALADecoderLayer(_LayerBase):
    def __init__(self, config: SALAConfig, layer_idx: int):
        super().__init__()
        self.mixer_type = config.mixer_types[layer_idx]
        attn_cls = LightningAttention if self.mixer_type == LIGHTNING else SparseAttention
        self.self_attn = attn_cls(config, layer_idx)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.residual_scale = config.residual_scale

    def forward(self, h, position_ids, token_mask=None, layer_cache=None, cu_seqlens=None):
        attn = self.self_attn(self.input_layernorm(h), position_ids, token_mask, layer_cache, cu_seqlens)
        norm = self.post_attention_layernorm
        h, x = fusion.call(add_rms_norm, h, attn, self.residual_scale, norm.weight, norm.eps)
        return fusion.call(residual_add, h, self.mlp(x), self.residual_scale)


class SALAPreTrainedModel(PreTrainedModel):
    config_class = SALAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SALADecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, strict: bool = True, **kwargs):
        """``PreTrainedModel.from_pretrained`` that refuses a checkpoint with missing, unexpected, mis-shaped or
        unreadable tensors, naming them, instead of silently (re)initializing them. ``strict=False`` allows it."""
        folder = Path(str(pretrained_model_name_or_path))
        if strict and folder.is_dir() and "gguf_file" not in kwargs:
            config = kwargs.get("config")
            if not isinstance(config, SALAConfig):
                config = SALAConfig.from_pretrained(str(folder))
            check_checkpoint(folder, cls, config)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        if strict:
            problems = [f"{k.replace('_', ' ')}: {_list(info.get(k))}" for k in ("missing_keys", "unexpected_keys",
                        "mismatched_keys", "error_msgs") if info.get(k)]
            if problems:
                raise CheckpointError(f"checkpoint {folder} does not match the {cls.__name__} config: " + "; ".join(problems))
        return (model, info) if want_info else model


def _list(items, limit: int = 8) -> str:
    items = sorted(str(x) for x in items)
    return ", ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def checkpoint_tensors(folder: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors of a safetensors checkpoint folder (single file or sharded with an
    index), read from the headers only. Raises ``CheckpointError`` for missing or unreadable files."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index: {err}") from err
        files = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {folder}")
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint shard {path} is missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
            raise CheckpointError(f"cannot read {path}: {err} (corrupt or truncated file?)") from err
    return shapes


def check_checkpoint(folder: Path, cls, config: SALAConfig) -> None:
    """Compare the checkpoint's tensor names and shapes with what ``cls(config)`` expects."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}
    found = checkpoint_tensors(folder)
    if cls is SALAModel:  # the body of a causal-LM checkpoint carries a "model." prefix and an lm_head
        found = {k.removeprefix("model."): v for k, v in found.items() if not k.startswith("lm_head.")}
    if config.tie_word_embeddings:
        found.setdefault("lm_head.weight", found.get("model.embed_tokens.weight", ()))
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [f"{k} (checkpoint {list(found[k])}, model {list(expected[k])})"
                  for k in sorted(set(found) & set(expected)) if found[k] != expected[k]]
    problems = [f"{what}: {_list(items)}" for what, items in
                (("missing tensors", missing), ("unexpected tensors", unexpected), ("wrong shapes", mismatched)) if items]
    if problems:
        raise CheckpointError(f"checkpoint {folder} does not match its config: " + "; ".join(problems))


class SALAModel(SALAPreTrainedModel):
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]  # the body of a causal-LM checkpoint

    def __init__(self, config: SALAConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(SALADecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        # Optional: runs the layers of a one-token decode step instead of the loop below (sala.engine.graphs
        # installs one that replays lightning layers as CUDA graphs); its ``run`` returns None to decline.
        self.decode_runner = None
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: SALACache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cu_seqlens: torch.LongTensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """``cu_seqlens`` (or, with batch 1, ``position_ids`` that restart at 0) marks packed documents: no
        lightning state and no attention crosses a document boundary. A packed forward keeps no cache."""
        cfg = self.config
        past_key_values = _pick_cache(past_key_values, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
            if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size):
                bad = input_ids[(input_ids < 0) | (input_ids >= cfg.vocab_size)]
                raise ValueError(f"token id {int(bad[0])} is out of range for vocab_size={cfg.vocab_size}")
            inputs_embeds = self.embed_tokens(input_ids)
        B, T = inputs_embeds.shape[:2]
        if use_cache is None:
            use_cache = cfg.use_cache and not self.training
        if use_cache and not isinstance(past_key_values, SALACache):
            if past_key_values is not None and past_key_values.get_seq_length() > 0:
                raise ValueError(f"past_key_values must be a SALACache, got {type(past_key_values).__name__}")
            past_key_values = SALACache(cfg)
        if not use_cache:
            past_key_values = None
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past + T > cfg.max_position_embeddings:
            raise ValueError(
                f"context of {past + T} tokens exceeds max_position_embeddings={cfg.max_position_embeddings}"
            )
        cu_seqlens = _packed_boundaries(cu_seqlens, position_ids, attention_mask, B, T)
        if cu_seqlens is not None:
            if past:
                raise ValueError("packed documents (cu_seqlens / restarting position_ids) cannot continue a cache")
            past_key_values = None
            if position_ids is None:
                starts = torch.repeat_interleave(cu_seqlens[:-1], cu_seqlens.diff())
                position_ids = (torch.arange(T, device=cu_seqlens.device) - starts)[None]
        token_mask = None
        if attention_mask is not None:
            if attention_mask.shape != (B, past + T):
                raise ValueError(
                    f"attention_mask must be [batch, past + new] = [{B}, {past + T}], got {tuple(attention_mask.shape)}"
                )
            if not bool(attention_mask.all()):
                token_mask = attention_mask[:, -T:].bool()
        if position_ids is None:
            if attention_mask is not None:
                pos = attention_mask.long().cumsum(-1) - 1
                position_ids = pos.masked_fill(attention_mask == 0, 1)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=inputs_embeds.device).expand(B, T)

        h = inputs_embeds * cfg.scale_emb
        all_hidden = [] if output_hidden_states else None
        ran = None
        if self.decode_runner is not None and T == 1 and token_mask is None and cu_seqlens is None \
                and all_hidden is None and past_key_values is not None and not torch.is_grad_enabled():
            ran = self.decode_runner.run(h, position_ids, past_key_values)
        if ran is not None:
            h = ran
        else:
            for i, layer in enumerate(self.layers):
                if all_hidden is not None:
                    all_hidden.append(h)
                layer_cache = past_key_values.layers[i] if past_key_values is not None else None
                h = layer(h, position_ids, token_mask, layer_cache, cu_seqlens)
        h = self.norm(h)
        if all_hidden is not None:
            all_hidden.append(h)
        if past_key_values is not None:
            past_key_values.seen_tokens += T
        return BaseModelOutputWithPast(
            last_hidden_state=h, hidden_states=tuple(all_hidden) if all_hidden else None, **{CACHE_FIELD: past_key_values}
        )


class SALAForCausalLM(SALAPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SALAConfig):
        super().__init__(config)
        self.model = SALAModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: SALACache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cu_seqlens: torch.LongTensor | None = None,
        loss_weights: torch.Tensor | None = None,
        loss_chunk_tokens: int | None = None,
        teacher_logits: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """With ``labels``: ``loss`` is the mean next-token cross-entropy over the targets that are not -100,
        each term scaled by ``loss_weights[b, t]`` of its target when given. With ``teacher_logits``
        ``[B, T, vocab]`` instead (distillation): the mean KL(teacher || model) over the real tokens of
        ``attention_mask``. ``loss_chunk_tokens`` computes either over chunks of that many tokens without the
        full logits (training at long context), and returns no logits."""
        past_key_values = _pick_cache(past_key_values, kwargs)
        if labels is not None and teacher_logits is not None:
            raise ValueError("pass labels (next-token loss) or teacher_logits (distillation), not both")
        chunk = self._prefill_chunk(input_ids if input_ids is not None else inputs_embeds, use_cache, labels,
                                    output_hidden_states, cu_seqlens, logits_to_keep)
        if chunk:
            return self._chunked_forward(chunk, input_ids, inputs_embeds, attention_mask, position_ids,
                                         past_key_values, logits_to_keep)
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_hidden_states=output_hidden_states, cu_seqlens=cu_seqlens,
        )
        h = out.last_hidden_state
        if (labels is not None or teacher_logits is not None) and loss_chunk_tokens:
            if labels is not None:
                loss = self._chunked_loss(h, labels, loss_weights, loss_chunk_tokens)
            else:
                loss = self._chunked_kl(h, teacher_logits, attention_mask, loss_chunk_tokens)
            return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=out.hidden_states,
                                          **{CACHE_FIELD: getattr(out, CACHE_FIELD)})
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            h = h[:, logits_to_keep]
        logits = self._logits(h)
        loss = None
        if labels is not None and loss_weights is None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        elif labels is not None:
            tgt = labels[:, 1:].reshape(-1)
            loss = cross_entropy_sum(logits[:, :-1].reshape(-1, logits.shape[-1]), tgt,
                                     loss_weights[:, 1:].reshape(-1)) / (tgt != -100).sum().clamp_min(1)
        elif teacher_logits is not None:
            m = attention_mask.to(logits.dtype) if attention_mask is not None else torch.ones_like(logits[..., 0])
            loss = kl_divergence_sum(logits, teacher_logits, m) / m.sum().clamp_min(1)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=out.hidden_states, **{CACHE_FIELD: getattr(out, CACHE_FIELD)}
        )

    def _chunked_loss(self, h, labels, weights, chunk):
        H = h.shape[-1]
        tgt = labels[:, 1:].reshape(-1)
        w = weights[:, 1:].reshape(-1) if weights is not None else None
        total = chunked_linear_cross_entropy(h[:, :-1].reshape(-1, H), self.lm_head.weight, tgt, w,
                                             divisor=self.config.logit_divisor, chunk=chunk)
        return total / (tgt != -100).sum().clamp_min(1)

    def _chunked_kl(self, h, teacher_logits, attention_mask, chunk):
        H = h.shape[-1]
        m = attention_mask.reshape(-1).float() if attention_mask is not None else None
        total = chunked_linear_kl(h.reshape(-1, H), self.lm_head.weight, teacher_logits.reshape(-1, teacher_logits.shape[-1]),
                                  m, divisor=self.config.logit_divisor, chunk=chunk)
        count = m.sum() if m is not None else torch.tensor(float(h.shape[0] * h.shape[1]), device=h.device)
        return total / count.clamp_min(1).to(total.dtype)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """At least float32 (the release upcasts 16-bit logits); a float64 model keeps float64."""
        logits = self.lm_head(h / self.config.logit_divisor)
        return logits if logits.dtype == torch.float64 else logits.float()

    def _prefill_chunk(self, src, use_cache, labels, output_hidden_states, cu_seqlens, logits_to_keep) -> int | None:
        """The chunk length for a long cached inference forward, or None to run it in one piece.

        Chunks are at least ``dense_len`` long (``SALAConfig.branch_safe_chunk``), so chunked equals one piece.
        """
        size = getattr(self.config, "prefill_chunk_tokens", None)
        if not size or src is None or self.training or labels is not None or output_hidden_states:
            return None
        if cu_seqlens is not None or isinstance(logits_to_keep, torch.Tensor):
            return None
        if not (use_cache if use_cache is not None else self.config.use_cache):
            return None
        size = self.config.branch_safe_chunk(size)
        return size if src.shape[1] > size else None

    def _chunked_forward(self, chunk, input_ids, inputs_embeds, attention_mask, position_ids, cache, logits_to_keep):
        """The cached forward in chunks; logits only for the positions ``logits_to_keep`` asks for."""
        T = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        past = cache.get_seq_length() if isinstance(cache, SALACache) else 0
        first_kept = T - logits_to_keep if logits_to_keep > 0 else 0
        pieces = []
        for a in range(0, T, chunk):
            b = min(T, a + chunk)
            out = self.model(
                input_ids=None if input_ids is None else input_ids[:, a:b],
                inputs_embeds=None if inputs_embeds is None else inputs_embeds[:, a:b],
                attention_mask=None if attention_mask is None else attention_mask[:, : past + b],
                position_ids=None if position_ids is None else position_ids[:, a:b],
                past_key_values=cache, use_cache=True,
            )
            cache = getattr(out, CACHE_FIELD)
            if a == 0:
                cache.reserve(past + T)  # one allocation for the whole prompt
            if b > first_kept:
                pieces.append(self._logits(out.last_hidden_state[:, max(first_kept - a, 0):]))
        return CausalLMOutputWithPast(logits=torch.cat(pieces, 1), **{CACHE_FIELD: cache})

    def generate(self, *args, **kwargs):
        """transformers' ``generate``. Its ``prefill_chunk_size`` (argument or generation config) becomes sala's
        own chunked prefill, ``config.prefill_chunk_tokens`` for this call (raised to ``dense_len``): transformers'
        version feeds chunks itself, needs a cache made before the call and ignores the dense/sparse branch."""
        gen_cfg = kwargs.get("generation_config")
        size = kwargs.pop("prefill_chunk_size", None)
        for cfg in (gen_cfg, self.generation_config):
            size = size or getattr(cfg, "prefill_chunk_size", None)
        if not size:
            return super().generate(*args, **kwargs)
        if gen_cfg is not None and getattr(gen_cfg, "prefill_chunk_size", None):
            gen_cfg = copy.deepcopy(gen_cfg)
            gen_cfg.prefill_chunk_size = None
            kwargs["generation_config"] = gen_cfg
        saved = (self.config.prefill_chunk_tokens, getattr(self.generation_config, "prefill_chunk_size", None))
        self.config.prefill_chunk_tokens = int(size)
        self.generation_config.prefill_chunk_size = None
        try:
            return super().generate(*args, **kwargs)
        finally:
            self.config.prefill_chunk_tokens, self.generation_config.prefill_chunk_size = saved

    def prepare_inputs_for_generation(
        self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None, use_cache=True, **kwargs
    ):
        """Feed only the tokens the cache has not seen, with mask-derived (left-padding aware) positions."""
        past_key_values = _pick_cache(past_key_values, kwargs)
        past = past_key_values.get_seq_length() if isinstance(past_key_values, SALACache) else 0
        if past:
            input_ids = input_ids[:, past:]
        position_ids = None
        if attention_mask is not None:
            pos = attention_mask.long().cumsum(-1) - 1
            position_ids = pos.masked_fill(attention_mask == 0, 1)[:, -input_ids.shape[1]:]
        inputs = {
            "input_ids": input_ids, "position_ids": position_ids, CACHE_FIELD: past_key_values,
            "attention_mask": attention_mask, "use_cache": use_cache,
        }
        if inputs_embeds is not None and not past:
            inputs["inputs_embeds"], inputs["input_ids"] = inputs_embeds, None
        if "logits_to_keep" in kwargs:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False
