"""Passkey retrieval beyond dense_len: is a miss a selection miss or a use miss?

For each length and needle depth: greedy answer correctness, and per sparse layer / KV group whether the
answer's query selects a block that holds the needle, with the needle's rank by block score
(``sala.eval.selection``). Writes ``needle_selection.json`` under ``$OUT`` (or ``--out``) and prints a table.

    python bench/needle_selection.py --model runs/gpu/student/final --lengths 16K 32K --samples 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main(argv=None) -> dict:
    from sala.eval.cli import parse_length
    from sala.eval.generation import answer, eos_ids
    from sala.eval.haystack import Haystack
    from sala.eval.runner import load_model, parse_model_spec, resolve_device, resolve_dtype
    from sala.eval.scoring import sample_score
    from sala.eval.selection import needle_selection, needle_token_span
    from sala.eval.tasks import generate_samples
    from sala.data.corpora import resolve_text

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--lengths", nargs="+", default=["16K", "32K"])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--haystack", default="shakespeare,brown,austen", help="corpus names (held-out split) or a .txt")
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)

    device = resolve_device(args.device)
    model, tok = load_model(parse_model_spec(args.model), device, resolve_dtype("auto", device))
    hay = Haystack(resolve_text(args.haystack, "heldout"), tok)
    eos = eos_ids(model, tok)
    rows = []
    t0 = time.perf_counter()
    for L in [parse_length(x) for x in args.lengths]:
        for s in generate_samples("passkey", tok, hay, L, args.samples, seed=42):
            ids = torch.tensor([s.input_ids])
            ok = sample_score(answer(model, tok, s, eos, args.chunk)[0], s.answers)
            span = needle_token_span(tok, s.prompt, s.needles[0])
            sel = needle_selection(model, ids, span, args.chunk)
            rows.append({"length": L, "depth": s.depths[0], "correct": ok, "span": span,
                         "selected_frac": sum(r["selected"] for r in sel) / max(1, len(sel)),
                         "median_rank": statistics.median(r["rank"] for r in sel) if sel else None,
                         "per_layer": sel})
            print(f"{L:>7} depth {s.depths[0]:.2f}: correct {ok:.0f} selected {rows[-1]['selected_frac']:.2f} "
                  f"median rank {rows[-1]['median_rank']}", flush=True)
    result = {"model": args.model, "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
              "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "needle_selection.json").write_text(json.dumps(result, indent=1))
    for L in sorted({r["length"] for r in rows}):
        sub = [r for r in rows if r["length"] == L]
        hit = [r for r in sub if r["selected_frac"] >= 0.5]
        print(f"{L}: accuracy {sum(r['correct'] for r in sub) / len(sub):.2f}; needle selected by most layers in "
              f"{len(hit)}/{len(sub)} samples, accuracy there {sum(r['correct'] for r in hit) / max(1, len(hit)):.2f}")
    return result


if __name__ == "__main__":
    main()
