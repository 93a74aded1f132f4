"""``sala serve``: the HTTP server on a checkpoint folder (registered by ``sala.cli``)."""

from __future__ import annotations

from pathlib import Path

import typer

# `sala generate` and `sala serve` take the same option
DECODE_GRAPHS = typer.Option("auto", "--decode-graphs",
                             help="auto (on a GPU), on or off: the lightning layers' decode steps as CUDA graphs")


def serve_command(
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint folder with a tokenizer."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, min=1, max=65535),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    dtype: str = typer.Option("auto", help="auto, float32 or bfloat16"),
    name: str = typer.Option(None, "--name", help="Served model name (default: the folder's name)."),
    chunk_size: int = typer.Option(8192, "--chunk-size", min=1, help="Prefill chunk in tokens."),
    max_tokens: int = typer.Option(256, "--default-max-tokens", min=1, help="max_tokens when a request omits it."),
    decode_graphs: str = DECODE_GRAPHS,
):
    """Serve a checkpoint over HTTP: OpenAI-compatible /v1/completions and /v1/chat/completions."""
    from rich.console import Console

    from .loading import RANDOM_LABEL, is_random_init

    console = Console()
    if not (model / "config.json").is_file():
        raise typer.BadParameter(f"no config.json in {model}", param_hint="--model")
    try:
        from .server import serve
        from .service import Engine
    except ImportError as e:
        raise typer.BadParameter(f"{e.name} is missing: pip install 'sala[serve]'") from None
    if is_random_init(model):
        console.print(f"[bold red]{RANDOM_LABEL}[/]: it will answer with gibberish.", highlight=False)
    from .graphs import DecodeGraphsError

    try:
        engine = Engine.load(model, device=device, dtype=dtype, name=name, chunk_size=chunk_size,
                             default_max_tokens=max_tokens, decode_graphs=decode_graphs)
    except DecodeGraphsError as e:
        raise typer.BadParameter(str(e), param_hint="--decode-graphs") from None
    graphs = "on" if getattr(engine.model.model, "decode_runner", None) is not None else "off"
    console.print(f"serving {engine.name!r} on http://{host}:{port} (device {engine.model.device}, "
                  f"context {engine.max_context}, decode graphs {graphs}, one request at a time)", highlight=False)
    serve(engine, host=host, port=port)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
