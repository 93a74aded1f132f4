"""Finding and loading a causal LM for inference: one place for every command that runs a model
(``sala generate``, ``sala serve``, ``sala eval``, the pipeline's evaluation).

A model is a checkpoint folder for ``from_pretrained`` or a ``.gguf`` file (read through transformers'
``gguf_file=``); ``import sala`` registers SALA checkpoints with the Auto classes, so any transformers
causal LM loads the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

RANDOM_INIT_MARKER = "SALA_RANDOM_INIT"  # file written next to a randomly initialised demo checkpoint
RANDOM_LABEL = "RANDOMLY INITIALISED DEMO CHECKPOINT (not a trained model)"


@dataclass
class ModelSpec:
    name: str
    path: str
    gguf_file: str | None = None

    @property
    def folder(self) -> str:
        return str(Path(self.path).parent) if self.gguf_file else self.path


def parse_model_spec(spec: str | Path) -> ModelSpec:
    """``[label=]path``; ``path`` is a folder for ``from_pretrained`` or a ``.gguf`` file."""
    spec = str(spec)
    label, _, rest = spec.partition("=")
    if rest and "/" not in label and not Path(spec).exists():
        name, path = label, rest
    else:
        name, path = "", spec
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model path {p} does not exist")
    gguf = p.name if p.is_file() and p.suffix == ".gguf" else None
    if p.is_file() and gguf is None:
        raise ValueError(f"model path {p} is a file but not a .gguf; pass a checkpoint folder or a GGUF file")
    return ModelSpec(name or (p.stem if gguf else p.name), str(p), gguf)


def is_random_init(folder: str | Path) -> bool:
    """Whether ``folder`` is a randomly initialised demo checkpoint (``sala init``): commands say so."""
    return (Path(folder) / RANDOM_INIT_MARKER).exists()


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None): CUDA when available, else the CPU; anything else as ``torch.device`` reads it."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA, float32 elsewhere (what the evaluation compares models in)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        out = getattr(torch, dtype)
    except AttributeError:
        out = None
    if not isinstance(out, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; expected auto, float32, bfloat16 or float16")
    return out


def load_model(spec: ModelSpec | str | Path, device: str | torch.device = "auto",
               dtype: torch.dtype | str = "auto"):
    """(model in eval mode on ``device``, tokenizer) for a folder or GGUF file. ``dtype="auto"`` keeps
    the checkpoint's own dtype; pass ``resolve_dtype(...)`` for the evaluation's choice."""
    import sala  # noqa: F401  (registers SALA with the Auto classes)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(spec, ModelSpec):
        spec = parse_model_spec(spec)
    device = resolve_device(device)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = resolve_dtype(dtype, device)
    kw = {"gguf_file": spec.gguf_file} if spec.gguf_file else {}
    tok = AutoTokenizer.from_pretrained(spec.folder, **kw)
    model = AutoModelForCausalLM.from_pretrained(spec.folder, dtype=dtype, **kw).to(device).eval()
    return model, tok
