"""Exact-resume checkpoints: model, optimizer, trainer position (stage, step, data stream) and RNG states.

Written by rank 0 into ``<run>/checkpoints/step-XXXXXXX/``; the ``latest`` pointer is replaced only after
the folder is complete, so a run killed while writing resumes from the previous checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, step: int, model_state: dict, optimizer_state: dict | None, trainer_state: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    # clone: tied tensors share storage, which safetensors refuses to write twice
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=1))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    pointer = root / "latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")
    return final


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(path: Path) -> tuple[dict, dict, dict | None, dict]:
    """(trainer state, model state dict, optimizer state dict or None, rng state) of a checkpoint folder."""
    sd = load_file(str(path / "model.safetensors"))
    opt = torch.load(path / "optimizer.pt", weights_only=False)
    rng = torch.load(path / "rng.pt", weights_only=False)
    return json.loads((path / "trainer.json").read_text()), sd, opt, rng
