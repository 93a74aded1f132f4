"""The report's training rows and plot carry the selection alignment loss of the stages that train with it."""

import json

from sala.pipeline.report import plot_training, stage_rows


def _log(run, rows):
    run.mkdir(parents=True)
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_stage_rows_and_plot_carry_selection_kl(tmp_path):
    run = tmp_path / "student"
    kls = [2.5, 2.0, 1.0, 4.0, 3.0, 3.0, 2.0, 1.0, 1.0, 1.5, 1.25, 0.75, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 2.0, 0.25]
    recs = [{"stage": "lm4k", "kind": "lm", "global_step": 1, "loss": 3.0, "seconds": 0.2}]
    recs += [{"stage": "long32k", "kind": "lm", "global_step": 2 + i, "loss": 2.9, "seconds": 0.6, "selection_kl": kl}
             for i, kl in enumerate(kls)]
    _log(run, recs)
    stages = [{"name": "lm4k", "batch_size": 4, "seq_len": 4096, "kind": "lm"},
              {"name": "long32k", "batch_size": 1, "seq_len": 32768, "kind": "lm"}]
    rows = {r["stage"]: r for r in stage_rows(run, stages)}
    assert "selection_kl_first_tenth" not in rows["lm4k"]
    # 20 steps: the first and last 2 averaged (one step alone is noisy)
    assert rows["long32k"]["selection_kl_first_tenth"] == 2.25 and rows["long32k"]["selection_kl_last_tenth"] == 1.125
    assert rows["long32k"]["steps"] == 20 and rows["long32k"]["tokens"] == 20 * 32768
    out = plot_training({"student": run}, tmp_path / "training.png")
    assert out is not None and out.stat().st_size > 0
