"""Dense causal GQA attention below ``dense_len`` through ``scaled_dot_product_attention``.

On CUDA the backend is chosen explicitly (``sdpa_kernel`` with priorities): the bench (bench/infllmv2.py)
times cuDNN and FlashAttention-2 on the release shape and ``PREFERRED`` holds the faster first; a backend that
cannot take the call (a mask, an unsupported shape) falls through to the next. CPU goes to the reference.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import infllmv2_reference as _ref

__all__ = ["PREFERRED", "BACKENDS", "dense_attention_sdpa"]

BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
# Order measured on H100 by bench/infllmv2.py (see bench/results/infllmv2.md).
PREFERRED = ("cudnn", "flash", "efficient", "math")
# Decode (one query): cuDNN builds a new execution plan for every new key length, which made each dense
# decode step of the tiny fixture model cost ~40 ms on the H100 (bench/decode_probe.py); FlashAttention
# has no per-shape set-up.
PREFERRED_DECODE = ("flash", "efficient", "math")


def dense_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                         backends: tuple[str, ...] | None = None) -> torch.Tensor:
    """Causal GQA attention of one sequence (q ``[Tq, Hq, D]``, k/v ``[Tk, Hk, D]``), or of a batch of
    equal-length rows (a leading ``B``), bottom-right aligned.

    ``backends`` (names of ``BACKENDS``) restricts and orders the SDPA backends; default ``PREFERRED``.
    """
    if not q.is_cuda:
        return _ref.dense_attention(q, k, v, scale)
    if backends is None:
        backends = PREFERRED_DECODE if q.shape[-3] == 1 else PREFERRED
    order = [BACKENDS[b] for b in backends]
    with sdpa_kernel(order, set_priority=True):
        return _ref.dense_attention(q, k, v, scale)
