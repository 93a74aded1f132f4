"""HALO layer selection: which layers stay softmax attention (paper section 4, SPEC section 5).

1. Align an all-lightning student to the teacher (stage ``align``, every layer in parallel).
2. Sweep: for each layer l, the teacher with only layer l replaced by its aligned lightning layer is
   scored for recall (R_l) and for general LM ability (C_l).
3. ``score_l = min(50, (max R - R_l) / (max C - C_l + 1e-10))``: converting l costs much recall for
   little general ability -> keep l as attention. The top 25% are kept (the release also forces the
   first and last layer and fills the rest by rank).

C losses below the measurement's noise make that ratio noise: on a probe of ~12K tokens one token is
0.00008 of C, and a layer's C loss is often a few tokens, so two flipped tokens move its score from 6 to 50
(two GPU runs chose half their layers differently from R and C that agreed to 0.005). ``noise_floor = z``
divides by at least z times the sweep's median C noise (``sqrt(tokens whose correctness changed) / tokens``,
paired against the unconverted teacher on the same tokens); 0 is the paper's formula.

The default scores need no benchmark suite: on held-out text, R is next-token accuracy on tokens that an
earlier occurrence of the same bigram in the context predicts (in-context recall, what linear attention
loses first), C is next-token accuracy on every other token. Any ``(model) -> float`` callables can be
passed instead (e.g. RULER-style passkey accuracy from ``sala.eval``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from ..data.packing import IGNORE, pack_documents, unpack_segments
from .layer_map import n_attention

SCORE_CAP = 50.0


def halo_scores(recall: list[float], common: list[float], c_floor: float = 0.0) -> list[float]:
    """``min(50, (max R - R_l) / (max(max C - C_l, c_floor) + 1e-10))`` per layer (baselines: the best layer of
    the sweep); ``c_floor`` 0 is the paper's formula."""
    if len(recall) != len(common) or not recall:
        raise ValueError("recall and common scores must be non-empty and of equal length")
    if c_floor < 0:
        raise ValueError(f"c_floor={c_floor} must be >= 0")
    r_max, c_max = max(recall), max(common)
    return [min(SCORE_CAP, (r_max - r) / (max(c_max - c, c_floor) + 1e-10)) for r, c in zip(recall, common)]


