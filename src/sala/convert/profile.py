"""CPU profile of a real conversion: ``python -m sala.convert.profile --out runs/profile``.

Runs the ``cpu_smollm2`` recipe (SmolLM2-135M -> SALA, a few steps of alignment, distillation and LM
training) and measures held-out perplexity of the teacher, of the converted model before training and
after it, the exactness check (all layers kept, RoPE kept: max logit difference) and the time of every
phase. Writes ``profile.json`` and ``profile.md`` into the run folder.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch


def heldout_ppl(model, ids: torch.Tensor, window: int, n_windows: int) -> float:
    """Perplexity over ``n_windows`` disjoint windows of the held-out token stream."""
    total, count = 0.0, 0
    kw = {"use_cache": False} if hasattr(model.config, "mixer_types") else {}
    step = max(window, (len(ids) - window) // max(1, n_windows))
    with torch.no_grad():
        for w in range(n_windows):
            x = ids[w * step: w * step + window][None]
            if x.shape[1] < window:
                break
            logits = model(input_ids=x, **kw).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            count += window - 1
    return math.exp(total / count)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/profile_cpu_smollm2")
    ap.add_argument("--recipe", default="cpu_smollm2")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--windows", type=int, default=4)
    args = ap.parse_args(argv)
    from ..data import corpora
    from ..train.recipe import load_recipe
    from ..train.trainer import Trainer
    from .teacher import fetch_default_teacher
    from .transfer import ConvertOptions, convert_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t = time.perf_counter()
    fetch_default_teacher()
    times["fetch_teacher_s"] = time.perf_counter() - t
    t = time.perf_counter()
    trainer = Trainer(load_recipe(args.recipe), out / "run")
    times["setup_s (load teacher, convert, tokenize data, save converted)"] = time.perf_counter() - t
    tok = trainer.tokenizer
    held = torch.tensor(tok(corpora.load_text("shakespeare", split="heldout"), add_special_tokens=False)["input_ids"])
    ppl = {}
    t = time.perf_counter()
    ppl["teacher"] = heldout_ppl(trainer.teacher, held, args.window, args.windows)
    times["ppl_teacher_s"] = time.perf_counter() - t
    exact, _ = convert_model(trainer.teacher, trainer.spec, list(range(trainer.spec.num_layers)),
                             ConvertOptions(keep_rope=True, attn_output_gate=False, sparse={"dense_len": 1 << 30}))
    x = held[:128][None]
    with torch.no_grad():
        diff = (exact(x, use_cache=False).logits - trainer.teacher(x).logits.float()).abs().max().item()
    del exact
    ppl["converted_before_training"] = heldout_ppl(trainer.student, held, args.window, args.windows)
    t = time.perf_counter()
    res = trainer.run()
    times["train_s"] = time.perf_counter() - t
    trainer.student.eval()
    ppl["after_training"] = heldout_ppl(trainer.student, held, args.window, args.windows)
    per_stage = {}
    for r in res["history"]:
        s = per_stage.setdefault(r["stage"], {"steps": 0, "seconds": [], "first_loss": r["loss"]})
        s["steps"] += 1
        s["seconds"].append(r["seconds"])
        s["last_loss"] = r["loss"]
    for s in per_stage.values():
        sec = sorted(s.pop("seconds"))
        s["median_step_s"] = sec[len(sec) // 2]
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "teacher": trainer.report["teacher"]["model_type"] + " SmolLM2-135M-Instruct (Q4_1 GGUF dequantized, bf16 cache)",
        "attention_layers": trainer.report["attention_layers"],
        "sparse_config_reason": trainer.report["sparse_config_reason"],
        "all_attention_rope_max_logit_diff": diff,
        "heldout_ppl": ppl, "ppl_windows": f"{args.windows} x {args.window} tokens of shakespeare/heldout",
        "stages": per_stage, "times": times,
    }
    (out / "profile.json").write_text(json.dumps(report, indent=1))
    lines = ["# SmolLM2-135M -> SALA, CPU profile", "", f"machine: {report['machine']}", "",
             f"attention layers kept: {report['attention_layers']}; {report['sparse_config_reason']}", "",
             f"exactness (all layers attention, RoPE kept): max |logit diff| = {diff:.2e}", "",
             f"held-out perplexity ({report['ppl_windows']}):", ""]
    lines += [f"- {k}: {v:.2f}" for k, v in ppl.items()]
    lines += ["", "| stage | steps | first loss | last loss | median s/step |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['steps']} | {v['first_loss']:.4f} | {v['last_loss']:.4f} | {v['median_step_s']:.2f} |"
              for k, v in per_stage.items()]
    lines += ["", "| phase | seconds |", "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in times.items()]
    (out / "profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
