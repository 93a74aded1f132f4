"""Decode steps with the lightning layers replayed as CUDA graphs (on by default in `sala generate` / `sala serve`
on a GPU; `--decode-graphs off` turns them off).

A one-token decode step of the release model issues ~1.9K small kernel launches and is bound by the host,
not the GPU (`bench/results/model.md`: ~37-52 ms per token against ~11 ms of GPU work). In a decode step a
lightning layer is static: a fixed-size float32 state updated in place, no growing K/V. So each run of
consecutive lightning decoder layers (attention core, norms, gate, MLP) is captured once per batch size
and dtype and replayed as one graph; the sparse layers, whose K/V, compressed keys and block selection grow
with the context, run eagerly between the graphs.

The graphs own static buffers: hidden state in and out, positions, and the layers' float32 states. The
cache being decoded has its lightning states moved into those buffers (copied in once); a cache that held
them before gets its states copied back out first, so interleaved generations never share a state.

    from sala.engine.graphs import enable_decode_graphs
    enable_decode_graphs(model)     # model.generate(...) / any cached one-token forward now replays graphs

Measured (``bench/model.py --decode-graphs``, H200, release shape): 13.6 / 11.3 ms per token at 8K / 64K
against 50.2 / 48.5 ms eager, the same greedy tokens (``bench/results/model.md``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..cache import LightningLayerCache, SALACache
from ..config import LIGHTNING


class CudaGraphBackend:
    """Capture with ``torch.cuda.CUDAGraph`` after one warm-up run on a side stream (compiles the kernels)."""

    device_type = "cuda"

    def __init__(self):
        self.pool = None

    def capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], object], torch.Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        return graph.replay, out


class EagerBackend:
    """The same static-buffer plumbing without a GPU: "replay" reruns the function on the static buffers."""

    device_type = "cpu"

    def capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], object], torch.Tensor]:
        out = fn().clone()
        return (lambda: out.copy_(fn())), out


@dataclass
class _Segment:
    layers: list[int]
    lightning: bool


@dataclass
class _Captured:
    replay: Callable[[], object]
    h_in: torch.Tensor
    pos: torch.Tensor
    out: torch.Tensor
    states: list[torch.Tensor]
    owner: Callable[[], SALACache | None] = field(default=lambda: None)


def _segments(mixers: list[str]) -> list[_Segment]:
    segs: list[_Segment] = []
    for i, m in enumerate(mixers):
        light = m == LIGHTNING
        if segs and segs[-1].lightning == light:
            segs[-1].layers.append(i)
        else:
            segs.append(_Segment([i], light))
    return segs


class LightningDecodeGraphs:
    """``SALAModel.decode_runner``: runs a one-token decode step, lightning runs as graph replays."""

    def __init__(self, model, backend=None):
        self.model = model  # a SALAModel
        self.backend = backend or CudaGraphBackend()
        self.segments = _segments(model.config.mixer_types)
        self.graphs: dict[tuple, _Captured] = {}

    def run(self, h: torch.Tensor, position_ids: torch.Tensor, cache: SALACache) -> torch.Tensor | None:
        """The decode step's hidden state after every layer, or None when the step does not qualify."""
        if not self._qualifies(h, cache):
            return None
        for si, seg in enumerate(self.segments):
            if seg.lightning:
                h = self._replay(si, seg, h, position_ids, cache)
            else:
                for i in seg.layers:
                    h = self.model.layers[i](h, position_ids, None, cache.layers[i], None)
        return h

    def _qualifies(self, h: torch.Tensor, cache: SALACache) -> bool:
        if h.device.type != self.backend.device_type or torch.is_autocast_enabled(h.device.type):
            return False
        for seg in self.segments:
            for i in seg.layers if seg.lightning else ():
                st = cache.layers[i].state
                if st is None or st.shape[0] != h.shape[0] or st.dtype != torch.float32 or not st.is_contiguous():
                    return False  # no prefill yet (or an unusual state): the plain loop handles it
        return True

    def _replay(self, si: int, seg: _Segment, h, position_ids, cache: SALACache) -> torch.Tensor:
        key = (si, h.shape[0], h.dtype, h.device)
        cap = self.graphs.get(key)
        if cap is None:
            cap = self.graphs[key] = self._capture(seg, h, position_ids, cache)
        self._take_states(cap, seg, cache)
        cap.h_in.copy_(h)
        cap.pos.copy_(position_ids)
        cap.replay()
        return cap.out.clone()  # the static output is overwritten by the next replay

    def _capture(self, seg: _Segment, h, position_ids, cache: SALACache) -> _Captured:
        states = [cache.layers[i].state.clone() for i in seg.layers]
        h_in, pos = h.clone(), position_ids.clone()
        proxies = []
        for st in states:
            proxy = LightningLayerCache()
            proxy.state = st
            proxies.append(proxy)
        layers = [self.model.layers[i] for i in seg.layers]

        def step() -> torch.Tensor:
            x = h_in
            for layer, proxy in zip(layers, proxies):
                x = layer(x, pos, None, proxy, None)
            return x

        saved = [st.clone() for st in states]
        replay, out = self.backend.capture(step)  # warm-up and (eager) capture ran the step: undo its updates
        for st, before in zip(states, saved):
            st.copy_(before)
        if any(proxy.state is not st for proxy, st in zip(proxies, states)):
            raise RuntimeError("a lightning decode step replaced its state instead of updating it in place")
        return _Captured(replay, h_in, pos, out, states)

    @staticmethod
    def _take_states(cap: _Captured, seg: _Segment, cache: SALACache) -> None:
        """Move ``cache``'s states of this segment into the graph's buffers (once per cache)."""
        layers = [cache.layers[i] for i in seg.layers]
        if cap.owner() is cache and all(lc.state is st for lc, st in zip(layers, cap.states)):
            return
        owner = cap.owner()
        if owner is not None and owner is not cache:  # hand the previous cache its own copy back
            for i, st in zip(seg.layers, cap.states):
                if owner.layers[i].state is st:
                    owner.layers[i].state = st.clone()
        for lc, st in zip(layers, cap.states):
            if lc.state is not st:
                st.copy_(lc.state)
                lc.state = st
        cap.owner = weakref.ref(cache)


