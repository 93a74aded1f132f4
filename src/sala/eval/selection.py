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

``needle_study`` puts the pieces together for passkey samples: per sample the answer with the sparse path,
the answer to the same sample with every sparse layer attending densely (``dense_attention_only``), and
the selection result, so a miss can be told apart as a selection miss (the needle's block not chosen), a
use miss (chosen, still wrong) or a miss dense attention makes too (not the sparse path's fault).
"""

from __future__ import annotations

import dataclasses
import statistics
from contextlib import contextmanager

import torch

from ..engine.generation import answer, eos_ids, forward_chunk, prefill
from .haystack import Haystack
from .scoring import sample_score
from .tasks import generate_samples

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


def _sparse_modules(model) -> list:
    return [attn for _, attn in _sparse_layers(model)]


@contextmanager
def dense_attention_only(model):
    """Every sparse (InfLLM-V2) layer of ``model`` attends densely at any length inside the block; the
    previous ``dense_len`` values come back on exit, also after an error. A model without sparse layers
    is left as it is."""
    from ..layers.sparse import DENSE_ALWAYS

    layers = _sparse_modules(model)
    saved = [m.dense_len for m in layers]
    try:
        for m in layers:
            m.dense_len = DENSE_ALWAYS
        yield model
    finally:
        for m, d in zip(layers, saved):
            m.dense_len = d


@contextmanager
def selection_topk(model, topk: int):
    """Every sparse layer of ``model`` selects ``topk`` blocks per query (the initial block included, the
    local window's blocks on top, as in the config's ``topk``) inside the block; the previous settings come
    back on exit, also after an error. The weights are untouched: a probe of the selection budget."""
    if int(topk) < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    layers = _sparse_modules(model)
    saved = [m.params for m in layers]
    try:
        for m in layers:
            m.params = dataclasses.replace(m.params, topk=int(topk))
        yield model
    finally:
        for m, params in zip(layers, saved):
            m.params = params


def sparse_path_runs(model, n_tokens: int) -> bool:
    """Whether a prompt of ``n_tokens`` takes the sparse path in some layer (the layer's switch is on the
    total length: ``n_tokens >= dense_len``)."""
    return any(n_tokens >= m.dense_len for m in _sparse_modules(model))


@torch.no_grad()
def needle_selection(model, input_ids: torch.Tensor, span: tuple[int, int], chunk_size: int | None = None,
                     follow: list[int] | tuple[int, ...] = ()) -> list[dict]:
    """Per sparse layer and KV group: ``selected`` (a needle block is among the chosen blocks), ``rank``
    (1 = highest block score; the needle's best block) and ``n_blocks``, at ``step`` 0 (the last prompt
    token's query, which yields the first answer token) and, for each token of ``follow`` fed after it one
    decode step at a time (the answer, teacher-forced), at steps 1, 2, ...: every answer token is a new query
    that has to select the needle again. Empty if no layer ran sparse."""
    layers = _sparse_layers(model)
    if not layers:
        raise ValueError("the model has no sparse (InfLLM-V2) layers")
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    _, past = prefill(model, ids[:, :-1], chunk_size)
    steps = [ids[:, -1:]] + [torch.tensor([[int(t)]], device=device) for t in follow]
    rows = []
    for step, tok in enumerate(steps):
        captures = {i: {} for i, _ in layers}
        try:
            for i, attn in layers:
                attn.capture = captures[i]
            _, past = forward_chunk(model, tok, past, keep=1)
        finally:
            for _, attn in layers:
                attn.capture = None
        rows += [dict(r, step=step) for r in _selection_rows(layers, captures, span)]
    return rows


def _selection_rows(layers, captures: dict, span: tuple[int, int]) -> list[dict]:
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


MOST = 0.5  # a sample's needle counts as selected when more than this share of (layer, group) pairs select it


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def sample_score_of(model, tokenizer, sample, eos, chunk_size: int | None) -> float:
    """The RULER score (in [0, 1]) of the greedy answer to one sample."""
    return sample_score(answer(model, tokenizer, sample, eos, chunk_size)[0], sample.answers)


@torch.no_grad()
def study_sample(model, tokenizer, sample, eos, chunk_size: int | None) -> dict:
    """One passkey sample: correctness with the model as it is and with dense attention only, and the
    needle's selection (``None`` fields where no layer runs sparse at this length: nothing is selected, and
    the dense answer is the same computation as the sparse one, so it is not run twice)."""
    sparse_on = sparse_path_runs(model, sample.n_tokens)
    ok_sparse = sample_score_of(model, tokenizer, sample, eos, chunk_size)
    row = {"length": sample.length, "index": sample.index, "n_tokens": sample.n_tokens,
           "depth": round(float(sample.depths[0]), 4), "sparse_path": sparse_on, "correct_sparse": ok_sparse,
           "correct_dense": ok_sparse, "span": None, "selected_frac": None, "median_rank": None, "n_pairs": 0,
           "per_layer": []}
    if not sparse_on:
        return row
    with dense_attention_only(model):
        text, gen = answer(model, tokenizer, sample, eos, chunk_size)
    row["correct_dense"] = sample_score(text, sample.answers)
    span = needle_token_span(tokenizer, sample.prompt, sample.needles[0])
    follow = answer_prefix(tokenizer, getattr(gen, "tokens", None) or [], sample.answers[0])[:-1]  # later queries
    steps = needle_selection(model, torch.tensor([sample.input_ids], dtype=torch.long), span, chunk_size, follow)
    sel = [r for r in steps if r["step"] == 0]
    row.update(span=list(span), per_layer=sel, n_pairs=len(sel))
    if sel:
        row["selected_frac"] = round(sum(r["selected"] for r in sel) / len(sel), 4)
        row["median_rank"] = float(statistics.median(r["rank"] for r in sel))
        by_step = [[r for r in steps if r["step"] == k] for k in range(len(follow) + 1)]
        row["step_selected_frac"] = [round(sum(r["selected"] for r in rs) / len(rs), 4) for rs in by_step]
        row["step_per_layer"] = [{"step": r["step"], "layer": r["layer"], "group": r["group"],
                                  "selected": r["selected"], "rank": r["rank"]} for r in steps if r["step"] > 0]
    return row


def answer_prefix(tokenizer, tokens: list[int], target: str) -> list[int]:
    """The shortest prefix of generated ``tokens`` whose text contains ``target`` (all of them if none
    does): the answer tokens whose queries had to find the needle."""
    for n in range(1, len(tokens) + 1):
        if target in tokenizer.decode(tokens[:n], skip_special_tokens=True):
            return list(tokens[:n])
    return list(tokens)


def summarize_length(rows: list[dict]) -> dict:
    """One length's rows -> accuracies (sparse, dense, when selected / not, by needle depth), the share of
    samples whose needle most (layer, group) pairs select, and the misses by cause. Accuracies are means of
    the per-sample scores in [0, 1]; ``None`` where no sample falls in the group or nothing ran sparse."""
    if not rows:
        raise ValueError("no rows to summarize")
    sel_rows = [r for r in rows if r["selected_frac"] is not None]
    hit = [r for r in sel_rows if r["selected_frac"] > MOST]
    miss = [r for r in sel_rows if r["selected_frac"] <= MOST]
    acc = lambda rs, key="correct_sparse": _mean([r[key] for r in rs])  # noqa: E731
    wrong = [r for r in rows if r["correct_sparse"] < 1.0]
    stepped = [r for r in sel_rows if r.get("step_selected_frac")]
    every = [r for r in stepped if min(r["step_selected_frac"]) > MOST]
    out = {
        "length": rows[0]["length"], "samples": len(rows),
        "n_tokens": round(_mean([r["n_tokens"] for r in rows])),
        "sparse_path": any(r["sparse_path"] for r in rows),
        "acc_sparse": acc(rows), "acc_dense": acc(rows, "correct_dense"),
        "selected_share": len(hit) / len(sel_rows) if sel_rows else None,
        "mean_selected_frac": _mean([r["selected_frac"] for r in sel_rows]),
        "median_rank": float(statistics.median(r["median_rank"] for r in sel_rows)) if sel_rows else None,
        "acc_selected": acc(hit), "acc_not_selected": acc(miss),
        # every answer token's query (teacher-forced), not only the first, selects the needle by most pairs
        "selected_every_step_share": len(every) / len(stepped) if stepped else None,
        "acc_selected_every_step": acc(every), "acc_not_every_step": acc([r for r in stepped if r not in every]),
        "acc_shallow": acc([r for r in rows if r["depth"] < 0.5]),
        "acc_deep": acc([r for r in rows if r["depth"] >= 0.5]),
        # wrong answers (score < 1) by cause; a sample can be both a dense miss and a selection/use miss
        "misses": {"total": len(wrong),
                   "dense_also_wrong": sum(r["correct_dense"] < 1.0 for r in wrong),
                   "not_selected": sum(r["selected_frac"] is not None and r["selected_frac"] <= MOST for r in wrong),
                   "selected": sum(r["selected_frac"] is not None and r["selected_frac"] > MOST for r in wrong)},
    }
    return out


@torch.no_grad()
def needle_study(model, tokenizer, text: str, lengths: list[int], samples: int, chunk_size: int | None,
                 seed: int = 42, max_new_tokens: int | None = None, log=None) -> dict:
    """Passkey samples at each length (``text`` as haystack, needles evenly from the start to the end of the
    context): ``{'rows': [per sample], 'summary': [per length, see summarize_length], 'dense_len': [...]}``.

    Each sample at a length where the sparse path runs costs two generations and one extra prefill."""
    hay, eos = Haystack(text, tokenizer), eos_ids(model, tokenizer)
    rows, summ = [], []
    for L in lengths:
        sub = [study_sample(model, tokenizer, s, eos, chunk_size)
               for s in passkey_samples(tokenizer, hay, L, samples, seed, max_new_tokens)]
        rows += sub
        summ.append(summarize_length(sub))
        if log is not None:
            log(format_summary(summ[-1]))
    return {"rows": rows, "summary": summ, "dense_len": sorted({m.dense_len for m in _sparse_modules(model)}),
            "most": MOST}


def passkey_samples(tokenizer, hay, length: int, samples: int, seed: int, max_new_tokens: int | None) -> list:
    """The passkey samples of the needle study and the budget probe at one length (needles evenly from the
    start to the end of the context): one definition, so both answer the same questions."""
    return generate_samples("passkey", tokenizer, hay, length, samples, seed, None, max_new_tokens)


@torch.no_grad()
def topk_probe(model, tokenizer, text: str, length: int, samples: int, topks: list[int], chunk_size: int | None,
               seed: int = 42, max_new_tokens: int | None = None) -> list[dict]:
    """Sparse passkey accuracy at one length under other selection budgets (``selection_topk``), on the
    samples ``needle_study`` draws with the same seed, so each budget answers the same questions:
    ``[{'topk', 'length', 'samples', 'acc_sparse'}]`` in the order of ``topks``."""
    eos = eos_ids(model, tokenizer)
    drawn = passkey_samples(tokenizer, Haystack(text, tokenizer), length, samples, seed, max_new_tokens)
    out = []
    for t in topks:
        with selection_topk(model, t):
            scores = [sample_score_of(model, tokenizer, s, eos, chunk_size) for s in drawn]
        out.append({"topk": int(t), "length": length, "samples": len(scores), "acc_sparse": _mean(scores)})
    return out


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def format_summary(s: dict) -> str:
    """One line per length for logs."""
    head = (f"needle study {s['length']} ({s['samples']} samples): sparse {_pct(s['acc_sparse'])}, "
            f"dense {_pct(s['acc_dense'])}")
    if not s["sparse_path"]:
        return head + "; below every layer's dense_len (no sparse path, nothing selected)"
    m = s["misses"]
    return (head + f"; needle selected in {_pct(s['selected_share'])} of samples (median rank {s['median_rank']}), "
            f"acc selected {_pct(s['acc_selected'])} / not {_pct(s['acc_not_selected'])}; "
            f"depth<0.5 {_pct(s['acc_shallow'])}, >=0.5 {_pct(s['acc_deep'])}; "
            f"selected at every answer token in {_pct(s.get('selected_every_step_share'))}; "
            f"{m['total']} wrong: {m['not_selected']} not selected, {m['selected']} selected, "
            f"{m['dense_also_wrong']} also wrong dense")


TABLE_HEADER = ("| length | sparse acc | dense acc | needle selected (share of samples) | acc when selected | "
                "acc when not | acc depth<0.5 | acc depth>=0.5 | selected at every answer token | acc when so | "
                "acc when not |")


def summary_table(summary: list[dict], fmt_len=str) -> list[str]:
    """The per-length summary as markdown table lines."""
    lines = [TABLE_HEADER, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        sel = _pct(s["selected_share"]) if s["sparse_path"] else "- (dense path)"
        lines.append(f"| {fmt_len(s['length'])} | {_pct(s['acc_sparse'])} | {_pct(s['acc_dense'])} | {sel} | "
                     f"{_pct(s['acc_selected'])} | {_pct(s['acc_not_selected'])} | {_pct(s['acc_shallow'])} | "
                     f"{_pct(s['acc_deep'])} | {_pct(s.get('selected_every_step_share'))} | "
                     f"{_pct(s.get('acc_selected_every_step'))} | {_pct(s.get('acc_not_every_step'))} |")
    return lines
