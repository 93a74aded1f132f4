"""InfLLM-V2 trainable sparse attention in pure PyTorch: the semantic reference (SPEC section 2).

One sequence at a time; the layer handles batching and padding. Shapes: q ``[Tq, Hq, D]``,
k/v ``[Tk, Hk, D]`` with ``Hq = G * Hk`` and contiguous groups (q head h uses kv head h // G).
The queries are the last ``Tq`` positions of the ``Tk`` keys (bottom-right aligned): a prefill has
``Tq == Tk``, a chunked prefill ``Tq < Tk``, a decode step ``Tq == 1`` with ``decode=True``.

Pipeline (fixtures/minicpm_sala_tiny/README.md states the exact semantics):
1. compressed keys: K1 = mean of complete windows of ``kernel_size`` keys at ``kernel_stride``,
   K2 = windows of 4x that size at 4x that stride (only the softmax normalizer of stage 1);
2. stage-1 score of K1 chunk j: sum over the group's heads of exp(scale q.K1_j - LSE_h), LSE_h over the
   visible K2 chunks; visibility per the kernel's rule (with its L%16==15 / L%64==63 quirk) in prefill,
   everything visible in decode;
3. block score: max over the K1 chunks overlapping the block ([r b - 1, r b + r), r = block/stride),
   +inf for the first ``init_blocks`` blocks and for the query's block and the ``local_blocks`` before it;
4. top-(topk + local_blocks) blocks, ties to the lower block index, sorted, blocks after the query's
   own block set to -1;
5. softmax attention over the tokens of the selected blocks, causal.

Memory stays bounded at any length: work proceeds in query chunks sized so that no intermediate exceeds
``chunk_elems`` elements, and nothing of size Tq x Tk is ever built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "SparseParams",
    "compress_keys",
    "n_compressed",
    "visible_counts",
    "stage1_scores",
    "block_scores",
    "select_blocks",
    "block_sparse_attention",
    "dense_attention",
    "infllmv2_attention",
]

NEG_INF = float("-inf")
POS_INF = float("inf")


@dataclass(frozen=True)
class SparseParams:
    """Settings of one InfLLM-V2 layer, from ``config.sparse_config``."""

    kernel_size: int = 32
    kernel_stride: int = 16
    block_size: int = 64
    init_blocks: int = 1
    window_size: int = 2048
    topk: int = 64

    @property
    def local_blocks(self) -> int:
        return self.window_size // self.block_size

    @property
    def n_select(self) -> int:
        """Blocks selected per query: the dynamic top-k plus the local window (96 in the release)."""
        return self.topk + self.local_blocks

    @property
    def kernel_size2(self) -> int:
        return 4 * self.kernel_size

    @property
    def kernel_stride2(self) -> int:
        return 4 * self.kernel_stride

    @property
    def pool_stride(self) -> int:
        return self.block_size // self.kernel_stride


def n_compressed(length: int, kernel_size: int, stride: int) -> int:
    """Number of complete windows of ``kernel_size`` at ``stride`` in ``length`` tokens."""
    return 0 if length < kernel_size else (length - kernel_size) // stride + 1


def compress_keys(k: torch.Tensor, kernel_size: int, stride: int, start: int = 0) -> torch.Tensor:
    """Mean of complete windows ``k[stride*j : stride*j + kernel_size]`` for j >= ``start``.

    k ``[T, Hk, D]`` -> ``[n - start, Hk, D]`` in k's dtype (the release pools bf16 keys in bf16).
    """
    n = n_compressed(k.shape[0], kernel_size, stride)
    if n <= start:
        return k.new_empty(0, *k.shape[1:])
    sub = k[start * stride : (n - 1) * stride + kernel_size]
    return sub.unfold(0, kernel_size, stride).mean(dim=-1)


def visible_counts(rows: torch.Tensor, length: int, n: int, kernel_stride: int) -> torch.Tensor:
    """Prefill visibility of compressed chunks (kernel rule, ``kernel_size == 2 * stride``).

    ``vis(r) = clamp((r+1)//s - 1 + n - (L-s+1)//s, 0, n)``: chunk j is visible once all its tokens are
    <= r, except that one chunk fewer is visible when ``L % s == s - 1`` (a quirk of the kernel kept for
    parity). ``rows`` are absolute positions, ``length`` the total sequence length L.
    """
    s = kernel_stride
    vis = (rows + 1) // s - 1 + n - (length - s + 1) // s
    return vis.clamp(min=0, max=n)


def stage1_scores(
    q: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    scale: float,
    vis1: torch.Tensor | None,
    vis2: torch.Tensor | None,
) -> torch.Tensor:
    """Stage-1 scores ``[Hk, R, n1]`` for query rows q ``[R, Hq, D]``, in q's dtype.

    ``vis1``/``vis2`` ``[R]`` are the visible chunk counts per row (None = all visible, decode).
    Math in float32; the group sum happens before the cast, as in the fused kernel.
    """
    R, Hq, D = q.shape
    n1, Hk = k1.shape[0], k1.shape[1]
    G = Hq // Hk
    qf = q.float().view(R, Hk, G, D)
    s1 = torch.einsum("rkgd,nkd->kgrn", qf, k1.float()) * scale  # [Hk, G, R, n1]
    s2 = torch.einsum("rkgd,nkd->kgrn", qf, k2.float()) * scale  # [Hk, G, R, n2]
    n2 = k2.shape[0]
    if vis2 is not None:
        s2 = s2.masked_fill(torch.arange(n2, device=q.device)[None, :] >= vis2[:, None], NEG_INF)
    lse = torch.logsumexp(s2, dim=-1, keepdim=True)  # -inf where no K2 is visible
    p = torch.exp(s1 - lse)
    if vis1 is not None:
        p = p.masked_fill(torch.arange(n1, device=q.device)[None, :] >= vis1[:, None], 0.0)
    p = p.masked_fill(torch.isinf(lse), 0.0)  # no visible K2 yet: the whole row is 0
    score = p.sum(dim=1)  # group sum over the G heads -> [Hk, R, n1]
    return torch.nan_to_num(score, nan=0.0).to(q.dtype)


def block_scores(
    scores: torch.Tensor, q_blocks: torch.Tensor, n_blocks: int, params: SparseParams
) -> torch.Tensor:
    """Max-pool stage-1 scores ``[Hk, R, n1]`` into block scores ``[Hk, R, n_blocks]`` and force the
    init and local blocks to +inf. ``q_blocks [R]`` is each row's own block index."""
    Hk, R, n1 = scores.shape
    r = params.pool_stride
    need = r * n_blocks + 1  # window of block b: padded indices [r b, r b + r + 1)
    padded = F.pad(scores.float(), (1, max(0, need - (n1 + 1))), value=NEG_INF)
    pooled = padded.unfold(-1, r + 1, r)[..., :n_blocks, :].amax(dim=-1)  # [Hk, R, n_blocks]
    b = torch.arange(n_blocks, device=scores.device)[None, :]
    qb = q_blocks[:, None]
    forced = (b < params.init_blocks) | ((b >= qb - params.local_blocks) & (b <= qb))
    return pooled.masked_fill(forced[None], POS_INF).to(scores.dtype)


def select_blocks(block_score: torch.Tensor, q_blocks: torch.Tensor, n_select: int) -> torch.Tensor:
    """Top-``n_select`` blocks per row (ties to the lower block index), sorted ascending, blocks after the
    row's own block set to -1. ``[Hk, R, nb]`` -> int32 ``[Hk, R, min(n_select, nb)]``."""
    k = min(n_select, block_score.shape[-1])
    order = torch.sort(block_score.float(), dim=-1, descending=True, stable=True).indices[..., :k]
    idx = torch.sort(order, dim=-1).values
    idx = idx.masked_fill(idx > q_blocks[None, :, None], -1)
    return idx.to(torch.int32)


def _row_chunk(total_per_row: int, chunk_elems: int) -> int:
    return max(1, chunk_elems // max(1, total_per_row))


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    topk_idx: torch.Tensor,
    q_pos: torch.Tensor,
    block_size: int,
    scale: float,
    chunk_elems: int = 1 << 24,
) -> torch.Tensor:
    """Softmax attention of each query row over the tokens of its selected blocks, causal.

    q ``[R, Hq, D]``; k/v ``[Tk, Hk, D]``; ``topk_idx`` int ``[Hk, R, S]`` (-1 = unused); ``q_pos [R]``
    absolute positions. Returns ``[R, Hq, D]`` in q's dtype. Rows are processed in chunks that gather at
    most ``chunk_elems`` key elements.
    """
    R, Hq, D = q.shape
    Hk = k.shape[1]
    G = Hq // Hk
    S = topk_idx.shape[-1]
    out = torch.empty_like(q)
    offs = torch.arange(block_size, device=q.device)
    step = _row_chunk(Hk * S * block_size * D, chunk_elems)
    kf, vf = k.float(), v.float()
    heads = torch.arange(Hk, device=q.device)[:, None, None]
    for r0 in range(0, R, step):
        r1 = min(R, r0 + step)
        idx = topk_idx[:, r0:r1].long()  # [Hk, r, S]
        tok = (idx[..., None] * block_size + offs).flatten(-2)  # [Hk, r, S*bs]
        valid = (idx[..., None] >= 0).expand(-1, -1, -1, block_size).flatten(-2) & (tok <= q_pos[r0:r1, None])
        tok = tok.clamp(min=0, max=k.shape[0] - 1)  # masked positions read a valid row
        kg = kf[tok, heads]  # [Hk, r, S*bs, D]
        vg = vf[tok, heads]
        qg = q[r0:r1].float().view(r1 - r0, Hk, G, D).permute(1, 0, 2, 3)  # [Hk, r, G, D]
        att = torch.einsum("krgd,krsd->krgs", qg, kg) * scale
        att = att.masked_fill(~valid[:, :, None, :], NEG_INF).softmax(dim=-1)
        o = torch.einsum("krgs,krsd->krgd", att, vg)  # [Hk, r, G, D]
        out[r0:r1] = o.permute(1, 0, 2, 3).reshape(r1 - r0, Hq, D).to(q.dtype)
    return out


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal GQA attention, bottom-right aligned, through ``scaled_dot_product_attention``.

    q ``[Tq, Hq, D]``, k/v ``[Tk, Hk, D]`` -> ``[Tq, Hq, D]``, or a batch of equal-length rows with a leading
    ``B`` on all three. No mask tensor is built when Tq == Tk or Tq == 1; a chunk-of-queries x keys boolean
    mask otherwise.
    """
    batched = q.dim() == 4
    qh, kh, vh = ((x if batched else x[None]).transpose(1, 2) for x in (q, k, v))
    Tq, Tk = qh.shape[2], kh.shape[2]
    gqa = qh.shape[1] != kh.shape[1]
    if Tq == Tk:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
    elif Tq == 1:
        o = F.scaled_dot_product_attention(qh, kh, vh, scale=scale, enable_gqa=gqa)
    else:
        pos = torch.arange(Tk - Tq, Tk, device=q.device)
        mask = torch.arange(Tk, device=q.device)[None, :] <= pos[:, None]
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=gqa)
    o = o.transpose(1, 2)
    return o if batched else o[0]


def check_sparse_inputs(q: torch.Tensor, k: torch.Tensor, decode: bool) -> None:
    """The shape contract shared by every implementation of the sparse op (reference and kernels)."""
    Tq, Hq = q.shape[0], q.shape[1]
    Tk, Hk = k.shape[0], k.shape[1]
    if Hq % Hk:
        raise ValueError(f"query heads {Hq} must be a multiple of kv heads {Hk}")
    if Tq > Tk:
        raise ValueError(f"more queries ({Tq}) than keys ({Tk})")
    if decode and Tq != 1:
        raise ValueError(f"decode takes one query per sequence, got {Tq}")


def infllmv2_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    params: SparseParams,
    scale: float,
    k1: torch.Tensor | None = None,
    k2: torch.Tensor | None = None,
    decode: bool = False,
    chunk_elems: int = 1 << 24,
    internals: dict | None = None,
) -> torch.Tensor:
    """Full InfLLM-V2 sparse attention for one sequence (stage 1, pooling, top-k, stage 2).

    ``k1``/``k2`` may pass precomputed compressed keys (the decode cache); they are computed otherwise.
    If ``internals`` is a dict, it receives ``stage1_score``, ``block_score`` and ``topk_idx`` for every
    query row (``[Hk, Tq, *]``); only meant for small tests.
    """
    check_sparse_inputs(q, k, decode)
    Tq, Hq = q.shape[0], q.shape[1]
    Tk = k.shape[0]
    if k1 is None:
        k1 = compress_keys(k, params.kernel_size, params.kernel_stride)
    if k2 is None:
        k2 = compress_keys(k, params.kernel_size2, params.kernel_stride2)
    n1, n2 = k1.shape[0], k2.shape[0]
    bs = params.block_size
    n_blocks = -(-Tk // bs)
    q_pos = torch.arange(Tk - Tq, Tk, device=q.device)
    q_blocks = q_pos // bs
    out = torch.empty_like(q)
    step = _row_chunk(Hq * (n1 + n2), chunk_elems)
    keep = [] if internals is not None else None
    for r0 in range(0, Tq, step):
        r1 = min(Tq, r0 + step)
        rows = q_pos[r0:r1]
        if decode:
            vis1 = vis2 = None
        else:
            vis1 = visible_counts(rows, Tk, n1, params.kernel_stride)
            vis2 = visible_counts(rows, Tk, n2, params.kernel_stride2)
        with torch.no_grad():
            s1 = stage1_scores(q[r0:r1].detach(), k1, k2, scale, vis1, vis2)
            bscore = block_scores(s1, q_blocks[r0:r1], n_blocks, params)
            idx = select_blocks(bscore, q_blocks[r0:r1], params.n_select)
        out[r0:r1] = block_sparse_attention(q[r0:r1], k, v, idx, rows, bs, scale, chunk_elems)
        if keep is not None:
            keep.append((s1, bscore, idx))
    if keep is not None:
        internals["stage1_score"] = torch.cat([x[0] for x in keep], dim=1)
        internals["block_score"] = torch.cat([x[1] for x in keep], dim=1)
        internals["topk_idx"] = torch.cat([x[2] for x in keep], dim=1)
    return out
