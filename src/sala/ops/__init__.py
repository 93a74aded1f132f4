"""Attention ops: pure-PyTorch references (``*_reference``) beside the Triton kernels, one dispatch point."""

from .dispatch import dense_attention, force_reference, lightning_decode, lightning_prefill, reference_ops, sparse_attention
from .infllmv2_reference import SparseParams

__all__ = [
    "SparseParams",
    "dense_attention",
    "force_reference",
    "lightning_decode",
    "lightning_prefill",
    "reference_ops",
    "sparse_attention",
]
