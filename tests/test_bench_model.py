"""bench/model.py runs end to end at toy sizes on the CPU: both models, the baseline ratio, the cache bytes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_model_bench_with_dense_baseline_on_cpu(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "model.py"), "--tiny", "--device", "cpu", "--layers", "4",
           "--lengths", "300", "700", "--decode", "3", "--chunk", "256", "--baseline", "qwen3-8b", "--decode-graphs", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "model.json").read_text())["rows"]
    assert [(r["variant"], r["case"]) for r in rows] == [
        ("dense-qwen3-8b", "ttft_T300"), ("dense-qwen3-8b", "ttft_T700"), ("sala", "ttft_T300"),
        ("sala-graphs", "ttft_T300"), ("sala", "ttft_T700"), ("sala-graphs", "ttft_T700")]
    dense = {r["case"]: r for r in rows if r["variant"] == "dense-qwen3-8b"}
    for r in rows:
        assert r["ms"] > 0 and r["decode_ms_per_token"] > 0 and r["decode_step_ms_median"] > 0
        if r["variant"] == "sala":
            assert r["baseline"] == "dense-qwen3-8b" and r["baseline_ms"] == dense[r["case"]]["ms"]
            assert abs(r["speedup"] - r["baseline_ms"] / r["ms"]) < 1e-9
        if r["variant"] == "sala-graphs":  # the CPU runs the graphs' plumbing through the eager backend
            assert r["correct"] is True and r["graphs"] == 1  # 4 layers: sparse, lightning x 2, sparse
    # the dense cache holds K/V of prompt + 4 untimed + 3 timed steps: 4 layers x 2 heads x 16 x (K, V) x fp32
    for T in (300, 700):
        assert round(dense[f"ttft_T{T}"]["cache_gib"] * 2**30) == (T + 7) * 4 * 2 * 16 * 2 * 4
    assert "sala-graphs" in done.stdout
