"""Write an evaluation's results as JSON, a markdown report with tables, and PNG plots (matplotlib Agg)."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path


def fmt_len(n: int) -> str:
    """4096 -> '4K', 1048576 -> '1M', 1000 -> '1000'."""
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def task_table(results: dict) -> tuple[list[int], dict[tuple[str, str], dict[int, float]]]:
    """(lengths, {(model, task): {length: score}}) including an ``average`` task per model."""
    table: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    lengths = sorted({r["length"] for r in results.get("tasks", [])})
    per_model_len: dict[tuple[str, int], list[float]] = defaultdict(list)
    for r in results.get("tasks", []):
        table[(r["model"], r["task"])][r["length"]] = r["score"]
        per_model_len[(r["model"], r["length"])].append(r["score"])
    for (model, length), scores in per_model_len.items():
        table[(model, "average")][length] = sum(scores) / len(scores)
    return lengths, dict(table)


def depth_table(results: dict) -> dict[str, dict[float, dict[int, float]]]:
    """{model: {depth: {length: mean score (%)}}} over the needle tasks (depth of each sample's first needle)."""
    acc: dict[tuple[str, float, int], list[float]] = defaultdict(list)
    for r in results.get("tasks", []):
        for s in r.get("samples", []):
            if s.get("depths"):
                acc[(r["model"], round(s["depths"][0], 2), r["length"])].append(s["score"])
    out: dict[str, dict[float, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for (m, d, n), scores in acc.items():
        out[m][d][n] = 100.0 * sum(scores) / len(scores)
    return {m: dict(v) for m, v in out.items()}


def write_json(results: dict, path: Path) -> Path:
    path.write_text(json.dumps(results, indent=1, default=str))
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


_STYLES = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."), ("v", "-"), ("P", "--")]


def _style(i: int) -> dict:
    """Distinct marker and line style per model, so identical curves stay visible on top of each other."""
    marker, ls = _STYLES[i % len(_STYLES)]
    return {"marker": marker, "linestyle": ls, "markersize": 7 - (i % 3)}


def _plain_log_y(ax):
    from matplotlib.ticker import LogLocator, ScalarFormatter

    ax.set_yscale("log")
    fmt = ScalarFormatter()
    fmt.set_scientific(False)
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_locator(LogLocator(subs=(2, 5)))
    ax.yaxis.set_minor_formatter(ScalarFormatter())


def _log2_axis(ax, lengths):
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths)
    ax.set_xticklabels([fmt_len(n) for n in lengths])
    ax.grid(True, alpha=0.3)


def plot_accuracy(results: dict, path: Path) -> Path | None:
    lengths, table = task_table(results)
    if not table:
        return None
    plt = _plt()
    tasks = sorted({t for _, t in table if t != "average"}) + ["average"]
    models = sorted({m for m, _ in table})
    cols = min(3, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for k, task in enumerate(tasks):
        ax = axes[k // cols][k % cols]
        for i, m in enumerate(models):
            pts = sorted(table.get((m, task), {}).items())
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=m, **_style(i))
        ax.set_title(task)
        ax.set_ylim(-5, 105)
        ax.set_ylabel("score (%)")
        _log2_axis(ax, lengths)
    for k in range(len(tasks), rows * cols):
        axes[k // cols][k % cols].axis("off")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Accuracy vs context length")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_series(records: list[dict], keys: list[tuple[str, str, bool]], title: str, path: Path) -> Path | None:
    if not records:
        return None
    plt = _plt()
    models = sorted({r["model"] for r in records})
    lengths = sorted({r["length"] for r in records})
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.4), squeeze=False)
    for ax, (key, label, logy) in zip(axes[0], keys):
        for i, m in enumerate(models):
            pts = sorted((r["length"], r[key]) for r in records if r["model"] == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=m, **_style(i))
        ax.set_ylabel(label)
        if logy:
            _plain_log_y(ax)
        _log2_axis(ax, lengths)
        ax.set_xlabel("context length (tokens)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_perplexity(results: dict, path: Path) -> Path | None:
    return _plot_series(results.get("perplexity", []), [("ppl", "perplexity", True)], "Held-out perplexity vs context", path)


def plot_speed(results: dict, path: Path) -> Path | None:
    recs = [dict(r, peak_mib=r["peak_memory_bytes"] / 2**20) for r in results.get("speed", [])]
    keys = [("ttft_s", "time to first token (s)", True), ("decode_tokens_per_s", "decode tokens/s", True),
            ("peak_mib", "peak memory (MiB)", True)]
    return _plot_series(recs, keys, "Speed vs context length", path)


def markdown(results: dict, images: dict[str, Path | None]) -> str:
    meta = results.get("meta", {})
    lines = ["# Long-context evaluation", ""]
    lines.append(f"Created {meta.get('created', '?')} on {meta.get('device_name', meta.get('device', '?'))}; "
                 f"seed {meta.get('seed')}, {meta.get('samples')} samples per task and length; "
                 f"haystack text: {meta.get('haystack')}; perplexity text: {meta.get('ppl_corpus')}.")
    lines.append("")
    lines += ["## Models", "", "| model | class | parameters | path | note |", "|---|---|---|---|---|"]
    for m in results.get("models", []):
        note = "**random weights (not a trained model)**" if m.get("random_init") else ""
        lines.append(f"| {m['name']} | {m['class']} | {m['params'] / 1e6:,.2f} M | `{m['path']}` | {note} |")
    lengths, table = task_table(results)
    if table:
        lines += ["", "## Task accuracy (%, RULER string_match_all with word boundaries)", ""]
        lines.append("| model | task | " + " | ".join(fmt_len(n) for n in lengths) + " |")
        lines.append("|---|---|" + "---|" * len(lengths))
        for (m, t) in sorted(table, key=lambda k: (k[0], k[1] == "average", k[1])):
            cells = [f"{table[(m, t)][n]:.1f}" if n in table[(m, t)] else "" for n in lengths]
            name = f"**{t}**" if t == "average" else t
            lines.append(f"| {m} | {name} | " + " | ".join(cells) + " |")
        if images.get("accuracy"):
            lines += ["", f"![accuracy vs length]({images['accuracy'].name})"]
        depths = depth_table(results)
        if depths:
            lines += ["", "### Accuracy by needle depth (%, needle tasks pooled; depth 0 = start of the text)", ""]
            lines.append("| model | depth | " + " | ".join(fmt_len(n) for n in lengths) + " |")
            lines.append("|---|---|" + "---|" * len(lengths))
            for m in sorted(depths):
                for d in sorted(depths[m]):
                    row = depths[m][d]
                    lines.append(f"| {m} | {d:.2f} | " + " | ".join(f"{row[n]:.0f}" if n in row else "" for n in lengths) + " |")
    ppl = results.get("perplexity", [])
    if ppl:
        plens = sorted({r["length"] for r in ppl})
        lines += ["", f"## Perplexity (last {meta.get('ppl_score_tokens')} tokens of each window, "
                  f"{meta.get('ppl_windows')} windows per length)", ""]
        lines.append("| model | " + " | ".join(fmt_len(n) for n in plens) + " |")
        lines.append("|---|" + "---|" * len(plens))
        for m in sorted({r["model"] for r in ppl}):
            row = {r["length"]: r["ppl"] for r in ppl if r["model"] == m}
            lines.append(f"| {m} | " + " | ".join(f"{row[n]:.2f}" if n in row else "" for n in plens) + " |")
        if images.get("perplexity"):
            lines += ["", f"![perplexity vs length]({images['perplexity'].name})"]
    speed = results.get("speed", [])
    if speed:
        lines += ["", f"## Speed ({meta.get('device_name', meta.get('device'))}, {meta.get('dtype')})", "",
                  "| model | length | TTFT (s) | decode tok/s | peak memory | memory measure |", "|---|---|---|---|---|---|"]
        for r in sorted(speed, key=lambda r: (r["model"], r["length"])):
            lines.append(f"| {r['model']} | {fmt_len(r['length'])} | {r['ttft_s']:.3f} | {r['decode_tokens_per_s']:.1f} | "
                         f"{_bytes(r['peak_memory_bytes'])} | {r['memory_kind']} (before: {_bytes(r['baseline_memory_bytes'])}) |")
        if images.get("speed"):
            lines += ["", f"![speed vs length]({images['speed'].name})"]
    if results.get("skipped"):
        lines += ["", "## Skipped", ""] + [f"- {s}" for s in results["skipped"]]
    return "\n".join(lines) + "\n"


def write_report(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write ``results.json``, ``report.md`` and the PNG plots into ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = {
        "accuracy": plot_accuracy(results, out / "accuracy_vs_length.png"),
        "perplexity": plot_perplexity(results, out / "perplexity_vs_length.png"),
        "speed": plot_speed(results, out / "speed_vs_length.png"),
    }
    paths = {"json": write_json(results, out / "results.json")}
    (out / "report.md").write_text(markdown(results, images))
    paths["markdown"] = out / "report.md"
    paths.update({k: v for k, v in images.items() if v is not None})
    return paths
