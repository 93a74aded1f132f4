"""Optional ``torch.compile`` fusion of the layers' elementwise chains (training on CUDA).

A small model (SmolLM2-135M converted: hidden 576, 30 layers) runs about 15K kernel launches per training
step, most of them the short elementwise chains of RMSNorm, the lightning layers' q/k norm + RoPE, the
output norm and gate, SwiGLU's activation and the residual adds; at a few tens of microseconds of host
time each, the GPU waits for the host (measured: bench/results/train_step.md). Inside ``fusion()`` those
chains run through ``torch.compile`` (one or two fused kernels each way, forward and backward).

The fused functions are the eager code itself: layers call ``call(fn, ...)`` with a plain function that
they would otherwise run directly, so with fusion off (the default) nothing changes, and the fused path
computes the same math (up to floating-point reassociation inside a fused kernel).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch

_ON = False
_DEVICES: tuple[str, ...] = ("cuda",)
_COMPILED: dict[Callable, Callable] = {}


@contextmanager
def fusion(enabled: bool = True, devices: tuple[str, ...] = ("cuda",)):
    """Inside the block, ``call`` runs its function compiled for tensors on ``devices`` (CPU is opt-in: the
    CPU backend compiles C++ and only tests want it)."""
    global _ON, _DEVICES
    old = (_ON, _DEVICES)
    _ON, _DEVICES = bool(enabled), tuple(devices)
    try:
        yield
    finally:
        _ON, _DEVICES = old


def fusion_active(x: torch.Tensor) -> bool:
    return _ON and x.device.type in _DEVICES


def call(fn: Callable, *args):
    """``fn(*args)``, compiled (dynamic shapes, one compile shared by every layer) while fusion is on for
    the device of the first argument."""
    if not fusion_active(args[0]):
        return fn(*args)
    compiled = _COMPILED.get(fn)
    if compiled is None:
        compiled = _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return compiled(*args)
