"""Saved tiny models for the eval tests (the tokenizer and the model builders are in tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer, builders):
    """{'llama': dir, 'sala': dir}: saved tiny models with the trained tokenizer."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, build in builders.items():
        d = root / name
        build(len(tokenizer)).save_pretrained(d)
        tokenizer.save_pretrained(d)
        out[name] = d
    return out
