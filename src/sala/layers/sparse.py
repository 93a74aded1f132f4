"""Sparse attention layer (``minicpm4``): GQA attention that is dense below ``dense_len`` and InfLLM-V2
above it; NoPE and no QK-norm in the release; output ``o_proj(attn * sigmoid(o_gate(x)))``.

Sequences are processed one at a time over their real (unpadded) tokens, so padding never takes part;
a single unpadded sequence takes no gather at all.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .. import ops
from ..cache import SparseLayerCache
from ..config import SALAConfig
from ..ops.infllmv2_reference import SparseParams
from ..ops.selection_loss import selection_alignment_loss, selection_alignment_loss_batch
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
        self.selection_rows = 0  # > 0 inside ``selection_alignment``: collect that loss's terms
        self.selection_terms: list | None = None

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        cache: SparseLayerCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k = self._qk(x, position_ids)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        bounds = cu_seqlens.tolist() if cu_seqlens is not None else None  # one host read for the layer
        if self.selection_terms is not None and torch.is_grad_enabled():
            # from a detached input: the loss trains this layer's q and k projections, not the layers below
            self._selection_terms(*self._qk(x.detach(), position_ids), token_mask, bounds)
        # The release switches on the longest total length in the batch: position_ids.max() + 1.
        sparse = max_position(position_ids) + 1 >= self.dense_len
        if bounds is not None:  # packed documents (batch 1): each attends only within itself
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

    def _qk(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.use_rope:
            cos, sin = rope_cos_sin(position_ids, self.head_dim, self.rope_theta)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k

    def _selection_terms(self, q, k, token_mask, bounds: list[int] | None) -> None:
        """Append each sequence's (weighted KL sum, weight sum) of the selection alignment loss (``bounds``: the
        packed documents' cu_seqlens, read on the host)."""
        if bounds is None and token_mask is None:  # equal-length rows: the whole batch in one call
            self.selection_terms.append(
                selection_alignment_loss_batch(q, k, self.params, self.scale, self.selection_rows))
            return
        if bounds is not None:
            seqs = [(0, slice(s, e)) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
        else:
            seqs = [(b, token_mask[b]) for b in range(q.shape[0])]  # padded rows: each its own length
        for b, rows in seqs:
            self.selection_terms.append(
                selection_alignment_loss(q[b, rows], k[b, rows], self.params, self.scale, self.selection_rows))

    def _attend(self, q, k, v, sparse, cache_ref, decode):
        if not sparse:
            return ops.dense_attention(q, k, v, self.scale)
        k1 = k2 = None
        if cache_ref is not None and cache_ref[0] is not None:
            k1, k2 = cache_ref[0].compressed(cache_ref[1])
        return ops.sparse_attention(q, k, v, self.params, self.scale, k1=k1, k2=k2, decode=decode, internals=self.capture)


@contextmanager
def selection_alignment(model: nn.Module, rows: int):
    """Inside: every sparse layer of ``model`` appends, per sequence of a forward with gradient, the terms of
    the selection alignment loss over its last ``rows`` queries (``sala.ops.selection_loss``) to the list
    yielded, as (weighted KL sum, weight sum) pairs. The forward's outputs are unchanged; the terms are
    computed from the layer's detached input, so their gradient reaches only its q and k projections."""
    if rows <= 0:
        raise ValueError(f"rows must be positive, got {rows}")
    layers = [m for m in model.modules() if isinstance(m, SparseAttention)]
    terms: list = []
    for m in layers:
        m.selection_rows, m.selection_terms = rows, terms
    try:
        yield terms
    finally:
        for m in layers:
            m.selection_rows, m.selection_terms = 0, None


def selection_kl(terms: list | None) -> torch.Tensor | None:
    """The weighted mean KL of the terms ``selection_alignment`` collected (None: none were; zero when no
    sequence had blocks to choose among): what a step adds, times its weight, to its objective."""
    if not terms:
        return None
    return torch.stack([t[0] for t in terms]).sum() / torch.stack([t[1] for t in terms]).sum().clamp_min(1e-6)
