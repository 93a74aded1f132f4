"""The report's training rows and plot carry the selection alignment loss of the stages that train with it."""

import json

from sala.pipeline.report import plot_training, stage_rows


def _log(run, rows):
    run.mkdir(parents=True)
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_stage_rows_and_plot_carry_selection_kl(tmp_path):
    run = tmp_path / "student"
    recs = [{"stage": "lm4k", "kind": "lm", "global_step": 1, "loss": 3.0, "seconds": 0.2},
            {"stage": "long32k", "kind": "lm", "global_step": 2, "loss": 2.9, "seconds": 0.6, "selection_kl": 2.5},
            {"stage": "long32k", "kind": "lm", "global_step": 3, "loss": 2.8, "seconds": 0.6, "selection_kl": 1.25}]
    _log(run, recs)
    stages = [{"name": "lm4k", "batch_size": 4, "seq_len": 4096, "kind": "lm"},
              {"name": "long32k", "batch_size": 1, "seq_len": 32768, "kind": "lm"}]
    rows = {r["stage"]: r for r in stage_rows(run, stages)}
    assert "first_selection_kl" not in rows["lm4k"]
    assert rows["long32k"]["first_selection_kl"] == 2.5 and rows["long32k"]["last_selection_kl"] == 1.25
    assert rows["long32k"]["steps"] == 2 and rows["long32k"]["tokens"] == 2 * 32768
    out = plot_training({"student": run}, tmp_path / "training.png")
    assert out is not None and out.stat().st_size > 0
