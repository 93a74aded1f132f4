"""Shared fixtures: the released reference's outputs on a tiny random checkpoint (tests/fixtures)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without CUDA (CI), Triton kernels run through the interpreter. TRITON_INTERPRET must be set before
# triton.language is first imported (``import sala`` imports it, through torch): a test module that sets
# it itself is too late once any earlier-collected module imported sala, so it is set here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "minicpm_sala_tiny"


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    return FIXTURE_DIR


@pytest.fixture(scope="session")
def cases() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(FIXTURE_DIR / "cases.safetensors"))


@pytest.fixture(scope="session")
def tiny_model():
    import sala  # noqa: F401
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(FIXTURE_DIR)).eval()
