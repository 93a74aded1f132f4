"""Speed at given context lengths: time to first token, decode tokens/s and peak memory.

TTFT is the chunked prefill of an ``L``-token real-text prompt plus the first greedy token; decode
throughput is measured over ``decode_tokens`` single-token steps after it. Each is the median of
``repeats`` runs after one short warm-up. Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA
(reset before each run); on CPU the peak resident set size sampled from ``/proc/self/statm`` during the
run, reported with the RSS before it so the increase is visible.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass

import torch

from ..engine.generation import forward_chunk, model_device, prefill, synchronize


class RssSampler:
    """Peak RSS of this process while the ``with`` block runs (sampled every ``interval`` seconds)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.peak = self.start = 0
        self._stop = threading.Event()

    def rss(self) -> int:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * self.page
        except OSError:  # not Linux: fall back to the lifetime peak
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.start = self.peak = self.rss()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


@dataclass
class SpeedResult:
    length: int
    ttft_s: float
    decode_tokens_per_s: float
    decode_tokens: int
    peak_memory_bytes: int
    memory_kind: str  # "cuda_max_allocated" or "cpu_peak_rss"
    baseline_memory_bytes: int
    repeats: int

    def as_dict(self) -> dict:
        return self.__dict__.copy()


@torch.no_grad()
def _one_run(model, ids: torch.Tensor, decode_tokens: int, chunk_size: int | None) -> tuple[float, float]:
    device = model_device(model)
    synchronize(device)
    t0 = time.perf_counter()
    logits, past = prefill(model, ids, chunk_size)
    nxt = logits.argmax(-1, keepdim=True)
    synchronize(device)
    t1 = time.perf_counter()
    for _ in range(decode_tokens):
        logits, past = forward_chunk(model, nxt.view(1, 1), past, keep=1)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
    synchronize(device)
    t2 = time.perf_counter()
    return t1 - t0, (t2 - t1)


@torch.no_grad()
def measure_speed(model, token_stream: torch.Tensor, lengths: list[int], decode_tokens: int = 32,
                  repeats: int = 1, chunk_size: int | None = 4096, progress=None) -> list[SpeedResult]:
    """Speed at each length; prompts are the first ``L`` tokens of ``token_stream`` (repeated cyclically if short)."""
    device = model_device(model)
    stream = token_stream.to(device)
    _one_run(model, stream[: min(64, stream.numel())].view(1, -1), 2, chunk_size)  # warm-up
    out = []
    for L in lengths:
        reps = -(-L // stream.numel())
        ids = (stream.repeat(reps) if reps > 1 else stream)[:L].view(1, -1)
        ttfts, rates = [], []
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            for _ in range(repeats):
                t, d = _one_run(model, ids, decode_tokens, chunk_size)
                ttfts.append(t)
                rates.append(decode_tokens / d if d > 0 else float("inf"))
            peak, kind = torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
        else:
            with RssSampler() as rss:
                for _ in range(repeats):
                    t, d = _one_run(model, ids, decode_tokens, chunk_size)
                    ttfts.append(t)
                    rates.append(decode_tokens / d if d > 0 else float("inf"))
            peak, base, kind = rss.peak, rss.start, "cpu_peak_rss"
        out.append(SpeedResult(L, statistics.median(ttfts), statistics.median(rates), decode_tokens, int(peak), kind,
                               int(base), repeats))
        if progress is not None:
            progress()
    return out
