"""The one dispatch point between the pure-PyTorch reference ops and the Triton kernels.

CUDA tensors take the Triton kernels where one exists for the case, everything else the reference.
``SALA_FORCE_REFERENCE=1`` in the environment (or ``force_reference(True)``) forces the reference for
debugging. The model calls only the functions of this module.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from . import infllmv2_reference as _sparse_ref
from . import lightning_reference as _lightning_ref

_FORCE_REFERENCE = os.environ.get("SALA_FORCE_REFERENCE", "0") not in ("", "0", "false", "False")


def force_reference(flag: bool = True) -> None:
    """Force (or stop forcing) the reference ops for every device."""
    global _FORCE_REFERENCE
    _FORCE_REFERENCE = bool(flag)


@contextmanager
def reference_ops():
    """Context manager that forces the reference ops inside its block."""
    global _FORCE_REFERENCE
    old = _FORCE_REFERENCE
    _FORCE_REFERENCE = True
    try:
        yield
    finally:
        _FORCE_REFERENCE = old


@contextmanager
def sparse_union_lanes(lanes: int):
    """Inside the block InfLLM-V2's Triton rest pass (forward and backward) walks the union of ``lanes``
    neighbouring rows' selections (``infllmv2_triton_attn.UNION_LANES``; 0 leaves the setting alone). Same
    blocks, same results; faster where rows share their blocks, as a trained model's do (a training step of
    the GPU profile's student at 32K: 634 instead of 842 ms on an H200, bench/results/train_step.md)."""
    if lanes < 0:
        raise ValueError(f"sparse union lanes must be >= 0, got {lanes}")
    if not lanes:
        yield
        return
    from . import infllmv2_triton_attn as attn

    old = attn.UNION_LANES
    attn.UNION_LANES = int(lanes)
    try:
        yield
    finally:
        attn.UNION_LANES = old


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton path should run for these tensors."""
    return not _FORCE_REFERENCE and all(t.is_cuda for t in tensors)


def lightning_prefill(q, k, v, g_gamma, scale, initial_state=None, cu_seqlens=None):
    """Chunked lightning attention, ``[B, T, H, D]`` layout; returns (o float32, final states float32).

    CUDA takes the Triton kernels (differentiable). Float32 inputs follow PyTorch's own switch for float32
    matrix products: TF32 (what fla and so the release use) only where
    ``torch.backends.cuda.matmul.allow_tf32`` is on, full float32 otherwise (PyTorch's default)."""
    if use_triton(q, k, v):
        from .lightning_triton import lightning_attn_triton

        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
        return lightning_attn_triton(q, k, v, g_gamma, scale, initial_state, cu_seqlens, precision=precision)
    return _lightning_ref.lightning_attn_chunked(q, k, v, g_gamma, scale, initial_state, cu_seqlens)


def lightning_decode(q, k, v, g_gamma, state, scale):
    """One token per sequence, q/k/v ``[B, H, D]``; updates ``state`` in place; returns o float32."""
    if use_triton(q, k, v, state) and state.is_contiguous() and state.dtype == torch.float32:
        from .lightning_triton import lightning_decode_triton

        return lightning_decode_triton(q, k, v, g_gamma, state, scale)
    return _lightning_ref.lightning_decode_step(q, k, v, g_gamma, state, scale)


def sparse_attention(q, k, v, params, scale, k1=None, k2=None, decode=False, internals=None):
    """InfLLM-V2 attention of one sequence (q ``[Tq, Hq, D]``, k/v ``[Tk, Hk, D]``).

    CUDA takes the Triton kernels for 16-bit inputs (the release's kernels only run bf16/fp16, and round the
    stage-1 scores to that dtype); float32 inputs and ``internals`` (a capture dict for tests) take the
    reference, whose float32 semantics are those of the released reference run in float32.
    ``SALA_SPARSE_FP32_TRITON=1`` sends float32 to the kernels too (scores then rounded to bf16)."""
    fp32_ok = q.dtype != torch.float32 or os.environ.get("SALA_SPARSE_FP32_TRITON", "0") == "1"
    if internals is None and fp32_ok and use_triton(q, k, v):
        from .infllmv2_triton import infllmv2_attention_triton

        return infllmv2_attention_triton(q, k, v, params, scale, k1=k1, k2=k2, decode=decode)
    return _sparse_ref.infllmv2_attention(q, k, v, params, scale, k1=k1, k2=k2, decode=decode, internals=internals)


def dense_attention(q, k, v, scale):
    """Causal GQA attention of one sequence ``[T, H, D]`` or a batch of equal-length rows ``[B, T, H, D]``,
    bottom-right aligned (CUDA: the measured-best SDPA backend)."""
    if use_triton(q, k, v):
        from .infllmv2_dense import dense_attention_sdpa

        return dense_attention_sdpa(q, k, v, scale)
    return _sparse_ref.dense_attention(q, k, v, scale)
