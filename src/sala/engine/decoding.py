"""One request's generation: chunked prefill, token-by-token cached decode, text with stop strings.

The prefill and the cached one-token forwards are the model-agnostic helpers of ``sala.engine.generation``
(chunks never shorter than a SALA model's ``dense_len``, last-position logits only, cache sized once). The
text side turns tokens into text deltas as they come: it decodes a short window of recent tokens so a
multi-byte character split over tokens is only emitted once complete, and it holds back any tail that could
still become a stop string, so a stop string is never sent, even in part.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .generation import forward_chunk, model_device, prefill, synchronize
from .sampling import make_generator, next_token


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Summary:
    """What the request's final response reports (usage, finish reason, speed)."""

    finish_reason: str  # "stop" (EOS or stop string), "length" (max_tokens) or "cancelled"
    prompt_tokens: int
    completion_tokens: int  # every sampled token, the EOS or the one completing a stop string included
    ttft_s: float  # prefill + first token
    decode_s: float
    queue_s: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float | None:
        n = self.completion_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else None


@torch.no_grad()
def sample_tokens(model, input_ids: torch.Tensor, params: SamplingParams, chunk_size: int | None) -> Iterator[int]:
    """Token ids after the prompt [1, T], at most ``params.max_tokens``; the caller stops early by closing it."""
    device = model_device(model)
    ids = input_ids.to(device)
    gen = make_generator(device, params.seed) if params.temperature > 0 else None
    logits, past = prefill(model, ids, chunk_size, reserve=ids.shape[1] + params.max_tokens)
    for i in range(params.max_tokens):
        tok = next_token(logits, params.temperature, params.top_p, gen)
        yield tok
        if i + 1 < params.max_tokens:
            logits, past = forward_chunk(model, torch.tensor([[tok]], device=device), past, keep=1)
            logits = logits[:, -1]


class TextStream:
    """Tokens in, text deltas out; stops at the first stop string, which it never emits."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.longest_stop = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.prefix = 0  # window start: context so a token decodes as it would inside the whole text
        self.read = 0  # tokens already turned into text
        self.text = ""
        self.sent = 0  # characters of ``text`` already emitted
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Take one token; return the text that may be emitted now (possibly empty)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):  # U+FFFD: a character still incomplete
            self._append(now[len(before) :])
            self.prefix, self.read = self.read, len(self.ids)
        return self._emit()

    def finish(self) -> str:
        """The rest of the text at the end of generation (held-back tail, incomplete trailing bytes)."""
        if not self.stopped and self.read < len(self.ids):
            before = self._decode(self.ids[self.prefix : self.read])
            self._append(self._decode(self.ids[self.prefix :])[len(before) :])
            self.read = len(self.ids)
        out = self.text[self.sent :]
        self.sent = len(self.text)
        return out

    def _append(self, new: str) -> None:
        start = max(0, len(self.text) - self.longest_stop + 1)
        self.text += new
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _held(self) -> int:
        """Length of the longest tail of the text that starts some stop string."""
        if self.stopped:
            return 0
        for k in range(min(self.longest_stop - 1, len(self.text) - self.sent), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def _emit(self) -> str:
        end = len(self.text) - self._held()
        out = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out


def generate_text(model, tokenizer, prompt_ids: list[int], params: SamplingParams, eos_ids=(),
                  chunk_size: int | None = None, cancelled: Callable[[], bool] | None = None) -> Iterator[str | Summary]:
    """Text deltas as they are decoded, then one ``Summary``.

    Stops on an EOS id, a stop string, ``params.max_tokens`` tokens, or when ``cancelled()`` turns true
    (a streaming client that went away).
    """
    eos = set(int(e) for e in eos_ids)
    device = model_device(model)
    stream = TextStream(tokenizer, params.stop)
    synchronize(device)
    t0 = time.perf_counter()
    t_first = None
    n, reason = 0, "length"
    tokens = sample_tokens(model, torch.tensor([prompt_ids], dtype=torch.long), params, chunk_size)
    try:
        for tok in tokens:
            n += 1
            if t_first is None:
                t_first = time.perf_counter()  # the sampled id is on the host: the device has finished
            if tok in eos:
                reason = "stop"
                break
            delta = stream.add(tok)
            if delta:
                yield delta
            if stream.stopped:
                reason = "stop"
                break
            if cancelled is not None and cancelled():
                reason = "cancelled"
                break
    finally:
        tokens.close()
    rest = stream.finish()
    if rest:
        yield rest
    synchronize(device)
    t_end = time.perf_counter()
    t_first = t_first if t_first is not None else t_end
    yield Summary(reason, len(prompt_ids), n, t_first - t0, t_end - t_first)
