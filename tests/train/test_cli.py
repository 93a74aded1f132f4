from typer.testing import CliRunner

from sala.cli import app

RECIPE = """
name = "cli_tiny"
teacher = "random-llama"
teacher_shape = { vocab_size = 64, hidden_size = 32, intermediate_size = 48, num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2 }
layers = "1"
data_options = { n_docs = 16, min_len = 8, max_len = 24 }

[[stages]]
name = "lm"
kind = "lm"
steps = 2
seq_len = 16
batch_size = 2
lr = 1e-3
"""


def test_sala_train_cli_stops_and_resumes(tmp_path):
    (tmp_path / "r.toml").write_text(RECIPE)
    args = ["train", "--recipe", str(tmp_path / "r.toml"), "--out", str(tmp_path / "run")]
    res = CliRunner().invoke(app, args + ["--stop-after", "1"])
    assert res.exit_code == 0, res.output
    assert "stopped at global step 1" in res.output
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0 and "finished at global step 2" in res.output and "resumed" in res.output
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_sala_train_cli_bad_recipe(tmp_path):
    res = CliRunner().invoke(app, ["train", "--recipe", "no_such_recipe", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "no recipe file" in res.output
