"""Model-agnostic forward helpers: chunked prefill with a KV cache and greedy decoding.

Works for any transformers causal LM whose forward takes ``past_key_values`` / ``use_cache`` (Llama,
Qwen, Gemma, ``SALAForCausalLM``). Prefill feeds the prompt in chunks so activations stay bounded, and
asks for the logits of the last position only (``logits_to_keep``) where the model supports it: full
logits of a 1M-token prompt would need ``1M x vocab`` floats.
"""

from __future__ import annotations

import functools
import inspect
import time
from dataclasses import dataclass

import torch


@functools.lru_cache(maxsize=64)
def _params_of(cls) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


def _forward_params(model) -> frozenset[str]:
    return _params_of(type(model))


def supports_logits_to_keep(model) -> bool:
    return "logits_to_keep" in _forward_params(model)


def cache_kwarg(model) -> str:
    """``cache`` (transformers >= 5.2x) or ``past_key_values`` (older releases, sala)."""
    params = _forward_params(model)
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def output_cache(out):
    for name in ("cache", "past_key_values"):
        try:
            c = getattr(out, name, None)
        except (AttributeError, KeyError):
            c = None
        if c is not None:
            return c
    return None


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def branch_safe_chunk(model, chunk_size: int | None) -> int | None:
    """``chunk_size`` as the model's config allows it (``SALAConfig.branch_safe_chunk``: at least a SALA
    model's ``dense_len``); other models take it as given. Chunking must not change what is measured."""
    cfg = getattr(model, "config", None)
    if chunk_size and hasattr(cfg, "branch_safe_chunk"):
        return cfg.branch_safe_chunk(chunk_size)
    return chunk_size


@torch.no_grad()
def forward_chunk(model, ids: torch.Tensor, past, keep: int | None):
    """One cached forward of ``ids`` [1, n]; returns (logits of the last ``keep`` positions, cache).

    ``keep=None`` returns logits for all positions of the chunk.
    """
    kwargs = {"input_ids": ids, cache_kwarg(model): past, "use_cache": True}
    if keep is not None and supports_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep
    out = model(**kwargs)
    logits = out.logits
    if keep is not None and logits.shape[1] > keep:
        logits = logits[:, -keep:]
    return logits, output_cache(out)


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, chunk_size: int | None = None, reserve: int | None = None):
    """Run the prompt [1, T] through the model in chunks; return (last-position logits [1, V], cache).

    ``reserve``: the total tokens the cache will hold (prompt + tokens to generate). Caches that can size
    themselves up front (``SALACache.reserve``) are told after the first chunk, so a long prompt never
    leaves them over-allocated by growth.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"prefill takes one sequence [1, T], got {tuple(input_ids.shape)}")
    T = input_ids.shape[1]
    chunk_size = branch_safe_chunk(model, chunk_size)
    step = T if not chunk_size or chunk_size >= T else chunk_size
    past, logits = None, None
    for a in range(0, T, step):
        logits, past = forward_chunk(model, input_ids[:, a : a + step], past, keep=1)
        if a == 0 and reserve and hasattr(past, "reserve"):
            past.reserve(max(reserve, T))
    return logits[:, -1], past


@dataclass
class Generation:
    tokens: list[int]
    prefill_s: float
    decode_s: float


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int, eos_token_ids=(),
                    chunk_size: int | None = None) -> Generation:
    """Greedy decoding after a chunked prefill; stops at an EOS id or after ``max_new_tokens`` tokens."""
    device = model_device(model)
    input_ids = input_ids.to(device)
    eos = set(int(e) for e in eos_token_ids if e is not None)
    synchronize(device)
    t0 = time.perf_counter()
    logits, past = prefill(model, input_ids, chunk_size, reserve=input_ids.shape[1] + max_new_tokens)
    nxt = int(logits.argmax(-1))
    synchronize(device)
    t1 = time.perf_counter()
    tokens = [nxt]
    while len(tokens) < max_new_tokens and nxt not in eos:
        step = torch.tensor([[nxt]], device=device)
        logits, past = forward_chunk(model, step, past, keep=1)
        nxt = int(logits[:, -1].argmax(-1))
        tokens.append(nxt)
    synchronize(device)
    t2 = time.perf_counter()
    if tokens and tokens[-1] in eos:
        tokens = tokens[:-1]
    return Generation(tokens, t1 - t0, t2 - t1)


def answer(model, tokenizer, sample, eos_token_ids=(), chunk_size: int | None = None) -> tuple[str, Generation]:
    """A task sample's greedy answer: (decoded text, the generation with its timings)."""
    gen = greedy_generate(model, torch.tensor([sample.input_ids], dtype=torch.long), sample.max_new_tokens,
                          eos_token_ids, chunk_size)
    return tokenizer.decode(gen.tokens, skip_special_tokens=True), gen


def eos_ids(model, tokenizer) -> list[int]:
    """EOS ids from the generation config, the model config and the tokenizer (deduplicated)."""
    ids: list[int] = []
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        ids += list(e) if isinstance(e, (list, tuple)) else ([e] if e is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(int(i) for i in ids))