def common_noise_floor(rows: list[dict], z: float) -> float:
    """z times the median over the sweep of each layer's paired C noise (row key ``C_noise``); 0 when z is 0."""
    if z < 0:
        raise ValueError(f"noise_floor={z} must be >= 0")
    if z == 0:
        return 0.0
    noise = sorted(r["C_noise"] for r in rows if r.get("C_noise") is not None)
    if not noise:
        raise ValueError("noise_floor needs the sweep's C noise (the bigram probe's paired counts)")
    return z * noise[len(noise) // 2]


def select_attention_layers(scores: list[float], ratio: float = 0.25, force_first_last: bool = True,
                            k: int | None = None) -> list[int]:
    """Top-k layers by score (ties to the lower index); forced layers count towards k."""
    n = len(scores)
    k = n_attention(n, ratio) if k is None else k
    chosen = {0, n - 1} if force_first_last and k >= 2 else set()
    ranked = sorted(range(n), key=lambda i: (-scores[i], i))
    for i in ranked:
        if len(chosen) >= k:
            break
        chosen.add(i)
    return sorted(chosen)


def _recall_mask(ids: list[int]) -> list[bool]:
    """mask[t] (t >= 1): the bigram (ids[t-1], ids[t]) already occurred before position t-1."""
    seen: set[tuple[int, int]] = set()
    out = [False] * len(ids)
    for t in range(1, len(ids)):
        pair = (ids[t - 1], ids[t])
        out[t] = pair in seen
        seen.add(pair)
    return out


class RecallCommonProbe:
    """R and C of a model on fixed held-out rows (see the module docstring)."""

    def __init__(self, docs: list[list[int]], seq_len: int, n_rows: int, eos_id: int | None, pad_id: int = 0):
        rows = pack_documents(docs, seq_len, eos_id=eos_id, pad_id=pad_id, drop_last=True)[:n_rows]
        u = unpack_segments(rows, pad_id=pad_id)
        self.ids, self.mask = u.input_ids, u.attention_mask
        recall = torch.zeros_like(self.ids, dtype=torch.bool)
        for r in range(len(self.ids)):
            n = int(u.lengths[r])
            recall[r, :n] = torch.tensor(_recall_mask(self.ids[r, :n].tolist()))
        valid = u.labels != IGNORE
        self.recall_t = (recall & valid)[:, 1:]
        self.common_t = (~recall & valid)[:, 1:]
        if not self.recall_t.any() or not self.common_t.any():
            raise ValueError("probe text has no recall (or no non-recall) targets; use longer rows or other text")

    @torch.no_grad()
    def hits(self, model) -> torch.Tensor:
        """Per-token correctness of the model's greedy next-token prediction on the probe rows (CPU bool)."""
        dev = next(model.parameters()).device
        am = self.mask.to(dev) if not bool(self.mask.all()) else None
        kw = {"use_cache": False} if hasattr(model.config, "mixer_types") else {}
        logits = model(input_ids=self.ids.to(dev), attention_mask=am, **kw).logits[:, :-1]
        return logits.argmax(-1).cpu() == self.ids[:, 1:]

    def scores(self, hits: torch.Tensor) -> tuple[float, float]:
        """(R, C) of per-token correctness ``hits``."""
        return hits[self.recall_t].float().mean().item(), hits[self.common_t].float().mean().item()

    def __call__(self, model) -> tuple[float, float]:
        return self.scores(self.hits(model))

    def common_noise(self, hits: torch.Tensor, base_hits: torch.Tensor) -> float:
        """Paired noise of C between two models on the probe's tokens: sqrt(n changed) / n tokens, the standard
        deviation of the difference if each changed token were a coin flip."""
        changed = (hits != base_hits)[self.common_t].sum().item()
        return changed ** 0.5 / int(self.common_t.sum())

    def counts(self) -> dict:
        return {"recall_targets": int(self.recall_t.sum()), "common_targets": int(self.common_t.sum())}


class TaskRecall:
    """R as the accuracy on RULER-style retrieval samples from ``sala.eval.tasks`` (e.g. passkey).

    Decoding is greedy without a cache (each new token recomputes the prompt), so it works on models
    whose layers were swapped for the sweep; answers are short, so this costs a few forwards per sample.
    """

    def __init__(self, tokenizer, haystack_text: str, task: str = "passkey", length: int = 1024,
                 n_samples: int = 8, seed: int = 42, max_new_tokens: int | None = None):
        from ..eval.haystack import Haystack
        from ..eval.tasks import generate_samples

        self.tokenizer = tokenizer
        self.samples = generate_samples(task, tokenizer, Haystack(haystack_text, tokenizer), length, n_samples, seed,
                                        max_new_tokens=max_new_tokens)
        self.eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()

    @torch.no_grad()
    def __call__(self, model) -> float:
        from ..eval.scoring import sample_score

        dev = next(model.parameters()).device
        kw = {"use_cache": False} if hasattr(model.config, "mixer_types") else {}
        total = 0.0
        for s in self.samples:
            ids = torch.tensor([s.input_ids], device=dev)
            new: list[int] = []
            for _ in range(s.max_new_tokens):
                nxt = int(model(input_ids=ids, **kw).logits[0, -1].argmax())
                if nxt in self.eos:
                    break
                new.append(nxt)
                ids = torch.cat([ids, ids.new_tensor([[nxt]])], dim=1)
            total += sample_score(self.tokenizer.decode(new, skip_special_tokens=True), s.answers)
        return total / len(self.samples)


def layer_sweep(reference, aligned, score: Callable[[torch.nn.Module], tuple],
                layers: list[int] | None = None, progress=None) -> list[dict]:
    """Score ``reference`` (a SALA model equal to the teacher: all attention, RoPE, no gates) with each layer's
    mixer in turn swapped for the aligned lightning mixer of the same layer; restored afterwards. ``score``
    returns (R, C) or (R, C, extra fields for the row)."""
    layers = list(range(len(reference.model.layers))) if layers is None else layers
    rows = []
    for i in layers:
        dec = reference.model.layers[i]
        original = dec.self_attn
        dec.self_attn = aligned.model.layers[i].self_attn
        try:
            r, c, *extra = score(reference)
        finally:
            dec.self_attn = original
        rows.append({"layer": i, "R": r, "C": c, **(extra[0] if extra else {})})
        if progress:
            progress(i, r, c)
    return rows


def write_selection(out_dir: str | Path, rows: list[dict], ratio: float, force_first_last: bool,
                    baseline: dict | None = None, extra: dict | None = None, noise_floor: float = 0.0) -> dict:
    """Score the sweep (C losses floored at ``noise_floor`` x the median C noise), choose the layers, write
    ``sweep.json``, ``sweep.md`` and ``selection.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    c_floor = common_noise_floor(rows, noise_floor)
    scores = halo_scores([r["R"] for r in rows], [r["C"] for r in rows], c_floor)
    for r, s in zip(rows, scores):
        r["score"] = s
    n = len(rows)
    chosen_pos = select_attention_layers(scores, ratio, force_first_last)
    chosen = [rows[i]["layer"] for i in chosen_pos]
    from .layer_map import uniform_layers

    result = {
        "attention_layers": chosen,
        "ratio": ratio,
        "force_first_last": force_first_last,
        "uniform_baseline": uniform_layers(n, ratio, force_first_last),
        "all_linear_baseline": [],
        "noise_floor": noise_floor,
        "c_floor": c_floor,
        "teacher_scores": baseline,
        "sweep": rows,
        **(extra or {}),
    }
    (out / "sweep.json").write_text(json.dumps(result, indent=1))
    (out / "selection.json").write_text(json.dumps({"attention_layers": chosen}, indent=1))
    noise = all(r.get("C_noise") is not None for r in rows)
    lines = ["| layer | R (recall acc) | C (other-token acc) |" + (" C noise |" if noise else "") + " HALO score | kept |",
             "|---|---|---|" + ("---|" if noise else "") + "---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['R']:.4f} | {r['C']:.4f} |" + (f" {r['C_noise']:.5f} |" if noise else "")
                     + f" {r['score']:.3f} | {'attention' if r['layer'] in chosen else 'lightning'} |")
    head = ["# HALO layer sweep", "", f"attention layers kept: {chosen} (ratio {ratio}, first/last forced: "
            f"{force_first_last}); uniform baseline: {result['uniform_baseline']}", ""]
    if baseline:
        head += [f"teacher (no layer converted): R {baseline['R']:.4f}, C {baseline['C']:.4f}", ""]
    if c_floor:
        head += [f"C losses floored at {c_floor:.5f} ({noise_floor:g} x the median paired C noise)", ""]
    (out / "sweep.md").write_text("\n".join(head + lines) + "\n")
    return result
