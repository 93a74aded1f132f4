"""Passkey retrieval beyond dense_len: is a miss a selection miss, a use miss, or one dense attention makes too?

A thin CLI over ``sala.eval.selection.needle_study``: per length and needle depth, the greedy answer's
correctness with the sparse path and with dense attention only, and per sparse layer / KV group whether the
answer's query selects a block that holds the needle, with the needle's rank by block score. Writes
``needle_selection.json`` under ``$OUT`` (or ``--out``) and prints a table.

    python bench/needle_selection.py --model runs/gpu/student/final --lengths 16K 32K --samples 16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main(argv=None) -> dict:
    from sala.data.corpora import resolve_text
    from sala.eval.cli import parse_length
    from sala.eval.report import fmt_len
    from sala.engine.loading import load_model, parse_model_spec, resolve_device, resolve_dtype
    from sala.eval.selection import needle_study, summary_table

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--lengths", nargs="+", default=["16K", "32K"])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--haystack", default="shakespeare,brown,austen", help="corpus names (held-out split) or a .txt")
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)

    device = resolve_device(args.device)
    model, tok = load_model(parse_model_spec(args.model), device, resolve_dtype(args.dtype, device))
    text = resolve_text(args.haystack, "heldout")
    t0 = time.perf_counter()
    study = needle_study(model, tok, text, [parse_length(x) for x in args.lengths], args.samples,
                         args.chunk or None, seed=args.seed, max_new_tokens=args.max_new_tokens,
                         log=lambda line: print(line, flush=True))
    result = {"model": args.model, "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
              "seconds": round(time.perf_counter() - t0, 1), **study}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "needle_selection.json").write_text(json.dumps(result, indent=1))
    print("\n".join(summary_table(study["summary"], fmt_len)))
    return result


if __name__ == "__main__":
    main()
