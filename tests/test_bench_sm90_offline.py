"""bench/sm90_offline.py compiles the lightning forward's kernels for sm_90 without a GPU and reports what
an SM holds of them: the defaults must stay on wgmma with pipelined loads and no spills."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "sm90_offline.py"), *args], capture_output=True,
                          text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_default_bf16_passes_use_wgmma_pipelined_loads_and_do_not_spill():
    """As launched on an sm_90 GPU (tiles through the TMA unit) and on block pointers (the reverse passes,
    and every pass where there is no TMA unit)."""
    for tma, copies in (("--tma", "tma_copies"), ("--no-tma", "async_copies")):
        rows = {r["kernel"]: r for r in _run("--dtype", "bf16", tma)}
        out, delta = rows["output"], rows["delta"]
        assert (out["C"], out["BV"], out["num_warps"]) == (64, 64, 4)
        assert delta["BV"] == 128  # pass 1 on one 128-wide V block for 16-bit inputs
        for r in (out, delta):
            assert r["wgmma"] >= 1 and r[copies] > 0, r
            assert r["spill_bytes"] == 0 and r["registers"] <= 255, r
            assert r["programs_per_sm"] >= 2, r
            # one warpgroup along the rows: no product held twice (8 warps on 64 rows would)
            assert all(" warps 4x1 " in lay for lay in r["mma_layouts"]), r
        assert out["wgmma"] == 4  # all four products of the output pass
    (default,) = _run("--kernel", "output")
    assert default["tma_copies"] > 0  # the library's GPU default


def test_default_float32_output_pass_is_all_wgmma_two_programs_per_sm():
    """float32 (TF32): 64-token chunks put every product on wgmma; weighting k instead of v drops the transposed k
    copy, so two programs fit an SM (one without it)."""
    (r,) = _run("--kernel", "output", "--dtype", "fp32")
    assert (r["C"], r["BV"], r["num_warps"], r["num_stages"]) == (64, 64, 4, 1), r
    assert r["wgmma"] == 4 and r["mma_sync"] == 0 and r["programs_per_sm"] == 2, r
    (vw,) = _run("--kernel", "output", "--dtype", "fp32", "--no-weight-k")
    assert vw["programs_per_sm"] == 1 and vw["shared_bytes"] > r["shared_bytes"], vw


def test_register_cap_is_applied_and_costs_spills():
    (r,) = _run("--kernel", "output", "--maxnreg", "168", "--stages", "1")
    assert r["maxnreg"] == 168 and r["registers"] <= 168 and r["num_stages"] == 1
    assert r["programs_per_sm"] == 3 and r["spill_bytes"] > 0


def test_infllmv2_stage2_kernels_compile_and_report():
    """InfLLM-V2's per-row rest pass (the forward's main cost at long context) at the release shape: 16 heads
    of a group are the 16 rows of its products (mma.sync, below wgmma's 64), loads pipelined, no spills."""
    (rest,) = _run("--kernel", "infllmv2_rest")
    assert rest["GP"] == 16 and rest["mma_sync"] == 2 and rest["wgmma"] == 0
    assert rest["async_copies"] > 0 and rest["spill_bytes"] == 0 and rest["programs_per_sm"] >= 4
    (per_block,) = _run("--kernel", "infllmv2_forced_per_block")
    assert per_block["RB"] * per_block["GP"] == 128 and per_block["wgmma"] == 2  # 8 rows x 16 heads: on wgmma
    # the default's window in unmasked 128-key tiles: four loops (init blocks, masked / unmasked / masked
    # window parts) of two products each, still without spills, in the 227 KB of an H100's SM
    (forced,) = _run("--kernel", "infllmv2_forced")
    assert forced["wgmma"] == 8 and forced["spill_bytes"] == 0 and forced["shared_bytes"] <= 227 * 1024, forced
    # float32 keeps the per-block window (its 128-key tiles would ask for 320 KB): it fits, without spills
    (f32,) = _run("--kernel", "infllmv2_forced", "--dtype", "fp32")
    assert f32["wgmma"] == 2 and f32["spill_bytes"] == 0 and f32["shared_bytes"] <= 227 * 1024, f32


def test_infllmv2_dkdv_and_stage_one_compile_and_report():
    """dk/dv: 128-lane [lanes, keys] products on wgmma without spills; with dq added inside (the default) one
    product more and its [128, 128] share added in 16-byte atomics. Stage 1's kernels: on wgmma, no spills."""
    (lanes,) = _run("--kernel", "infllmv2_dkdv")
    assert lanes["RB"] * lanes["GP"] == 128 and lanes["spill_bytes"] == 0 and lanes["wgmma"] == 4, lanes
    assert lanes["atomics"] == 0
    (dq,) = _run("--kernel", "infllmv2_dkdv_dq")
    assert dq["wgmma"] == 5 and 0 < dq["atomics"] <= 128 * 128 // 4 // (32 * dq["num_warps"]), dq
    for kernel in ("infllmv2_blockkey", "infllmv2_k2lse"):
        (r,) = _run("--kernel", kernel)
        assert r["wgmma"] >= 1 and r["spill_bytes"] == 0 and r["async_copies"] > 0, r
