"""sala.ops.host_value.OncePerTensor: one read per tensor, a new read after an in-place change, nothing kept
once the tensor is gone; and the two places that use it."""

from __future__ import annotations

import gc

import torch

from sala.layers.common import max_position
from sala.ops.host_value import OncePerTensor


def test_reads_once_per_tensor_and_version():
    reads = []
    cached = OncePerTensor(lambda t: reads.append(1) or float(t.sum()))
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0])
    assert cached(a) == 3.0 and cached(a) == 3.0 and len(reads) == 1
    assert cached(b) == 3.0 and len(reads) == 2  # an equal but distinct tensor is read on its own
    a.mul_(2)
    assert cached(a) == 6.0 and len(reads) == 3
    del a, b
    gc.collect()
    assert len(cached._seen) == 0


def test_max_position_and_decay_check_follow_their_tensors():
    from sala.ops.lightning_triton import factored_decay_ok

    pos = torch.arange(10).expand(2, 10)
    assert max_position(pos) == 9
    p2 = torch.arange(5)[None]
    assert max_position(p2) == 4
    p2.add_(100)
    assert max_position(p2) == 104
    g = torch.tensor([-0.5, -0.1])
    assert factored_decay_ok(g)
    g.mul_(1000)
    assert not factored_decay_ok(g)
