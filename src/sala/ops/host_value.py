"""A value read from a device tensor on the host once per tensor (and version), not on every call.

A host read of a GPU tensor is a sync: the CPU stops queuing kernels until the GPU has caught up. Some
reads repeat with the same tensor in every layer or every call (a layer's fixed decay, the position ids
that every layer of one forward receives); this keeps the answer beside the tensor, weakly (dropped with
the tensor), and reads again when the tensor was modified in place (its version counter moved).
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

import torch
from torch.utils.weak import WeakTensorKeyDictionary

T = TypeVar("T")


class OncePerTensor(Generic[T]):
    """``reader(t)`` for a tensor ``t``, computed on its first call with ``t`` (or after ``t`` changed)."""

    def __init__(self, reader: Callable[[torch.Tensor], T]):
        self.reader = reader
        self._seen = WeakTensorKeyDictionary()  # tensor -> (its version, the value)

    def __call__(self, t: torch.Tensor) -> T:
        hit = self._seen.get(t)
        if hit is not None and hit[0] == t._version:
            return hit[1]
        value = self.reader(t)
        self._seen[t] = (t._version, value)
        return value
