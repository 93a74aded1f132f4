"""The CLI: a labelled random checkpoint, info (sizes), generate (streams text)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from sala.cli import RANDOM_LABEL, app

runner = CliRunner()


def test_init_info_generate(tmp_path):
    out = tmp_path / "tiny"
    res = runner.invoke(app, ["init-random", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "SALA_RANDOM_INIT").exists() and (out / "tokenizer.json").exists()
    assert json.loads((out / "config.json").read_text())["model_type"] == "minicpm_sala"

    res = runner.invoke(app, ["info", "--model", str(out), "--context", "1M"])
    assert res.exit_code == 0, res.output
    assert RANDOM_LABEL in res.output and "SLLSLS" in res.output and "1,048,576" in res.output

    res = runner.invoke(app, ["generate", "--model", str(out), "--prompt", "Hello", "-n", "5"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["generate", "--model", str(out), "--prompt", "Hello", "-n", "5",
                              "--temperature", "0.8", "--top-p", "0.9"])
    assert res.exit_code == 0, res.output
    # decode graphs: 'on' needs a CUDA model (this one is on the CPU), a wrong word is named
    res = runner.invoke(app, ["generate", "--model", str(out), "--prompt", "Hello", "-n", "2", "--device", "cpu",
                              "--decode-graphs", "on"])
    assert res.exit_code != 0 and "on a CUDA device; it is on cpu" in " ".join(res.output.replace("│", " ").split())
    res = runner.invoke(app, ["generate", "--model", str(out), "--prompt", "Hello", "-n", "2",
                              "--decode-graphs", "maybe"])
    assert res.exit_code != 0 and "--decode-graphs" in res.output


def test_info_release_sizes(tmp_path):
    from sala.config import release_config

    release_config().save_pretrained(tmp_path)
    res = runner.invoke(app, ["info", "--model", str(tmp_path), "--context", "1M"])
    assert res.exit_code == 0, res.output
    assert "8.3 KiB" in res.output and "8.3 GiB" in res.output  # 8 KiB K/V + 320 B compressed keys per token
    assert "48.0 MiB" in res.output  # fixed lightning state
    assert "SLLLLLLLLSLLLLLLSSLLLLSLLLLLLSSS" in res.output


def test_info_rejects_a_folder_without_config(tmp_path):
    res = runner.invoke(app, ["info", "--model", str(tmp_path)])
    assert res.exit_code != 0 and "config.json" in res.output
