"""bench/train_step.py runs end to end at toy sizes on the CPU: dense baseline, student and its variants."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_step_bench_on_cpu(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "train_step.py"), "--tiny", "--device", "cpu", "--steps", "1",
           "--cases", "distill", "long32k", "--fuse", "--union", "16", "--selection", "1.0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OUT": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "train_step.json").read_text())["rows"]
    assert [(r["case"], r["variant"]) for r in rows] == [
        (f"step_{c}_2x128", v) for c in ("distill", "long32k")
        for v in ("dense_llama", "sala", "sala-full-logits", "sala-fused")] + [
        ("step_long32k_2x128", "sala-union16"), ("step_long32k_2x128", "sala-union16-selection")]
    for r in rows:
        assert r["ms"] > 0 and r["tokens_per_s"] > 0
        assert r["profile"]["kernel_launches"] > 0 and r["profile"]["top"]
    for r in rows[5:]:
        assert r["sparse"] is True
    for r in rows[1:4] + rows[5:]:
        base = rows[0 if "distill" in r["case"] else 4]["ms"]
        assert r["baseline_ms"] == base and abs(r["speedup"] - base / r["ms"]) < 1e-3  # rounded to 3 places


def test_train_step_bench_with_a_trained_student_on_cpu(tmp_path):
    """--student: the student variants run a saved SALA checkpoint on held-out corpus text (here a random tiny
    checkpoint and the test corpus; on the GPU the pipeline's trained student)."""
    ckpt = tmp_path / "student"
    subprocess.run([sys.executable, "-m", "sala.cli", "init-random", "--out", str(ckpt)], check=True,
                   capture_output=True, text=True, timeout=300)
    cmd = [sys.executable, str(ROOT / "bench" / "train_step.py"), "--tiny", "--device", "cpu", "--steps", "1",
           "--cases", "long32k", "--no-profile", "--student", str(ckpt),
           "--text", str(ROOT / "tests" / "eval" / "data" / "shakespeare_excerpt.txt")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OUT": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "train_step.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["dense_llama", "sala", "sala-full-logits"]
    assert rows[0]["student"] is None and all(r["student"] == str(ckpt) and r["ms"] > 0 for r in rows[1:])
