"""``sala train``: run a training recipe (resumes from the run folder's latest checkpoint)."""

from __future__ import annotations

from pathlib import Path

import typer


def train(
    recipe: str = typer.Option("cpu_tiny", "--recipe", "-r", help="Recipe TOML path or bundled name (cpu_tiny, gpu_smollm2)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder (checkpoints, log.jsonl, converted/, final/)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    stop_after: int = typer.Option(0, help="Stop after this many global steps with a checkpoint (0 = run all)."),
):
    """Convert the recipe's teacher and train the SALA student stage by stage; launch with torchrun for DDP."""
    from .recipe import RecipeError, load_recipe
    from .trainer import Trainer

    try:
        rec = load_recipe(recipe)
    except RecipeError as e:
        raise typer.BadParameter(str(e), param_hint="--recipe") from None
    from . import distributed as D

    trainer = Trainer(rec, out, device=None if device == "auto" else device)
    res = trainer.run(stop_after=stop_after or None)
    D.shutdown()  # after success only: a failed rank's barrier would hang the others (torchrun stops them)
    typer.echo(("finished" if res["finished"] else "stopped") + f" at global step {res['state']['global_step']}: {out}")


def register(app: typer.Typer) -> None:
    app.command("train")(train)
