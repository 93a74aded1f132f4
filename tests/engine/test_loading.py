"""sala.engine.loading: model specs, device and dtype choices, and loading a saved checkpoint, with errors
that name the problem."""

from __future__ import annotations

import pytest
import torch

from sala.engine.loading import (RANDOM_INIT_MARKER, is_random_init, load_model, parse_model_spec, resolve_device,
                                 resolve_dtype)


def test_model_spec_forms(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    gguf = tmp_path / "weights.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    assert parse_model_spec(folder).name == "my-model" and parse_model_spec(folder).gguf_file is None
    labelled = parse_model_spec(f"teacher={folder}")
    assert (labelled.name, labelled.path) == ("teacher", str(folder))
    g = parse_model_spec(gguf)
    assert (g.name, g.gguf_file, g.folder) == ("weights.Q4", "weights.Q4.gguf", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        parse_model_spec(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a .gguf"):
        parse_model_spec(tmp_path / "notes.txt")


def test_device_and_dtype_choices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    for bad in ("float33", "nn"):
        with pytest.raises(ValueError, match=f"unknown dtype '{bad}'"):
            resolve_dtype(bad, torch.device("cpu"))


def test_load_model_keeps_or_sets_the_dtype_and_sees_the_random_marker(tmp_path, tokenizer, builders):
    d = tmp_path / "tiny"
    builders["sala"](len(tokenizer)).save_pretrained(d)
    tokenizer.save_pretrained(d)
    model, tok = load_model(d, "cpu")
    assert not model.training and next(model.parameters()).dtype == torch.float32 and len(tok) == len(tokenizer)
    model16, _ = load_model(str(d), "cpu", "bfloat16")
    assert next(model16.parameters()).dtype == torch.bfloat16
    assert not is_random_init(d)
    (d / RANDOM_INIT_MARKER).write_text("random\n")
    assert is_random_init(d)