def enable_decode_graphs(model, backend=None) -> LightningDecodeGraphs:
    """Install graph replay for the one-token decode steps of ``model`` (SALAForCausalLM or SALAModel)."""
    base = model.model if hasattr(model, "lm_head") else model
    runner = LightningDecodeGraphs(base, backend)
    base.decode_runner = runner
    return runner


def disable_decode_graphs(model) -> None:
    base = model.model if hasattr(model, "lm_head") else model
    base.decode_runner = None


GRAPH_MODES = ("auto", "on", "off")


class DecodeGraphsError(ValueError):
    """A decode graphs mode that is unknown, or 'on' for a model off CUDA; the message says which."""


def check_decode_graphs_mode(mode: str) -> str:
    """``mode`` if it is one of GRAPH_MODES (callers check before loading a model)."""
    if mode not in GRAPH_MODES:
        raise DecodeGraphsError(f"decode graphs mode must be one of {GRAPH_MODES}, got {mode!r}")
    return mode


def apply_decode_graphs(model, mode: str = "auto") -> LightningDecodeGraphs | None:
    """The CLI and server switch: ``auto`` replays graphs when the model is on a CUDA device, ``on`` requires
    one, ``off`` keeps the plain eager decode. Returns the runner, or None when graphs are off."""
    check_decode_graphs_mode(mode)
    device = next(model.parameters()).device
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        disable_decode_graphs(model)
        return None
    if device.type != "cuda":
        raise DecodeGraphsError(f"decode graphs need the model on a CUDA device; it is on {device} "
                                "(use 'auto' or 'off')")
    return enable_decode_graphs(model)
