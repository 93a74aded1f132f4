"""``sala convert``: a pretrained Llama-family Transformer -> a SALA hybrid checkpoint.

Imports nothing heavy at module level, so ``sala --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer


def convert(
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the SALA checkpoint to."),
    teacher: str = typer.Option("default", "--teacher", "-t",
                                help="HF folder or .gguf file; 'default' = SmolLM2-135M-Instruct (fetched once)."),
    layers: str = typer.Option("uniform", "--layers", "-l",
                               help="Attention layers: '0,9,31', 'uniform', 'all-linear', 'all-attention', "
                                    "or a HALO selection.json written by `sala convert-select`."),
    ratio: float = typer.Option(0.25, help="Share of layers kept as attention for 'uniform'."),
    force_first_last: bool = typer.Option(True, help="'uniform' keeps the first and last layer."),
    keep_rope: bool = typer.Option(False, help="Kept attention layers keep RoPE (default: NoPE, as the release)."),
    attn_output_gate: bool = typer.Option(True, help="New o_gate on the kept attention layers."),
    dense_len: int = typer.Option(0, help="Override sparse_config.dense_len (0 = chosen from the teacher)."),
    dtype: str = typer.Option("float32", help="Saved dtype: float32 or bfloat16."),
    seed: int = typer.Option(0, help="Seed of the new parameters (z_proj, o_gate)."),
):
    """Convert a Transformer into a SALA hybrid: weights transferred, new gates initialised, report written."""
    import torch

    from .layer_map import parse_layers
    from .teacher import TeacherError, load_teacher, resolve_teacher
    from .transfer import ConvertOptions, convert_model, save_converted

    try:
        folder, gguf = resolve_teacher(teacher)
        model_t, tok, spec = load_teacher(folder, gguf)
    except TeacherError as e:
        raise typer.BadParameter(str(e), param_hint="--teacher") from None
    if layers.endswith(".json"):
        attn = json.loads(Path(layers).read_text())["attention_layers"]
    else:
        try:
            attn = parse_layers(layers, spec.num_layers, ratio, force_first_last)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--layers") from None
    opts = ConvertOptions(keep_rope=keep_rope, attn_output_gate=attn_output_gate, seed=seed,
                          sparse={"dense_len": dense_len} if dense_len else {})
    try:
        model, report = convert_model(model_t, spec, attn, opts, dtype=getattr(torch, dtype))
    except TeacherError as e:
        raise typer.BadParameter(str(e), param_hint="--teacher") from None
    report["teacher_path"] = str(folder / gguf) if gguf else str(folder)
    save_converted(model, out, tok, report)
    n = spec.num_layers
    layer_map = "".join("S" if i in set(attn) else "L" for i in range(n))
    typer.echo(f"converted {report['teacher_path']} ({spec.model_type}, {n} layers) -> {out}")
    typer.echo(f"layer map (S=sparse attention, L=lightning): {layer_map}")
    typer.echo(f"sparse settings: {report['sparse_config_reason']}")
    for note in report["notes"]:
        typer.echo(f"note: {note}")


def convert_select(
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: align/, sweep.json, sweep.md, selection.json."),
    teacher: str = typer.Option("default", "--teacher", "-t", help="HF folder, .gguf file or 'default'."),
    data: str = typer.Option("synthetic", help="'synthetic', 'text:<file>' or 'corpus:<name>'."),
    max_docs: int = typer.Option(0, help="Use at most this many documents (0 = all)."),
    align_steps: int = typer.Option(200, help="Alignment steps of the all-lightning student."),
    seq_len: int = typer.Option(512),
    batch_size: int = typer.Option(8),
    lr: float = typer.Option(1e-3),
    probe_rows: int = typer.Option(8, help="Rows of seq_len tokens scored per layer."),
    ratio: float = typer.Option(0.25),
    force_first_last: bool = typer.Option(True),
    recall: str = typer.Option("bigram", help="'bigram' or 'task:<name>:<length>:<samples>', e.g. task:passkey:1024:8."),
    haystack: str = typer.Option("shakespeare", help="Corpus name or text file for task-based recall."),
    noise_floor: float = typer.Option(0.0, help="Floor C losses at this many median paired C noises (0: the "
                                                  "paper's score; 1 keeps the choice from following C's noise)."),
):
    """HALO layer selection: align every layer's lightning replacement, score each layer, keep the top 25%."""
    from ..train.halo import halo_select

    res = halo_select(out, teacher=teacher, data=data, data_options={"max_docs": max_docs} if max_docs else {},
                      align_steps=align_steps, seq_len=seq_len, batch_size=batch_size, lr=lr,
                      probe_rows=probe_rows, ratio=ratio, force_first_last=force_first_last, recall=recall,
                      haystack=haystack, noise_floor=noise_floor, log=typer.echo)
    typer.echo(f"wrote {out / 'selection.json'}: attention layers {res['attention_layers']}")


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)
    app.command("convert-select")(convert_select)
