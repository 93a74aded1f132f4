"""End to end on CPU: `sala eval` over a dense Llama and a SALA hybrid in one run -> JSON, markdown, PNGs."""

import json

from typer.testing import CliRunner

from pathlib import Path
from sala.cli import app
from sala.eval.scoring import sample_score

EXCERPT = Path(__file__).parent / "data" / "shakespeare_excerpt.txt"


def test_eval_end_to_end(model_dirs, tmp_path):
    out = tmp_path / "report"
    args = ["eval", "-m", f"dense={model_dirs['llama']}", "-m", f"hybrid={model_dirs['sala']}",
            "-t", "passkey,niah_multikey", "-t", "vt", "-t", "cwe", "-l", "600", "-n", "2", "--max-new-tokens", "3",
            "--haystack", str(EXCERPT), "--ppl-corpus", str(EXCERPT), "--ppl-length", "128,300",
            "--ppl-windows", "2", "--ppl-score-tokens", "32", "--speed-length", "300,1100", "--speed-decode-tokens", "2",
            "--chunk-size", "256", "-o", str(out)]  # progress bar on (rich, not a terminal here)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    res = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in res["models"]] == ["dense", "hybrid"]
    assert [m["class"] for m in res["models"]] == ["LlamaForCausalLM", "SALAForCausalLM"]
    assert len(res["tasks"]) == 2 * 4
    for rec in res["tasks"]:
        assert rec["length"] == 600 and rec["n_samples"] == 2
        for s in rec["samples"]:
            assert 600 - 8 <= s["n_tokens"] <= 600 and isinstance(s["prediction"], str)
            assert s["score"] == sample_score(s["prediction"], s["answers"])
        assert rec["score"] == 100 * sum(s["score"] for s in rec["samples"]) / 2
    # the same seeded instances for both models: identical answers and depths
    by = {(t["model"], t["task"]): t["samples"] for t in res["tasks"]}
    for task in ("passkey", "niah_multikey", "vt", "cwe"):
        assert [s["answers"] for s in by[("dense", task)]] == [s["answers"] for s in by[("hybrid", task)]]
    assert {(p["model"], p["length"]) for p in res["perplexity"]} == {(m, n) for m in ("dense", "hybrid") for n in (128, 300)}
    # random weights: perplexity near the vocabulary size (400), far from 1 and from overflow
    assert all(50 < p["ppl"] < 4000 for p in res["perplexity"])
    # the hybrid refuses 1100 > its max_position_embeddings (1024): recorded as skipped, the run goes on
    assert {(s["model"], s["length"]) for s in res["speed"]} == {("dense", 300), ("dense", 1100), ("hybrid", 300)}
    assert len(res["skipped"]) == 1 and res["skipped"][0].startswith("hybrid: speed at 1100 tokens:")
    assert "max_position_embeddings" in res["skipped"][0]
    for png in ("accuracy_vs_length.png", "perplexity_vs_length.png", "speed_vs_length.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    md = (out / "report.md").read_text()
    assert "| hybrid | vt |" in md and "SALAForCausalLM" in md and "## Speed" in md


def test_eval_rejects_unknown_task_and_missing_model(model_dirs, tmp_path):
    r = CliRunner().invoke(app, ["eval", "-m", str(model_dirs["llama"]), "-t", "nope", "-o", str(tmp_path), "--no-progress"])
    assert r.exit_code == 2 and "unknown task" in " ".join(r.output.split())
    r = CliRunner().invoke(app, ["eval", "-m", str(tmp_path / "missing"), "-o", str(tmp_path), "--no-progress"])
    assert r.exit_code == 2 and "does not exist" in " ".join(r.output.split())
    r = CliRunner().invoke(app, ["eval", "-m", str(model_dirs["llama"]), "-l", "4Q", "-o", str(tmp_path)])
    assert r.exit_code == 2
