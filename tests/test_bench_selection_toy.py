"""bench/selection_toy.py runs end to end on the CPU (a few steps; the real run trains 700)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_selection_toy_runs(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "selection_toy.py"), "--steps", "2", "--seeds", "0", "--weights", "0",
           "1", "--workers", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OUT": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "selection_toy.json").read_text())["rows"]
    assert [(r["seed"], r["weight"]) for r in rows] == [(0, 0.0), (0, 1.0)]
    for r in rows:
        assert 0.0 <= r["acc_sparse"] <= 1.0 and 0.0 <= r["acc_dense"] <= 1.0
        assert set(r["needle_selected"]) == {"layer1", "layer3"} and all(len(v) == 2 for v in r["needle_selected"].values())
    assert "selection_kl_first_last" not in rows[0] and rows[1]["selection_kl_first_last"][0] > 0
