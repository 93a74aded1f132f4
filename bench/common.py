"""Shared helpers of the GPU benchmarks: timing, result rows, incremental JSON (format: BENCH.md).

Results go under ``$OUT`` when it is set (the device machine returns only that folder), else under
``bench/results``. Every row is written as soon as it exists, so partial results survive a crash or a
timeout.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

COPY_BANDWIDTH = 3.0e12  # bytes/s, device-to-device copy measured on the lent H100 (read + write counted)


class env_override:
    """Temporarily set environment variables (the launch-config overrides read at each call)."""

    def __init__(self, env):
        self.env, self.old = env, {}

    def __enter__(self):
        self.old = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)

    def __exit__(self, *exc):
        for k, v in self.old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def results_dir() -> Path:
    out = os.environ.get("OUT")
    path = Path(out) if out else Path(__file__).parent / "results"
    path.mkdir(parents=True, exist_ok=True)
    return path


def git_commit() -> str:
    """The commit the results belong to: SALA_COMMIT when set (the device machine's copy of the working tree
    reports a stale HEAD: pass the hash in the call's command), else git's HEAD."""
    if os.environ.get("SALA_COMMIT"):
        return os.environ["SALA_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def time_ms(fn, warmup: int = 25, rep: int = 100, grad_to_none=None) -> float:
    """Median milliseconds of ``fn`` over repeats (CUDA events; do_bench flushes L2 before each)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median"))


def kernel_times(fn, n: int = 1, top: int = 14) -> list[tuple[str, float, int]]:
    """(kernel name, device ms per call, launches per call) of ``fn``, the longest first: torch.profiler's CUDA
    time of each kernel, averaged over ``n`` calls after one untimed call (compiles, caches). Unlike a kernel
    timed alone after an L2 flush, it is each kernel's time inside the real sequence of launches."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        ms = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)) / 1000 / n
        if ms > 0:
            rows.append((e.key[:90], round(ms, 4), e.count // n))
    rows.sort(key=lambda r: -r[1])
    return rows[:top]


def measure_copy_bandwidth(nbytes: int = 2**31) -> float:
    """Bytes per second of a device-to-device copy of ``nbytes`` (read + write counted), median of repeats:
    the rate the memory floors of a card should use."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=10, rep=50)
    src = dst = None  # free them (not `del`: the timed lambda reads these names)
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (inf if a has NaN/inf)."""
    a64, b64 = a.double(), b.double()
    if not torch.isfinite(a64).all():
        return float("inf")
    return float((a64 - b64).norm() / b64.norm().clamp_min(1e-30))


class Results:
    """Rows of one benchmark, rewritten to ``<name>.json`` after every ``add``."""

    def __init__(self, name: str, command: str | None = None):
        import triton

        self.name = name
        self.path = results_dir() / f"{name}.json"
        self.data = {
            "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__,
            "triton": triton.__version__,
            "commit": git_commit(),
            "date": datetime.date.today().isoformat(),
            "command": command or "python " + " ".join(sys.argv),
            "rows": [],
        }
        self.flush()

    def add(self, **row) -> dict:
        if row.get("baseline_ms") and row.get("ms"):
            row.setdefault("speedup", round(row["baseline_ms"] / row["ms"], 3))
        self.data["rows"].append(row)
        self.flush()
        print(json.dumps(row), flush=True)
        return row

    def flush(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1))
