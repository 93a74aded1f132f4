import json

from sala.eval.report import depth_table, fmt_len, task_table, write_report


def _results():
    tasks = []
    for m, base in (("dense", 90.0), ("hybrid", 70.0)):
        for t in ("passkey", "vt"):
            for i, L in enumerate((1024, 4096)):
                samples = [{"depths": [0.0], "score": 1.0}, {"depths": [1.0, 0.3], "score": 0.5 if t == "vt" else 0.0}]
                tasks.append({"model": m, "task": t, "length": L, "score": base - 10 * i - (5 if t == "vt" else 0),
                              "n_samples": 2, "samples": samples})
    ppl = [{"model": m, "length": L, "ppl": p, "nll_per_token": 1.0, "scored_tokens": 10, "windows": 2}
           for m, p0 in (("dense", 20.0), ("hybrid", 25.0)) for L, p in ((1024, p0), (4096, p0 - 1))]
    speed = [{"model": m, "length": L, "ttft_s": 0.1 * L / 1024, "decode_tokens_per_s": 50.0, "decode_tokens": 8,
              "peak_memory_bytes": 2**30, "memory_kind": "cpu_peak_rss", "baseline_memory_bytes": 2**29, "repeats": 1}
             for m in ("dense", "hybrid") for L in (1024, 4096)]
    return {"meta": {"seed": 1, "samples": 2}, "skipped": ["hybrid: speed at 1M tokens: out of memory"],
            "models": [{"name": "dense", "class": "LlamaForCausalLM", "params": 1e6, "path": "/x", "random_init": False},
                       {"name": "hybrid", "class": "SALAForCausalLM", "params": 2e6, "path": "/y", "random_init": True}],
            "tasks": tasks, "perplexity": ppl, "speed": speed}


def test_task_table_averages_per_model_and_length():
    lengths, table = task_table(_results())
    assert lengths == [1024, 4096]
    assert table[("dense", "average")] == {1024: 87.5, 4096: 77.5}
    assert table[("hybrid", "vt")][4096] == 55.0


def test_write_report_files(tmp_path):
    paths = write_report(_results(), tmp_path)
    assert set(paths) == {"json", "markdown", "accuracy", "perplexity", "speed"}
    for k in ("accuracy", "perplexity", "speed"):
        assert paths[k].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[k].stat().st_size > 5000
    assert json.loads(paths["json"].read_text())["tasks"][0]["model"] == "dense"
    md = paths["markdown"].read_text()
    assert "| dense | **average** | 87.5 | 77.5 |" in md
    assert "| hybrid | 25.00 | 24.00 |" in md
    assert "random weights" in md and "out of memory" in md
    assert "![accuracy vs length](accuracy_vs_length.png)" in md
    assert "| dense | 1.00 | 25 | 25 |" in md


def test_report_without_sections(tmp_path):
    r = _results()
    r["tasks"], r["speed"] = [], []
    paths = write_report(r, tmp_path)
    assert "accuracy" not in paths and "speed" not in paths and "perplexity" in paths
    assert "Task accuracy" not in paths["markdown"].read_text()


def test_fmt_len():
    assert [fmt_len(n) for n in (1000, 1024, 4096, 131072, 1 << 20)] == ["1000", "1K", "4K", "128K", "1M"]


def test_depth_table_pools_needle_tasks_by_first_needle_depth():
    d = depth_table(_results())
    assert d["dense"][0.0] == {1024: 100.0, 4096: 100.0}
    assert d["hybrid"][1.0] == {1024: 25.0, 4096: 25.0}  # passkey 0 and vt 0.5 at depth 1.0
