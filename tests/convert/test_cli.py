import json

import torch
from typer.testing import CliRunner

from sala import SALAForCausalLM
from sala.cli import app


def test_sala_convert_cli(llama_factory, tmp_path):
    llama_factory(layers=4).save_pretrained(tmp_path / "teacher")
    res = CliRunner().invoke(app, ["convert", "--teacher", str(tmp_path / "teacher"), "--out", str(tmp_path / "s"),
                                   "--layers", "uniform", "--ratio", "0.5"])
    assert res.exit_code == 0, res.output
    assert "SLLS" in res.output
    rep = json.loads((tmp_path / "s" / "conversion.json").read_text())
    assert rep["attention_layers"] == [0, 3]
    model = SALAForCausalLM.from_pretrained(tmp_path / "s")
    assert model.config.sparse_layers == [0, 3]
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 97, (1, 8)), use_cache=False).logits).all()


def test_sala_convert_cli_bad_teacher(tmp_path):
    res = CliRunner().invoke(app, ["convert", "--teacher", str(tmp_path / "missing"), "--out", str(tmp_path / "s")])
    assert res.exit_code != 0 and "not found" in res.output
