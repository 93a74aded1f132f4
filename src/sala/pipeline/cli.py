"""``sala pipeline``: convert the teacher, choose layers (HALO), train the student, evaluate both, report."""

from __future__ import annotations

import time
from pathlib import Path

import typer


def pipeline(
    profile: str = typer.Option("cpu", "--profile", "-p", help="Profile TOML path or bundled name (cpu, gpu)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder; running again continues where it stopped."),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    time_limit: float = typer.Option(0.0, "--time-limit", help="Stop (with checkpoints) after this many seconds; "
                                     "0 = no limit. Run the same command again to continue."),
    reserve: float = typer.Option(0.0, "--reserve", help="Do not start an evaluation/report phase with fewer "
                                  "seconds than this left before the time limit."),
    until: str = typer.Option("", help="Stop after this phase (teacher_eval, halo, compare, student, student_eval, report)."),
    reuse: Path = typer.Option(None, "--reuse", help="An earlier run folder: its teacher evaluation and equal-budget "
                               "comparison are reused where every setting they depend on (and the card, and HALO's "
                               "layers) is the same."),
):
    """Run (or continue) the conversion pipeline of a profile; ends with report/summary.md in the run folder."""
    from .profile import ProfileError, load_profile
    from .run import PHASES, Pipeline

    try:
        prof = load_profile(profile)
    except ProfileError as e:
        raise typer.BadParameter(str(e), param_hint="--profile") from None
    if until and until not in PHASES:
        raise typer.BadParameter(f"{until!r} is not a phase; phases: {', '.join(PHASES)}", param_hint="--until")
    deadline = time.time() + time_limit if time_limit > 0 else None
    try:
        pipe = Pipeline(prof, out, device=None if device == "auto" else device, reuse=reuse)
    except FileNotFoundError as e:
        raise typer.BadParameter(str(e), param_hint="--reuse") from None
    res = pipe.run(deadline=deadline, reserve_s=reserve, until=until or None)
    if res["finished"]:
        typer.echo(f"finished: {out / 'report' / 'summary.md'}")
    else:
        typer.echo(f"stopped before/in phase {res['next']} (done: {', '.join(res['done']) or 'none'}); "
                   f"run the same command again to continue")


def register(app: typer.Typer) -> None:
    app.command("pipeline")(pipeline)
