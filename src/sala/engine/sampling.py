"""Choosing the next token on the model's device: greedy, or temperature + nucleus (top-p) sampling.

Sampling draws from a per-request ``torch.Generator`` so a request that names a seed gets the same tokens
again, whatever other requests ran before it.
"""

from __future__ import annotations

import secrets

import torch


def make_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (a fresh random seed when None)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed) if seed is not None else secrets.randbits(63))
    return gen


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the smallest set whose probability reaches ``top_p`` (the top token always stays)."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the tokens ranked above each one
    sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p)


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """The next token id from the last-position ``logits`` [1, V] (or [V]); ``temperature == 0`` is greedy."""
    logits = logits.reshape(-1)
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    probs = top_p_filter(probs, top_p)
    return int(torch.multinomial(probs, 1, generator=generator))
