"""Shared fixtures: the released reference's outputs on a tiny random checkpoint (tests/fixtures)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
