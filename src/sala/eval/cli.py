"""``sala eval``: long-context tasks, perplexity and speed for one or more causal LMs, with a report."""

from __future__ import annotations

from pathlib import Path

import typer


def parse_length(text: str) -> int:
    """'4096' / '4K' / '128k' / '1M' -> tokens (K = 1024)."""
    t = text.strip().upper()
    mult = {"K": 1024, "M": 1024 * 1024}.get(t[-1:], 1)
    try:
        n = int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise typer.BadParameter(f"not a length: {text!r} (use e.g. 4096, 4K, 128K, 1M)") from None
    if n <= 0:
        raise typer.BadParameter(f"length must be positive: {text!r}")
    return n


def _split(values: list[str] | None) -> list[str]:
    """Repeated options and comma-separated values alike: ['a,b', 'c'] -> ['a', 'b', 'c']."""
    return [v.strip() for item in (values or []) for v in item.split(",") if v.strip()]


def eval_command(
    model: list[str] = typer.Option(..., "--model", "-m", help="PATH or LABEL=PATH: a checkpoint folder or a .gguf file. Repeat to compare models."),
    out: Path = typer.Option(Path("eval_out"), "--out", "-o", help="Output folder (results.json, report.md, PNGs)."),
    task: list[str] = typer.Option(None, "--task", "-t", help="Tasks (repeat or comma-separate); default: all. 'none' skips tasks."),
    length: list[str] = typer.Option(["4K"], "--length", "-l", help="Context lengths for tasks (and ppl/speed unless set)."),
    samples: int = typer.Option(4, "--samples", "-n", min=1, help="Samples per task and length."),
    seed: int = typer.Option(42),
    depth: list[float] = typer.Option(None, "--depth", help="Needle depths (fractions 0-1), cycled over samples; default: spread evenly."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="Override each task's answer budget."),
    haystack: str = typer.Option("brown,shakespeare", help="Haystack text: corpus names (comma-separated) or a .txt path."),
    ppl_corpus: str = typer.Option("shakespeare,brown", help="Perplexity text (held-out split) or a .txt path."),
    ppl_length: list[str] = typer.Option(None, "--ppl-length", help="Context lengths for perplexity; default: --length."),
    ppl_windows: int = typer.Option(4, min=1, help="Windows per perplexity length."),
    ppl_score_tokens: int = typer.Option(256, min=1, help="Tokens scored at the end of each window."),
    no_ppl: bool = typer.Option(False, "--no-ppl", help="Skip perplexity."),
    speed_length: list[str] = typer.Option(None, "--speed-length", help="Context lengths for speed; default: --length."),
    speed_decode_tokens: int = typer.Option(32, min=1),
    speed_repeats: int = typer.Option(1, min=1, help="Runs per speed length (median)."),
    no_speed: bool = typer.Option(False, "--no-speed", help="Skip speed."),
    chunk_size: int = typer.Option(4096, help="Prefill chunk in tokens (0: whole prompt at once)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1 ..."),
    dtype: str = typer.Option("auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16."),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="Corpus cache (default $SALA_CACHE or ~/.cache/sala)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Evaluate causal LMs (dense or SALA) on RULER-style tasks, held-out perplexity and speed vs context length."""
    from rich.console import Console
    from rich.table import Table

    from .report import fmt_len, task_table, write_report
    from .runner import DEFAULT_TASKS, EvalConfig, progress_bar, run_eval

    console = Console(stderr=True)
    tasks = _split(task) or list(DEFAULT_TASKS)
    if tasks == ["none"]:
        tasks = []
    lengths = [parse_length(x) for x in _split(length)]
    cfg = EvalConfig(
        models=model, out_dir=str(out), tasks=tasks, lengths=lengths, samples=samples, seed=seed,
        depths=list(depth) if depth else None, max_new_tokens=max_new_tokens, haystack=haystack,
        ppl_corpus=ppl_corpus, ppl_windows=ppl_windows, ppl_score_tokens=ppl_score_tokens,
        ppl_lengths=[] if no_ppl else ([parse_length(x) for x in _split(ppl_length)] or None),
        speed_lengths=[] if no_speed else ([parse_length(x) for x in _split(speed_length)] or None),
        speed_decode_tokens=speed_decode_tokens, speed_repeats=speed_repeats, chunk_size=chunk_size or None,
        device=device, dtype=dtype, cache=str(cache_dir) if cache_dir else None,
    )
    try:
        with progress_bar(progress) as bar:
            results = run_eval(cfg, bar)
    except (FileNotFoundError, KeyError, ValueError) as e:
        console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(2) from None
    paths = write_report(results, out)
    lens, table = task_table(results)
    if table:
        t = Table("model", "task", *[fmt_len(n) for n in lens], title="accuracy (%)")
        for (m, name) in sorted(table, key=lambda k: (k[0], k[1] == "average", k[1])):
            t.add_row(m, name, *[f"{table[(m, name)][n]:.1f}" if n in table[(m, name)] else "" for n in lens])
        console.print(t)
    for r in results["perplexity"]:
        console.print(f"ppl {r['model']} @ {fmt_len(r['length'])}: {r['ppl']:.2f}")
    for s in results["skipped"]:
        console.print(f"[yellow]skipped:[/] {s}")
    for kind, p in paths.items():
        console.print(f"wrote {kind}: {p}")
