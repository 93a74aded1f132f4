"""Sparse attention layer (``minicpm4``): GQA attention that is dense below ``dense_len`` and InfLLM-V2
above it; NoPE and no QK-norm in the release; output ``o_proj(attn * sigmoid(o_gate(x)))``.

Sequences are processed one at a time over their real (unpadded) tokens, so padding never takes part;
a single unpadded sequence takes no gather at all.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..cache import SparseLayerCache
from ..config import SALAConfig
from ..ops.infllmv2_reference import SparseParams
from .common import apply_rope, max_position, rope_cos_sin

DENSE_ALWAYS = 1 << 62  # a dense_len no context reaches: the layer attends densely at any length


class SparseAttention(nn.Module):
    def __init__(self, config: SALAConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.sparse_head_dim
        self.scale = self.head_dim**-0.5
        self.use_rope = config.attn_use_rope
        self.rope_theta = config.rope_theta
        sc = config.sparse_config
        self.dense_len = sc["dense_len"]
        self.params = SparseParams(
            kernel_size=sc["kernel_size"], kernel_stride=sc["kernel_stride"], block_size=sc["block_size"],
            init_blocks=sc["init_blocks"], window_size=sc["window_size"], topk=sc["topk"],
        )
        hidden = config.hidden_size
        inner, kv_inner = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, inner, bias=False)
        self.k_proj = nn.Linear(hidden, kv_inner, bias=False)
        self.v_proj = nn.Linear(hidden, kv_inner, bias=False)
        self.o_proj = nn.Linear(inner, hidden, bias=False)
        self.o_gate = nn.Linear(hidden, inner, bias=False) if config.attn_use_output_gate else None
        self.capture: dict | None = None  # tests set a dict here to receive the sparse internals

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        cache: SparseLayerCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.use_rope:
            cos, sin = rope_cos_sin(position_ids, self.head_dim, self.rope_theta)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # The release switches on the longest total length in the batch: position_ids.max() + 1.
        sparse = max_position(position_ids) + 1 >= self.dense_len
        if cu_seqlens is not None:  # packed documents (batch 1): each attends only within itself
            bounds = cu_seqlens.tolist()
            o = torch.cat([self._attend(q[0, s:e], k[0, s:e], v[0, s:e], sparse, None, decode=False)
                           for s, e in zip(bounds[:-1], bounds[1:]) if e > s])[None]
        elif token_mask is None and cache is None and B == 1:
            o = self._attend(q[0], k[0], v[0], sparse, None, decode=False)[None]
        elif token_mask is None and cache is None and not sparse:  # unpadded rows, dense: one batched call
            o = ops.dense_attention(q, k, v, self.scale)
        else:
            o = q.new_zeros(B, T, self.num_heads, self.head_dim)
            for b in range(B):
                rows = slice(None) if token_mask is None else token_mask[b]
                qb, kb, vb = q[b, rows], k[b, rows], v[b, rows]
                if cache is not None:
                    kb, vb = cache.update(b, B, kb, vb)
                if qb.shape[0] == 0:
                    continue
                decode = qb.shape[0] == 1 and kb.shape[0] > 1
                o[b, rows] = self._attend(qb, kb, vb, sparse, (cache, b), decode)
        o = o.reshape(B, T, self.num_heads * self.head_dim)
        if self.o_gate is not None:
            o = o * torch.sigmoid(self.o_gate(x))
        return self.o_proj(o)

    def _attend(self, q, k, v, sparse, cache_ref, decode):
        if not sparse:
            return ops.dense_attention(q, k, v, self.scale)
        k1 = k2 = None
        if cache_ref is not None and cache_ref[0] is not None:
            k1, k2 = cache_ref[0].compressed(cache_ref[1])
        return ops.sparse_attention(q, k, v, self.params, self.scale, k1=k1, k2=k2, decode=decode, internals=self.capture)
