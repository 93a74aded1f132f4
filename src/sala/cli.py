"""The ``sala`` command line: model info, generation, a labelled random checkpoint for demos.

Subcommands of other floors (eval, convert, ...) register themselves at the bottom of this file.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .engine.cli import DECODE_GRAPHS
from .engine.loading import RANDOM_LABEL, is_random_init

app = typer.Typer(add_completion=False, no_args_is_help=True, help="MiniCPM-SALA hybrid sparse/linear attention models.")
console = Console()


def _parse_size(text: str) -> int:
    """'128K' / '1M' / '4096' -> tokens."""
    t = text.strip().upper()
    mult = {"K": 1024, "M": 1024 * 1024}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise typer.BadParameter(f"not a length: {text!r} (use e.g. 4096, 128K, 1M)") from None


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _load_config(model: Path):
    from .config import SALAConfig

    if not (model / "config.json").is_file():
        raise typer.BadParameter(f"no config.json in {model}")
    return SALAConfig.from_pretrained(str(model))


@app.command()
def info(
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint folder (config.json + safetensors)."),
    context: list[str] = typer.Option(["8K", "128K", "1M"], "--context", "-c", help="Context lengths to size."),
    batch: int = typer.Option(1, help="Sequences held at once."),
    dtype: str = typer.Option("bfloat16", help="Dtype of weights and K/V cache."),
):
    """Parameters, layer map, cache bytes per token and fixed state, memory needed at given context lengths."""
    import torch

    from .cache import cache_bytes_per_token, lightning_state_bytes
    from .config import LIGHTNING

    cfg = _load_config(model)
    tdtype = getattr(torch, dtype)
    with torch.device("meta"):
        from .modeling import SALAForCausalLM

        n_params = sum(p.numel() for p in SALAForCausalLM(cfg).parameters())
    weight_bytes = n_params * torch.empty(0, dtype=tdtype).element_size()
    per_tok = cache_bytes_per_token(cfg, tdtype)
    fixed = lightning_state_bytes(cfg)
    if is_random_init(model):
        console.print(f"[bold red]{RANDOM_LABEL}[/]")
    console.print(f"[bold]{model}[/]  parameters: {n_params / 1e6:,.2f} M  weights ({dtype}): {_human_bytes(weight_bytes)}")
    layer_map = "".join("L" if m == LIGHTNING else "S" for m in cfg.mixer_types)
    console.print(f"layers: {cfg.num_hidden_layers}  map (S=sparse, L=lightning): {layer_map}")
    console.print(f"sparse layers {cfg.sparse_layers}; sparse settings {cfg.sparse_config}")
    console.print(f"cache per token: {_human_bytes(per_tok)}   fixed state per sequence: {_human_bytes(fixed)}")
    table = Table("context", "KV cache", "lightning state", "weights", "total")
    for c in context:
        n = _parse_size(c)
        kv = per_tok * n * batch
        st = fixed * batch
        table.add_row(f"{n:,}", _human_bytes(kv), _human_bytes(st), _human_bytes(weight_bytes), _human_bytes(kv + st + weight_bytes))
    console.print(table)


@app.command("init-random")
def init_random(
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the checkpoint to."),
    preset: str = typer.Option("tiny", help="tiny (CPU demo) or release (9B shapes, meta-sized: config only)."),
    seed: int = typer.Option(0),
):
    """Write a small randomly initialised SALA checkpoint (labelled as such) with a byte-level tokenizer."""
    from .demo import write_random_checkpoint

    path = write_random_checkpoint(out, preset=preset, seed=seed)
    console.print(f"wrote {RANDOM_LABEL} to {path}")


@app.command()
def generate(
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint folder with a tokenizer."),
    prompt: str = typer.Option(..., "--prompt", "-p"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    dtype: str = typer.Option("auto", help="auto, float32 or bfloat16"),
    decode_graphs: str = DECODE_GRAPHS,
):
    """Generate from a prompt, streaming tokens as they come."""
    import torch
    from transformers import TextStreamer

    from .engine.graphs import DecodeGraphsError, apply_decode_graphs, check_decode_graphs_mode
    from .engine.loading import load_model

    if is_random_init(model):
        console.print(f"[bold red]{RANDOM_LABEL}[/]: expect gibberish.", highlight=False)
    try:
        check_decode_graphs_mode(decode_graphs)  # before the model loads
        lm, tok = load_model(model, device, dtype)
        apply_decode_graphs(lm, decode_graphs)
    except DecodeGraphsError as e:
        raise typer.BadParameter(str(e), param_hint="--decode-graphs") from None
    torch.manual_seed(seed)
    enc = tok(prompt, return_tensors="pt").to(lm.device)
    streamer = TextStreamer(tok, skip_prompt=True)
    kwargs = dict(max_new_tokens=max_new_tokens, streamer=streamer, pad_token_id=tok.pad_token_id)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False)
    with torch.no_grad():
        lm.generate(**enc, **kwargs)


def main() -> None:  # pragma: no cover
    app()


# ---- subcommands from other floors register below (one line each)
from .convert.cli import register as _register_convert; _register_convert(app)  # noqa: E402,E702
from .eval.cli import eval_command as _eval_command; app.command("eval")(_eval_command)  # noqa: E402,E702
from .train.cli import register as _register_train; _register_train(app)  # noqa: E402,E702
from .pipeline.cli import register as _register_pipeline; _register_pipeline(app)  # noqa: E402,E702
from .engine.cli import register as _register_serve; _register_serve(app)  # noqa: E402,E702


if __name__ == "__main__":
    app()
