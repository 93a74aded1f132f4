"""Does InfLLM-V2 pick the needle's block? A diagnostic for retrieval beyond ``dense_len``.

When a SALA model misses a needle at long context, either the sparse layers never selected the block that
holds it (selection) or they read it and the model still answered wrong (use). ``needle_selection``
separates the two: it prefills all but the last prompt token, then runs the last token as one decode step
with the sparse layers' internals captured, and reports for every sparse layer and KV group whether a
block that overlaps the needle is among the selected ones, and the needle's best rank by block score
(forced blocks, the initial and local ones, score +inf and so rank first).

The decode step is the path of every generated token after the first; the first answer token comes from
the prefill's last row, whose selection follows the prefill visibility rule (the same blocks up to the
last, partly filled compression window).
"""

from __future__ import annotations

import torch

from .generation import forward_chunk, prefill


def needle_token_span(tokenizer, prompt: str, needle: str) -> tuple[int, int]:
    """Token positions ``[start, end)`` covering the first occurrence of ``needle`` in ``prompt`` under the
    same tokenization as ``sala.eval.tasks`` (special tokens added)."""
    at = prompt.find(needle)
    if at < 0:
        raise ValueError("needle not found in the prompt")
    enc = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True, verbose=False)
    toks = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > at and a < at + len(needle) and b > a]
    if not toks:
        raise ValueError("the needle maps to no token")
    return toks[0], toks[-1] + 1


def _sparse_layers(model):
    from ..layers.sparse import SparseAttention

    return [(i, layer.self_attn) for i, layer in enumerate(model.model.layers)
            if isinstance(layer.self_attn, SparseAttention)]


@torch.no_grad()
def needle_selection(model, input_ids: torch.Tensor, span: tuple[int, int], chunk_size: int | None = None) -> list[dict]:
    """Per sparse layer and KV group: ``selected`` (a needle block is among the chosen blocks), ``rank``
    (1 = highest block score; the needle's best block) and ``n_blocks``. Empty if no layer ran sparse."""
    layers = _sparse_layers(model)
    if not layers:
        raise ValueError("the model has no sparse (InfLLM-V2) layers")
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    _, past = prefill(model, ids[:, :-1], chunk_size)
    captures = {i: {} for i, _ in layers}
    try:
        for i, attn in layers:
            attn.capture = captures[i]
        forward_chunk(model, ids[:, -1:], past, keep=1)
    finally:
        for _, attn in layers:
            attn.capture = None
    rows = []
    for i, attn in layers:
        cap = captures[i]
        if "topk_idx" not in cap:  # this layer attended densely (context below its dense_len)
            continue
        bs = attn.params.block_size
        needle_blocks = torch.arange(span[0] // bs, (span[1] - 1) // bs + 1, device=cap["block_score"].device)
        score = cap["block_score"][:, -1].float()  # [Hk, n_blocks]
        idx = cap["topk_idx"][:, -1]  # [Hk, n_select], -1 padded
        for g in range(score.shape[0]):
            best = score[g, needle_blocks].max()
            rank = int((score[g] > best).sum()) + 1
            chosen = set(idx[g][idx[g] >= 0].tolist())
            rows.append({"layer": i, "group": g, "selected": bool(chosen & set(needle_blocks.tolist())),
                         "rank": rank, "n_blocks": int(score.shape[1]), "n_selected": len(chosen)})
    return rows
