"""Building blocks shared by both layer types: RMSNorm (release rounding), RoPE (fp32, on the fly), MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.host_value import OncePerTensor
from . import fusion


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x^2) + eps)`` in float32, rounded to x's dtype, times the weight. ``F.rms_norm`` is
    that same float32 product (bitwise equal on the CPU); on CUDA it is PyTorch's fused kernel
    (``aten::_fused_rms_norm`` and its backward) instead of a five-op chain, whose launches add up to
    ~2.5K of a 30-layer student's 15.6K per step (not yet timed here: bench/train_step.py)."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * weight


def residual_add(h: torch.Tensor, update: torch.Tensor, scale: float) -> torch.Tensor:
    return h + update * scale


def add_rms_norm(h: torch.Tensor, update: torch.Tensor, scale: float, weight: torch.Tensor, eps: float):
    """``(h + update * scale, rms_norm(that))``: a residual add and the next norm in one fused call."""
    h = residual_add(h, update, scale)
    return h, rms_norm(h, weight, eps)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class RMSNorm(nn.Module):
    """RMSNorm as the release computes it: variance in fp32, the normalized value rounded to the input dtype
    before the multiply by the weight (Llama-style)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fusion.call(rms_norm, x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


# ``int(position_ids.max())``, read from the device once per tensor: every layer of a forward gets the
# same position tensor, and a host sync in each would stop the CPU from queuing kernels ahead.
max_position = OncePerTensor(lambda position_ids: int(position_ids.max()))


_INV_FREQ_CACHE: dict[tuple[int, float, str], torch.Tensor] = {}


def rope_inv_freq(dim: int, theta: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """fp32 inverse frequencies, computed once on the CPU (every device uses the same values) and kept per
    device: a decode step would otherwise copy them host-to-device in every RoPE layer (and a CUDA graph
    cannot capture a copy from pageable host memory)."""
    device = torch.device(device)
    key = (dim, float(theta), str(device))
    if key not in _INV_FREQ_CACHE:
        cpu_key = (dim, float(theta), "cpu")
        if cpu_key not in _INV_FREQ_CACHE:
            _INV_FREQ_CACHE[cpu_key] = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        _INV_FREQ_CACHE[key] = _INV_FREQ_CACHE[cpu_key].to(device)
    return _INV_FREQ_CACHE[key]


def rope_cos_sin(position_ids: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[B, T, dim]`` in fp32 for integer positions ``[B, T]``.

    Same fp32 product ``position * inv_freq`` as the release's precomputed table, so the angles round
    identically, without its 524288 x dim table per layer.
    """
    inv = rope_inv_freq(dim, theta, position_ids.device)
    freqs = position_ids.float()[..., None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX (rotate-half) RoPE on x ``[B, T, H, D]`` in fp32, cast back to x's dtype."""
    xf = x.float()
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return (xf * c + _rotate_half(xf) * s).to(x.dtype)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(fusion.call(silu_mul, self.gate_proj(x), self.up_proj(x)))
