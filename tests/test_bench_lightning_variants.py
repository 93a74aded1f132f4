"""bench/lightning.py's candidate variants name launch settings the library accepts and applies (a typo in an
environment variable would time the default under another name)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import lightning as bench  # noqa: E402

from sala.ops import lightning_triton as lt  # noqa: E402

KNOWN = {"SALA_LIGHTNING_CHUNK": "C", "SALA_LIGHTNING_BV": "BV", "SALA_LIGHTNING_WARPS": "num_warps",
         "SALA_LIGHTNING_STAGES": "num_stages", "SALA_LIGHTNING_MAXNREG": "maxnreg",
         "SALA_LIGHTNING_DELTA_CHUNK": "C", "SALA_LIGHTNING_DELTA_BV": "BV", "SALA_LIGHTNING_DELTA_WARPS": "num_warps",
         "SALA_LIGHTNING_SAVED_STATES_SHARE": None, "SALA_LIGHTNING_TMA": "tma", "SALA_LIGHTNING_DELTA_TMA": "tma",
         "SALA_LIGHTNING_SCAN_BK": "scan", "SALA_LIGHTNING_DELTA_STAGES": "num_stages",
         "SALA_LIGHTNING_WEIGHT_K": "weight_k", "SALA_LIGHTNING_SEG": "seg"}


@pytest.mark.parametrize("key,entry", [(k, e) for k, entries in bench.VARIANTS.items() for e in entries],
                         ids=lambda x: x[0] if isinstance(x, tuple) and isinstance(x[0], str) else None)
def test_variant_settings_reach_the_launch(key, entry, monkeypatch):
    _, dtype, _ = key
    name, kw, env = entry
    assert not kw or set(kw) <= {"precision", "segment_len"}, name
    assert set(env) <= set(KNOWN), f"{name}: unknown setting {set(env) - set(KNOWN)}"
    monkeypatch.setattr(lt, "_INTERPRET", False)  # the GPU's launch options
    with bench.env_override(env):
        out = lt._launch_cfg(128, dtype, "tf32")
        one = lt._launch_cfg(128, dtype, "tf32", pass_one=True)
    for var, value in env.items():
        field = KNOWN[var]
        if field is None:
            continue
        if field == "scan":  # read by the scan launch itself
            from sala.ops import lightning_triton_kernels as kn

            seen = {}

            class RecordLaunch:  # kernel[grid](...) records the launch's keywords instead of running
                def __getitem__(self, grid):
                    return lambda *a, **kw: seen.update(kw)

            monkeypatch.setattr(kn, "_segment_scan_kernel", RecordLaunch())
            with bench.env_override(env):
                lt.scan_segments(torch.zeros(1, 4, 128, 128), torch.zeros(4), lt._Plan([64], 64, (None,) * 5, 1),
                                 None, None)
            assert seen["BK"] == int(value), (name, var)
            continue
        if field == "seg":  # the segment rule, read by the plan
            with bench.env_override(env):
                assert lt.choose_segment_len(131072, 32, dtype) == int(value), (name, var)
            continue
        if field == "weight_k":  # read where the output pass launches
            with bench.env_override(env):
                assert lt.weight_k_wanted(dtype, "tf32") == (value == "1"), (name, var)
            continue
        if field == "tma":  # read where the pass launches (under the interpreter, which has no device to ask)
            monkeypatch.setattr(lt, "_INTERPRET", True)
            with bench.env_override(env):
                common = lt._common(lt._Plan([128], 64, (), 1), 4, 128, 128, dtype, "tf32", False,
                                    pass_one="DELTA" in var)
                assert lt._use_tma(common, None, pass_one="DELTA" in var) == (value == "1"), (name, var)
            monkeypatch.setattr(lt, "_INTERPRET", False)
            continue
        cfg = one if "DELTA" in var else out
        want = min(int(value), 128) if field == "BV" else int(value)  # a V block never wider than the head dim
        assert cfg[field] == want, (name, var, cfg)
