"""Perplexity on held-out text at several context lengths, in bounded memory.

For a context length ``L`` each window is ``L`` consecutive held-out tokens; only its last
``score_tokens`` tokens are scored, so every length scores the same number of tokens and a lower
perplexity at a longer ``L`` means the model used the extra context (length generalization). The window
runs through the model in chunks of ``chunk_size`` tokens with the KV cache; logits are materialized
only for the scored positions, one chunk at a time: memory is ``O(chunk x vocab)`` plus the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..engine.generation import branch_safe_chunk, forward_chunk, model_device


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


@torch.no_grad()
def window_nll(model, ids: torch.Tensor, score_tokens: int, chunk_size: int | None = None) -> tuple[float, int]:
    """Sum of the negative log-likelihoods of the last ``score_tokens`` tokens of ``ids`` [1, L], and their count.

    Token ``t`` is predicted from positions ``< t``: the inputs are ``ids[:, :L-1]`` and the logits of
    input positions ``L-1-score_tokens .. L-2`` are scored against ``ids[:, L-score_tokens:]``.
    """
    L = ids.shape[1]
    if L < 2:
        raise ValueError("a window needs at least 2 tokens")
    score_tokens = min(score_tokens, L - 1)
    ids = ids.to(model_device(model))
    inputs, first = ids[:, : L - 1], L - 1 - score_tokens  # first input position whose logits are scored
    n_in = inputs.shape[1]
    chunk_size = branch_safe_chunk(model, chunk_size)
    step = n_in if not chunk_size or chunk_size >= n_in else chunk_size
    past, total, counted = None, 0.0, 0
    for a in range(0, n_in, step):
        b = min(a + step, n_in)
        keep = b - max(a, first)
        logits, past = forward_chunk(model, inputs[:, a:b], past, keep=max(keep, 1))
        if keep <= 0:
            continue
        targets = ids[0, b - keep + 1 : b + 1]
        total += float(F.cross_entropy(_at_least_fp32(logits[0, -keep:]), targets, reduction="sum"))
        counted += keep
    return total, counted


@torch.no_grad()
def window_nll_unchunked(model, ids: torch.Tensor, score_tokens: int) -> tuple[float, int]:
    """The same quantity from one forward without a cache (the reference for the chunked path; O(L x vocab))."""
    L = ids.shape[1]
    score_tokens = min(score_tokens, L - 1)
    ids = ids.to(model_device(model))
    logits = _at_least_fp32(model(input_ids=ids[:, :-1], use_cache=False).logits[0, -score_tokens:])
    return float(F.cross_entropy(logits, ids[0, -score_tokens:], reduction="sum")), score_tokens


@dataclass
class PerplexityResult:
    length: int
    ppl: float
    nll_per_token: float
    scored_tokens: int
    windows: int

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def window_starts(n_tokens: int, length: int, n_windows: int) -> list[int]:
    """Start offsets of ``n_windows`` windows of ``length`` spread evenly (deterministic) over the stream."""
    if length > n_tokens:
        return []
    span = n_tokens - length
    if n_windows <= 1 or span == 0:
        return [0] if n_windows >= 1 else []
    return sorted({round(i * span / (n_windows - 1)) for i in range(n_windows)})


def perplexity_at_lengths(model, token_stream: torch.Tensor, lengths: list[int], n_windows: int = 4,
                          score_tokens: int = 256, chunk_size: int | None = 4096, progress=None) -> list[PerplexityResult]:
    """Perplexity at each context length over ``n_windows`` windows of the held-out ``token_stream`` [N].

    A length longer than the stream is skipped (no result) rather than scored on repeated text.
    """
    out = []
    for L in lengths:
        starts = window_starts(token_stream.numel(), L, n_windows)
        if not starts:
            continue
        total, count = 0.0, 0
        for s in starts:
            nll, n = window_nll(model, token_stream[s : s + L].view(1, -1), score_tokens, chunk_size)
            total, count = total + nll, count + n
            if progress is not None:
                progress()
        mean = total / count
        out.append(PerplexityResult(L, math.exp(mean), mean, count, len(starts)))
    return out
