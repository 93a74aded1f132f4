"""Lightning attention layer (75% of the release): linear attention with a fixed per-head decay.

q/k/v projections -> per-head RMSNorm on q and k -> RoPE (fp32) -> Simple-GLA in fp32 (ops) ->
``o_proj(o_norm(o) * sigmoid(z_proj(x)))`` with ``o_norm`` one RMSNorm over the whole hidden vector.
Padding never enters the state: masked tokens are removed (varlen) before the recurrence.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..cache import LightningLayerCache
from ..config import SALAConfig
from ..ops.lightning_reference import lightning_decay
from . import fusion
from .common import RMSNorm, apply_rope, rms_norm, rope_cos_sin


def prepare_qkv(q, k, v, q_norm_w, k_norm_w, eps: float, cos, sin, rep: int, dtype):
    """q/k per-head RMSNorm (when given), RoPE (when given), K/V heads repeated ``rep`` times, cast to
    ``dtype`` (when given): everything between the projections and the kernel, as one fusable function."""
    if q_norm_w is not None:
        q, k = rms_norm(q, q_norm_w, eps), rms_norm(k, k_norm_w, eps)
    if cos is not None:
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if rep != 1:
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    if dtype is not None:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return q, k, v


def norm_and_gate(o, dtype, o_norm_w, eps: float, z):
    """The kernel's float32 output in the layer's dtype, ``o_norm`` over the whole hidden vector (when
    given) and the ``sigmoid(z)`` gate (when given)."""
    o = o.to(dtype)
    if o_norm_w is not None:
        o = rms_norm(o, o_norm_w, eps)
    if z is not None:
        o = o * torch.sigmoid(z)
    return o


class LightningAttention(nn.Module):
    def __init__(self, config: SALAConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.lightning_nkv
        self.head_dim = config.head_dim
        self.scale = config.lightning_q_scale
        self.use_rope = config.lightning_use_rope
        self.rope_theta = config.rope_theta
        hidden, inner, kv_inner = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, inner, bias=False)
        self.k_proj = nn.Linear(hidden, kv_inner, bias=False)
        self.v_proj = nn.Linear(hidden, kv_inner, bias=False)
        self.o_proj = nn.Linear(inner, hidden, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.o_norm = RMSNorm(inner, config.rms_norm_eps) if config.use_output_norm else None
        self.z_proj = nn.Linear(hidden, inner, bias=False) if config.use_output_gate else None
        # The decay is a fixed function of the head count (not learned, not in checkpoints). It is not a
        # buffer: transformers 5 builds models on the meta device and would leave a buffer uninitialized.
        self._g_gamma: torch.Tensor | None = None

    def g_gamma(self, device: torch.device) -> torch.Tensor:
        """Per-head log decay -slope_h, float32 ``[H]`` on ``device``."""
        if self._g_gamma is None or self._g_gamma.device != device:
            self._g_gamma = lightning_decay(self.num_heads).to(device)
        return self._g_gamma

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        cache: LightningLayerCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x ``[B, T, hidden]``; ``token_mask [B, T]`` bool marks real tokens (None = all real);
        ``cu_seqlens`` (batch 1) splits the row into packed documents, each starting from a zero state."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        cos, sin = rope_cos_sin(position_ids, self.head_dim, self.rope_theta) if self.use_rope else (None, None)
        # the norms return float32; under autocast the kernel runs in autocast's dtype
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
        q, k, v = fusion.call(
            prepare_qkv, q, k, v, self.q_norm.weight if self.q_norm is not None else None,
            self.k_norm.weight if self.k_norm is not None else None, self.q_norm.eps if self.q_norm is not None else 0.0,
            cos, sin, self.num_heads // self.num_kv_heads, dt)
        g = self.g_gamma(x.device)
        state = cache.state if cache is not None else None
        if cu_seqlens is not None:
            o, final = ops.lightning_prefill(q, k, v, g, self.scale, cu_seqlens=cu_seqlens)
        elif token_mask is None:
            if T == 1 and state is not None and not torch.is_grad_enabled():
                o = ops.lightning_decode(q[:, 0], k[:, 0], v[:, 0], g, state, self.scale)[:, None]
                final = state
            else:
                o, final = ops.lightning_prefill(q, k, v, g, self.scale, initial_state=state)
        else:
            o, final = self._varlen(q, k, v, g, state, token_mask)
        if cache is not None:
            cache.state = final
        o = o.reshape(B, T, self.num_heads * self.head_dim)
        z = self.z_proj(x) if self.z_proj is not None else None
        o = fusion.call(norm_and_gate, o, x.dtype, self.o_norm.weight if self.o_norm is not None else None,
                        self.o_norm.eps if self.o_norm is not None else 0.0, z)
        return self.o_proj(o)

    def _varlen(self, q, k, v, g, state, token_mask):
        """Pack the real tokens of every sequence (one state each), run, scatter back; pads output 0."""
        B, T, H, D = q.shape
        flat = token_mask.reshape(-1)
        lens = token_mask.sum(dim=1)
        cu = torch.zeros(B + 1, dtype=torch.long, device=q.device)
        cu[1:] = lens.cumsum(0)
        pack = lambda t: t.reshape(B * T, H, -1)[flat][None]  # noqa: E731
        o_p, final = ops.lightning_prefill(pack(q), pack(k), pack(v), g, self.scale, initial_state=state, cu_seqlens=cu)
        o = o_p.new_zeros(B * T, H, o_p.shape[-1])
        o[flat] = o_p[0]
        return o.view(B, T, H, -1), final
