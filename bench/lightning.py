"""Lightning attention on one GPU: sala's Triton kernels vs fla ``chunk_simple_gla`` (same ``g_gamma``)
vs the PyTorch reference. Checks correctness and times, in one run, on one card.

    python bench/lightning.py            # full run (writes lightning.json under $OUT or bench/results)
    python bench/lightning.py --quick    # small sizes only
    python bench/lightning.py --headline --no-sweep --budget-s 120   # the issue's rows + variants, ~2 min
    python bench/lightning.py --report bench/results/lightning.json   # (re)write lightning.md from a JSON

Results MERGE with the committed ``bench/results/lightning.json``: a row measured in this run replaces the
row of the same (case, variant); older rows are kept and each row names the run (commit, card, date) that
measured it. The merged JSON and markdown are rewritten after every row (a run cut short keeps its rows).

Variants (rows with ``variant`` other than "sala") are timed side by side with the library default and fla
in the same job, e.g. ``sala-bf16x3`` (float32 products as three bf16 products) or ``sala-seg8192``.

Correctness at long T without an O(T) reference run: every decay is at most exp(-2^-8) per step, so after
8192 steps a state has shrunk by exp(-32) ~ 1e-14. The reference run on the 12288 tokens ending at a
window's end, from a zero state, is therefore exact (to float32) on the window's last 4096 outputs. Windows:
the start, the end (plus the final state), and around token 524288 where B*T*H*D crosses 2^31 (H=32, D=128).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import (COPY_BANDWIDTH, Results, env_override, kernel_times, measure_copy_bandwidth, rel_err,  # noqa: E402
                    time_ms)

COMMITTED = Path(__file__).resolve().parent / "results" / "lightning.json"

H, D = 32, 128
BOUNDARY = 2**31 // (H * D)  # token where B*T*H*D passes 2^31 (B=1): 524288
TOL = {torch.float32: 5e-3, torch.bfloat16: 2e-2}
DT_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16"}
HEADLINE = ["fwd_bf16_T131072", "fwd_fp32_T131072", "fwd_bf16_T1048576", "fwdbwd_bf16_T131072", "fwd_bf16_varlen",
            "decode_b1_24layers"]


def free():
    gc.collect()
    torch.cuda.empty_cache()


def rand(shape, dtype, requires_grad=False):
    return torch.randn(shape, device="cuda", dtype=torch.float32).to(dtype).requires_grad_(requires_grad)


def floor_ms(nbytes: int) -> float:
    return nbytes / COPY_BANDWIDTH * 1e3


# rows committed before rows carried their run: the decode rows came from a later call (lightning.md)
_LEGACY_RUNS = {"decode_b1": {"commit": "7edae91"}, "decode_b1_24layers": {"commit": "7edae91"}}


class MergedResults(Results):
    """Results that keep the committed rows of earlier runs: a (case, variant) measured now replaces the
    old row; every row carries ``run`` = the commit, card and date that measured it. The markdown is
    rewritten with the JSON after every row."""

    def __init__(self, name: str, previous: Path = COMMITTED):
        self.old_rows, self.previous_runs, self.old_notes = [], [], []
        if previous.exists():
            old = json.loads(previous.read_text())
            stamp = {k: old.get(k) for k in ("commit", "card", "date")}
            stamp["commit"] = (stamp["commit"] or "")[:12]
            for r in old.get("rows", []):
                r.setdefault("run", dict(stamp, **_LEGACY_RUNS.get(r["case"], {})))
                self.old_rows.append(r)
            self.previous_runs = old.get("previous_runs", []) + [
                {k: old.get(k) for k in ("commit", "card", "date", "command", "torch", "triton")}]
            self.old_notes = old.get("run_notes", [])
        self.new_rows = []
        super().__init__(name)
        self.stamp = {"commit": self.data["commit"][:12], "card": self.data["card"], "date": self.data["date"]}

    def add(self, **row) -> dict:
        if "error" in row:  # a failed or skipped job replaces nothing: note it, keep the old row
            self.data.setdefault("errors", []).append(row)
            self.flush()
            print(json.dumps(row), flush=True)
            return row
        if row.get("baseline_ms") and row.get("ms"):
            row.setdefault("speedup", round(row["baseline_ms"] / row["ms"], 3))
        prev = [r for r in self.old_rows if r["case"] == row["case"] and r.get("variant", "sala") == "sala"]
        if prev and prev[0].get("ms"):  # same case in the committed results: how this card/run compares
            row["previous"] = {"ms": prev[0]["ms"], "baseline_ms": prev[0].get("baseline_ms"), "run": prev[0]["run"]}
        if FLA_TUNE:
            row.setdefault("fla_autotune", FLA_TUNE)
        row["run"] = self.stamp
        self.new_rows.append(row)
        self.flush()
        print(json.dumps(row), flush=True)
        return row

    def flush(self) -> None:
        if not hasattr(self, "new_rows"):
            return  # Results.__init__ flushes before the rows exist
        fresh = {(r["case"], r.get("variant")) for r in self.new_rows}
        kept = [r for r in self.old_rows if (r["case"], r.get("variant")) not in fresh]
        self.data["rows"] = kept + self.new_rows
        self.data["previous_runs"] = self.previous_runs
        self.data["run_notes"] = self.old_notes
        super().flush()
        write_report(self.path, self.path.with_suffix(".md"))


# ----------------------------------------------------------------------------------------------- checks
def windowed_errors(o, ht, q, k, v, g, scale, reference) -> dict:
    """Relative errors of (o, final state) against the reference on exact windows (module doc), by window:
    the first 4096 tokens, the 4096 ending at token 526336 (straddles element 2^31 when H*D = 4096), the
    last 4096, and the final state."""
    T = q.shape[1]
    if T <= 16384:
        ro, rh = reference(q.float(), k.float(), v.float(), g, scale)
        errs = {"all": rel_err(o.float(), ro)}
        if ht is not None:
            errs["state"] = rel_err(ht.float(), rh)
        return errs
    ro, _ = reference(q[:, :4096].float(), k[:, :4096].float(), v[:, :4096].float(), g, scale)
    errs = {"start": rel_err(o[:, :4096].float(), ro)}
    ends = {"end": T}
    if 12288 <= BOUNDARY + 2048 < T:
        ends["at_2^31"] = BOUNDARY + 2048
    for name, end in ends.items():
        s = end - 12288
        ro, rh = reference(q[:, s:end].float(), k[:, s:end].float(), v[:, s:end].float(), g, scale)
        errs[name] = rel_err(o[:, end - 4096:end].float(), ro[:, -4096:])
        if end == T and ht is not None:
            errs["state"] = rel_err(ht.float(), rh)
    return errs


def windowed_error(o, ht, q, k, v, g, scale, reference) -> float:
    return max(windowed_errors(o, ht, q, k, v, g, scale, reference).values())


def windowed_grad_error(grads, q, k, v, do, g, scale, reference_lightning) -> float:
    """Gradients against reference autograd (float32) on the last 12288 tokens: dk, dv there depend only on
    later tokens (all inside the window), dq on earlier ones (exact on the window's last 4096, module doc)."""
    W = min(12288, q.shape[1])
    leaves = [x[:, -W:].detach().float().requires_grad_(True) for x in (q, k, v)]
    ro, _ = reference_lightning(*leaves, g, scale)
    ro.backward(do[:, -W:].float())
    dq, dk, dv = (x.grad for x in leaves)
    n = 4096 if W == 12288 else W
    errs = [rel_err(grads[0][:, -n:].float(), dq[:, -n:]), rel_err(grads[1][:, -W:].float(), dk),
            rel_err(grads[2][:, -W:].float(), dv)]
    return max(errs)


# ------------------------------------------------------------------------------------------- callables
FLA_TUNE: dict = {}  # how fla's autotuners were set up in this run (recorded in rows)


def _autotuner(obj):
    from triton.runtime.autotuner import Autotuner

    while obj is not None and not isinstance(obj, Autotuner):
        obj = getattr(obj, "fn", None)
    return obj


# which fla configs survive each --fla-tune level (state kernels; backward output kernels)
_FLA_KEEP = {
    "reduced": (lambda c, bk: c.num_warps in (4, 8) and c.num_stages in (2, 3), lambda c, bk: True),
    "min": (lambda c, bk: c.kwargs.get("BK") == bk and c.num_warps in (4, 8) and c.num_stages == 2,
            lambda c, bk: c.num_warps == 4 and c.num_stages in (2, 3)),
}


def reduce_fla_autotune(level: str) -> dict:
    """Shrink fla's autotune spaces so a short device call can measure the baseline: the state kernels
    (chunk_fwd_h / chunk_bwd_dh) have 48 configs each, tuned again for every dtype, ~1 s of compile per
    config. reduced: num_warps {4, 8} x num_stages {2, 3} (16); min: largest BK (64 on H100), both BV, num_warps {4, 8},
    2 stages (4), and 2 configs for the backward output kernels. Rows carry ``previous`` (the committed
    full-autotune fla time of the same case) to show whether the smaller space cost fla speed."""
    import fla.ops.common.chunk_h as chunk_h
    import fla.ops.common.chunk_o as chunk_o

    keep_h, keep_o = _FLA_KEEP[level]
    kept = {}
    for mod, name, keep in [(chunk_h, "chunk_fwd_kernel_h", keep_h), (chunk_h, "chunk_bwd_kernel_dh", keep_h),
                            (chunk_o, "chunk_bwd_kernel_dqkwg", keep_o), (chunk_o, "chunk_bwd_kernel_dv", keep_o)]:
        tuner = _autotuner(getattr(mod, name, None))
        if tuner is None:
            continue
        full = len(tuner.configs)
        bk = max(c.kwargs.get("BK", 0) for c in tuner.configs)  # 64 on an H100 (fla's BKV_LIST)
        sub = [c for c in tuner.configs if keep(c, bk)]
        if sub:
            tuner.configs = sub
        if len(tuner.configs) != full:
            kept[name] = f"{len(tuner.configs)} of {full} configs"
    return kept


def fla_chosen_configs() -> dict:
    """The configs fla's state-kernel autotuners picked so far (key -> config), for the record."""
    try:
        import fla.ops.common.chunk_h as chunk_h
    except Exception:
        return {}
    out = {}
    for name in ("chunk_fwd_kernel_h", "chunk_bwd_kernel_dh"):
        tuner = _autotuner(getattr(chunk_h, name, None))
        if tuner is not None:
            for key, cfg in getattr(tuner, "cache", {}).items():
                out[f"{name}{list(key)[-4:]}"] = str(cfg)
    return out


def make_ops():
    from sala.ops.lightning_reference import lightning_attn_chunked
    from sala.ops.lightning_triton import lightning_attn_triton

    def ours(q, k, v, g, scale, cu=None, out_dtype=None, **kw):
        return lightning_attn_triton(q, k, v, g, scale, cu_seqlens=cu, out_dtype=out_dtype or q.dtype, **kw)

    def reference(q, k, v, g, scale, cu=None):
        return lightning_attn_chunked(q, k, v, g, scale, cu_seqlens=cu)

    try:
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla

        def fla(q, k, v, g, scale, cu=None):
            return chunk_simple_gla(q, k, v, g_gamma=g, scale=scale, output_final_state=True, cu_seqlens=cu)

        def fla_decode(q, k, v, g, scale, state):
            return fused_recurrent_simple_gla(q[:, None], k[:, None], v[:, None], g_gamma=g, scale=scale,
                                              initial_state=state, output_final_state=True)
    except Exception as exc:  # fla missing: still time ours against the reference
        print("fla unavailable:", repr(exc), flush=True)
        fla = fla_decode = None
    return ours, reference, fla, fla_decode


# ------------------------------------------------------------------------------------------- variants
# Candidate settings timed beside the library default (variant "sala") in the same job; the default only
# changes after a measurement. kw go to lightning_attn_triton, env overrides the launch config.
BLOCKPTR = ("sala-blockptr", {}, {"SALA_LIGHTNING_TMA": "0", "SALA_LIGHTNING_DELTA_TMA": "0"})
# float32's output passes as they were before cf76c0a: 32-token chunks, two stages, the state update on weighted v
F32_C32 = ("sala-f32-c32-s2", {}, {"SALA_LIGHTNING_CHUNK": "32", "SALA_LIGHTNING_STAGES": "2",
                                   "SALA_LIGHTNING_WEIGHT_K": "0"})
VARIANTS = {
    # bf16 at 128K on the H200, all slower than the default then and removed: 4096-token segments, BV 128 and 8
    # warps in both passes (ae88ccb: 2.509 / 2.742 against 2.402 ms); the output pass on V block 128 / 8 warps /
    # 3 stages / 1 stage / V block 32, 32-token chunks (b031d6c: 2.37 / 3.84 / 2.47 / 2.56 / 3.08 / 3.11 against
    # 2.14-2.23 ms); the three passes chained in one launch, segments 256-2048 (7342d29: 2.58 ms at best
    # against 2.38); the output pass on one stage capped at 168 / 160 registers (three programs per SM, spills),
    # 128-token chunks on 8 warps in the output pass / both passes / pass 1 (4e662a4: 2.89 / 3.17 / 2.80 / 2.96 /
    # 2.35 against 2.19 ms; at 1M the first and the 128-token output pass 22.0 / 22.5 against 18.0 ms). Pass 1
    # on one 128-wide V block won (2.14 against 2.42 ms) and is the default since; its old setting stays as the
    # same-run reference, as do block pointers for the TMA tiles.
    # Pass 2 on 16-row K blocks (256 programs instead of 128 at H=32) changed nothing once its loads ran ahead
    # (87effea: 2.083 / 17.15 ms against 2.031 / 17.21 at 128K / 1M; pass 2 0.016 / 0.150 ms either way): removed.
    # The output pass asking L2 for the next chunk's tiles at the top of each chunk (PTX prefetch.global.L2;
    # offline, Triton issues each chunk's loads at the end of the chunk before): slower at 12a4455, 2.174 / 17.45
    # against 2.114 / 16.99 ms at 128K / 1M, float32 8.55 against 5.85 (576 B spilled). Removed.
    ("fwd", torch.bfloat16, 131072): [("sala-delta-bv64", {}, {"SALA_LIGHTNING_DELTA_BV": "64"}), BLOCKPTR],
    # 16384-token segments at 1M (half the segment states written, scanned and read) beat 8192 in two runs (f08c018:
    # 16.66 / 16.65 vs 16.77 / 16.81 ms) and are the default since; 8192 stays as the same-run reference
    ("fwd", torch.bfloat16, 1048576): [BLOCKPTR, ("sala-seg8192", {}, {"SALA_LIGHTNING_SEG": "8192"})],
    # float32 at 128K, measured on the H200 (ae88ccb) against the default's 9.00 ms (TF32, 32-token chunks, 4
    # warps): bf16x3 4w 15.52 / 8w 11.84, TF32 C64 8w 12.71, C64 8w 1 stage 10.58, k-major tiles C64 BV32 18.64,
    # k-major C64 8w 1 stage 13.17, chained segments 512 / 1024 9.50 / 9.30 ms; 64-token chunks with every product
    # on wgmma (V block 32, 8 warps, one stage, no spills offline) 15.68 against 8.99 ms (4e662a4). All removed.
    # The default since cf76c0a: output passes on 64-token chunks (every product on wgmma), one stage, the state
    # update on decay-weighted k (no transposed k copy: two programs per SM), 6.12 ms against the 32-token chunks'
    # 8.79 (kept below as the same-run reference); at V block 32 16.25 without weighted k, 8.10 with. Candidates:
    # pass 1 on one 128-wide V block (k read once; offline 214 registers on 4 warps / 126 on 8, 64 KB, two programs
    # per SM): 6.44 / 6.34 ms (4 / 8 warps) against 6.10, removed; 8192-token segments (half the programs and
    # states) beat 4096 in two runs (5.94 / 5.84 vs 6.10 / 5.92 ms) and are the default since (4096: the reference).
    # Pass 1 of float32 (1.69 ms at 12a4455 against a 1.0 ms floor for reading k and v): 1024 programs at three
    # per SM fill 2.6 waves of an H200's 132 SMs (the third 60% full). Candidates (offline sm_90): 64-token
    # chunks, two per SM (160 registers, 98 KB): 3.9 waves; V block 32, four per SM (105 registers, 41 KB):
    # 3.9 waves, k read four times (L2). Not yet timed.
    ("fwd", torch.float32, 131072): [BLOCKPTR, F32_C32,
                                     ("sala-f32-seg4096", {}, {"SALA_LIGHTNING_SEG": "4096"}),
                                     ("sala-f32-delta-c64", {}, {"SALA_LIGHTNING_DELTA_CHUNK": "64"}),
                                     ("sala-f32-delta-bv32", {}, {"SALA_LIGHTNING_DELTA_BV": "32"})],
    ("fwdbwd", torch.float32, 131072): [F32_C32],
    # the backward recomputing dq's segment states (one state pass more) instead of reusing the forward's
    ("fwdbwd", torch.bfloat16, 131072): [("sala-states-recomputed", {}, {"SALA_LIGHTNING_SAVED_STATES_SHARE": "0"}),
                                         ("sala-delta-bv64", {}, {"SALA_LIGHTNING_DELTA_BV": "64"}), BLOCKPTR],
    # other fwd+bwd variants cost ~6 more compiles each: add entries once a forward variant wins
}


def bind(fn, env, **kw):
    """fn with extra keywords, run under the variant's environment."""

    def call(*a, **k):
        with env_override(env):
            return fn(*a, **kw, **k)

    return call


# ---------------------------------------------------------------------------------------------- cases
def pass_times(q, k, v, g, scale, rep: int) -> dict:
    """The default forward's launches timed apart: passes 1-2 (segment states from k and v) and pass 3
    (outputs from q, k, v and the states), each with its share of the memory floor's bytes."""
    from sala.ops import lightning_triton as lt

    g32 = g.to(device=q.device, dtype=torch.float32).contiguous()
    plan = lt._plan(q, None, None)
    states, _ = lt.segment_states(k, v, g32, plan)
    states_ms = time_ms(lambda: lt.segment_states(k, v, g32, plan), rep=rep)
    out_ms = time_ms(lambda: lt.segment_outputs(q, k, v, g32, states, plan, scale, out_dtype=q.dtype), rep=rep)
    # each launch's time inside one forward (profiler). Not pass 2 timed alone: after do_bench's L2 flush it reads
    # the deltas from DRAM where the forward finds them in L2 (0.31 / 2.43 ms alone at 128K / 1M, 0.08 / 0.92 ms
    # inside the forward, before its loads ran ahead; cf76c0a and 09c75c5 on an H200)
    kernels = kernel_times(lambda: lt.lightning_forward(q, k, v, g32, scale, out_dtype=q.dtype), n=3, top=6)
    tensor = q.numel() * q.element_size()
    return {"segment": plan.seg, "states_ms": states_ms, "outputs_ms": out_ms, "kernels_ms": kernels,
            "states_floor_ms": floor_ms(2 * tensor), "outputs_floor_ms": floor_ms(4 * tensor)}


def run_forward(res, ops, dtype, T, g, scale, time_reference):
    ours, reference, fla, _ = ops
    case = f"fwd_{DT_NAME[dtype]}_T{T}"
    q, k, v = (rand((1, T, H, D), dtype) for _ in range(3))
    size = q.element_size()
    rep = 100 if T <= 131072 else 200
    base = dict(case=case, baseline="fla.chunk_simple_gla", floor_ms=floor_ms(4 * T * H * D * size))
    notes, fla_ms, fla_err = [], None, None
    if fla is not None:
        try:
            fo, fh = fla(q, k, v, g, scale)
            torch.cuda.synchronize()
            fla_err = windowed_error(fo, fh, q, k, v, g, scale, reference)
            del fo, fh
            free()
            if fla_err < TOL[dtype]:
                fla_ms = time_ms(lambda: fla(q, k, v, g, scale), rep=rep)
            else:
                notes.append(f"fla output WRONG (rel err {fla_err:.3g} vs reference windows); not timed")
        except Exception as exc:
            notes.append(f"fla failed: {type(exc).__name__}: {str(exc)[:200]}")
            free()
    ref_ms = time_ms(lambda: reference(q, k, v, g, scale), warmup=3, rep=20) if time_reference else None
    rows = []
    for name, kw, env in [("sala", {}, {})] + VARIANTS.get(("fwd", dtype, T), []):
        fn = bind(ours, env, **kw)
        row = dict(base, variant=name, baseline_ms=fla_ms, fla_rel_err=fla_err, settings={**kw, **env})
        try:
            o, ht = fn(q, k, v, g, scale)
            torch.cuda.synchronize()
            errs = windowed_errors(o, ht, q, k, v, g, scale, reference)
            del o, ht
            free()
            row["ms"] = time_ms(lambda: fn(q, k, v, g, scale), rep=rep)
            err = max(errs.values())
            row.update(correct=err < TOL[dtype], max_rel_err=err, window_errs=errs, floor_frac=row["floor_ms"] / row["ms"])
            if ref_ms is not None and name == "sala":
                row["reference_ms"] = ref_ms
            if T >= 131072 and not kw:  # the default kernels (under the variant's launch settings)
                with env_override(env):
                    row["pass_ms"] = pass_times(q, k, v, g, scale, rep)
            row["note"] = "; ".join(notes)
            rows.append(res.add(**row))
        except Exception as exc:
            traceback.print_exc()
            res.add(case=case, variant=name, error=f"{type(exc).__name__}: {str(exc)[:300]}")
            free()
    q = k = v = None  # free the inputs (not `del`: the timed lambdas above read these names)
    free()
    return rows


def run_fwdbwd(res, ops, dtype, T, g, scale):
    from sala.ops.lightning_reference import lightning_attn_chunked

    ours, reference, fla, _ = ops
    case = f"fwdbwd_{DT_NAME[dtype]}_T{T}"
    q, k, v = (rand((1, T, H, D), dtype, True) for _ in range(3))
    do = rand((1, T, H, D), dtype)
    size = q.element_size()
    base = dict(case=case, baseline="fla.chunk_simple_gla", floor_ms=floor_ms(11 * T * H * D * size))

    def step(fn, env=None):
        with env_override(env or {}):  # the backward's passes read the launch overrides too
            o, _ = fn(q, k, v, g, scale)
            o.backward(do)

    def grads(fn, env=None):
        for x in (q, k, v):  # timing loops leave their last grads behind: never accumulate onto them
            x.grad = None
        step(fn, env)
        out = [x.grad.detach().clone() for x in (q, k, v)]
        for x in (q, k, v):
            x.grad = None
        return out

    notes, fla_ms, fla_g = [], None, None
    if fla is not None:
        try:
            fla_g = grads(fla)
            fla_ms = time_ms(lambda: step(fla), grad_to_none=[q, k, v])
        except Exception as exc:
            notes.append(f"fla failed: {type(exc).__name__}: {str(exc)[:200]}")
            fla_g = None
        free()
    fla_ref_err = None
    if fla_g is not None:
        fla_ref_err = windowed_grad_error(fla_g, q, k, v, do, g, scale, lightning_attn_chunked)
    rows = []
    for name, kw, env in [("sala", {}, {})] + VARIANTS.get(("fwdbwd", dtype, T), []):
        fn = bind(ours, {}, **kw)
        row = dict(base, variant=name, baseline_ms=fla_ms, settings={**kw, **env})
        try:
            ours_g = grads(fn, env)
            # reference autograd on the exact window (module doc); float32 leaves
            err = windowed_grad_error(ours_g, q, k, v, do, g, scale, lightning_attn_chunked)
            row_notes = list(notes) + [f"grads vs reference autograd on the last {min(12288, T)} tokens"]
            if fla_g is not None:
                row["grad_rel_diff_vs_fla"] = max(rel_err(a.float(), b.float()) for a, b in zip(ours_g, fla_g))
                row["fla_grad_rel_err"] = fla_ref_err
            del ours_g
            free()
            row["ms"] = time_ms(lambda: step(fn, env), grad_to_none=[q, k, v])
            row.update(correct=err < TOL[dtype], max_rel_err=err, floor_frac=row["floor_ms"] / row["ms"],
                       note="; ".join(row_notes))
            rows.append(res.add(**row))
        except Exception as exc:
            traceback.print_exc()
            res.add(case=case, variant=name, error=f"{type(exc).__name__}: {str(exc)[:300]}")
        free()
    q = k = v = do = fla_g = None  # free them (the timed lambdas above read these names)
    free()
    return rows


def run_int64(res, ops, T=1048576):
    """Offsets past 2^31 elements (B*T*H*D = 2^32 at T=1M, H=32, D=128), forward AND reverse (the reverse
    pass is what the backward runs): exact windows at the start, across element 2^31 and at the end."""
    from sala.ops.lightning_reference import lightning_attn_chunked, lightning_decay
    from sala.ops.lightning_triton import lightning_forward

    g = lightning_decay(H).cuda()
    scale = D**-0.5
    q, k, v = (rand((1, T, H, D), torch.bfloat16) for _ in range(3))
    errs = {}
    t0 = time.monotonic()
    o, ht = lightning_forward(q, k, v, g, scale, out_dtype=torch.bfloat16)
    torch.cuda.synchronize()
    errs.update({f"fwd_{n}": e for n, e in windowed_errors(o, ht, q, k, v, g, scale, lightning_attn_chunked).items()})
    del o, ht
    free()
    o, ht = lightning_forward(q, k, v, g, scale, out_dtype=torch.bfloat16, reverse=True)
    torch.cuda.synchronize()

    def flip(x):
        return x.flip(1)

    # reversed time: the output at token t sums tokens u >= t weighted exp(g (u - t)), so the reference run
    # from a zero state over tokens [s, e + 8192) back to front is exact on [s, e) (module doc)
    for name, (s, e) in {"rev_end_tokens": (T - 4096, T), "rev_at_2^31": (BOUNDARY - 2048, BOUNDARY + 2048),
                         "rev_first_tokens": (0, 4096)}.items():
        hi = min(T, e + 8192)
        ro, rh = lightning_attn_chunked(*(flip(x[:, s:hi]).float() for x in (q, k, v)), g, scale)
        errs[name] = rel_err(o[:, s:e].float(), flip(ro)[:, : e - s])
        if s == 0:
            errs["rev_state"] = rel_err(ht.float(), rh)
    err = max(errs.values())
    res.add(case="int64_offsets_bf16_T1048576", variant="sala", correct=err < TOL[torch.bfloat16], max_rel_err=err,
            window_errs=errs, check_s=round(time.monotonic() - t0, 1),
            note="B*T*H*D = 2^32: forward and reverse (backward) passes vs the reference on exact windows; "
                 "rev_* windows run the reference on the flipped slice")
    q = k = v = o = ht = None  # free them (the timed lambdas above read these names)
    free()


def run_varlen(res, ops, dtype, g, scale):
    ours, reference, fla, _ = ops
    lens = [35000, 8192, 65, 50000, 1000, 4096, 1, 32718]
    assert sum(lens) == 131072
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0)
    T = sum(lens)
    q, k, v = (rand((1, T, H, D), dtype) for _ in range(3))
    row = dict(case=f"fwd_{DT_NAME[dtype]}_varlen", variant="sala", baseline="fla.chunk_simple_gla",
               floor_ms=floor_ms(4 * T * H * D * q.element_size()), lens=lens)
    o, ht = ours(q, k, v, g, scale, cu)
    ro, rh = reference(q.float(), k.float(), v.float(), g, scale, cu)
    err = max(rel_err(o.float(), ro), rel_err(ht, rh))
    notes = []
    row["ms"] = time_ms(lambda: ours(q, k, v, g, scale, cu))
    if fla is not None:
        try:
            fo, fh = fla(q, k, v, g, scale, cu)
            row["fla_rel_err"] = max(rel_err(fo.float(), ro), rel_err(fh.float(), rh))
            del fo, fh
            row["baseline_ms"] = time_ms(lambda: fla(q, k, v, g, scale, cu))
        except Exception as exc:
            row["baseline_ms"] = None
            notes.append(f"fla failed: {type(exc).__name__}: {str(exc)[:200]}")
    row.update(correct=err < TOL[dtype], max_rel_err=err, floor_frac=row["floor_ms"] / row["ms"], note="; ".join(notes))
    q = k = v = o = ht = ro = rh = None  # free them (the timed lambdas above read these names)
    free()
    return res.add(**row)


def run_decode(res, ops, B, g, scale):
    from sala.ops.lightning_reference import lightning_decode_step
    from sala.ops.lightning_triton import lightning_decode_triton

    _, _, _, fla_decode = ops
    q, k, v = (rand((B, H, D), torch.float32) for _ in range(3))
    state = rand((B, H, D, D), torch.float32)
    s1, s2 = state.clone(), state.clone()
    o1 = lightning_decode_triton(q, k, v, g, s1, scale)
    o2 = lightning_decode_step(q, k, v, g, s2, scale)
    err = max(rel_err(o1, o2), rel_err(s1, s2))
    row = dict(case=f"decode_b{B}", variant="sala", baseline="reference (PyTorch recurrence step)",
               floor_ms=floor_ms(2 * state.numel() * 4))
    row["ms"] = time_ms(lambda: lightning_decode_triton(q, k, v, g, s1, scale))
    row["baseline_ms"] = time_ms(lambda: lightning_decode_step(q, k, v, g, s2, scale))
    if fla_decode is not None:
        try:
            row["fla_fused_recurrent_ms"] = time_ms(lambda: fla_decode(q, k, v, g, scale, state))
        except Exception as exc:
            row["note"] = f"fla fused_recurrent failed: {exc!r}"[:200]
    row.update(correct=err < 1e-5, max_rel_err=err, floor_frac=row["floor_ms"] / row["ms"])
    res.add(**row)

    if B == 1:  # all 24 lightning layers of the 9B model, one step each
        L = 24
        states = [rand((1, H, D, D), torch.float32) for _ in range(L)]
        ref_states = [s.clone() for s in states]
        qs = [tuple(rand((1, H, D), torch.float32) for _ in range(3)) for _ in range(L)]

        def ours_all():
            for (a, b, c), s in zip(qs, states):
                lightning_decode_triton(a, b, c, g, s, scale)

        def ref_all():
            for (a, b, c), s in zip(qs, ref_states):
                lightning_decode_step(a, b, c, g, s, scale)

        ours_all()
        ref_all()
        err = max(rel_err(a, b) for a, b in zip(states, ref_states))
        row = dict(case="decode_b1_24layers", variant="sala", baseline="reference (PyTorch recurrence step) x24",
                   floor_ms=floor_ms(L * 2 * H * D * D * 4))
        row["ms"] = time_ms(ours_all)
        row["baseline_ms"] = time_ms(ref_all)
        note = "eager launches"
        try:
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                ours_all()
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                ours_all()
            row["graph_ms"] = time_ms(graph.replay)
            note += "; graph_ms = the same 24 launches replayed as one CUDA graph"
        except Exception as exc:
            note += f"; CUDA graph failed: {exc!r}"[:200]
        row.update(correct=err < 1e-5, max_rel_err=err, floor_frac=row["floor_ms"] / row["ms"], note=note)
        res.add(**row)


def sweep(res, ops, g, scale, T=131072):
    """Pick block/warp config and segment length for each dtype on this card (printed and recorded)."""
    ours = ops[0]
    best = {}
    for dtype in (torch.bfloat16, torch.float32):
        q, k, v = (rand((1, T, H, D), dtype) for _ in range(3))
        timings = {}
        configs = {
            torch.bfloat16: [(64, 4, 2), (32, 4, 2), (64, 8, 2), (64, 4, 3)],
            torch.float32: [(32, 8, 2), (32, 8, 1), (64, 8, 2), (32, 4, 2)],
        }[dtype]
        for bv, w, st in configs:
            os.environ.update(SALA_LIGHTNING_BV=str(bv), SALA_LIGHTNING_WARPS=str(w), SALA_LIGHTNING_STAGES=str(st))
            try:
                timings[(bv, w, st)] = time_ms(lambda: ours(q, k, v, g, scale), warmup=10, rep=40)
            except Exception as exc:
                print("config failed", bv, w, st, repr(exc)[:300], flush=True)
        cfg = min(timings, key=timings.get)
        os.environ.update(SALA_LIGHTNING_BV=str(cfg[0]), SALA_LIGHTNING_WARPS=str(cfg[1]), SALA_LIGHTNING_STAGES=str(cfg[2]))
        segs = {}
        for seg in (1024, 2048, 4096):
            os.environ["SALA_LIGHTNING_SEG"] = str(seg)
            segs[seg] = time_ms(lambda: ours(q, k, v, g, scale), warmup=10, rep=40)
        os.environ.pop("SALA_LIGHTNING_SEG")
        best[dtype] = cfg
        res.add(case=f"sweep_fwd_{DT_NAME[dtype]}_T{T}", variant="sala",
                configs={f"BV{a}_w{b}_s{c}": round(t, 4) for (a, b, c), t in timings.items()},
                segments={str(s): round(t, 4) for s, t in segs.items()}, chosen=f"BV{cfg[0]}_w{cfg[1]}_s{cfg[2]}")
        q = k = v = None  # free them (the timed lambdas above read these names)
        free()
    return best


def use_cfg(cfg):
    os.environ.update(SALA_LIGHTNING_BV=str(cfg[0]), SALA_LIGHTNING_WARPS=str(cfg[1]), SALA_LIGHTNING_STAGES=str(cfg[2]))


# --------------------------------------------------------------------------------------------- report
def _extras(r) -> str:
    extra = []
    if r.get("settings"):
        extra.append(", ".join(f"{k}={v}" for k, v in r["settings"].items()))
    if r.get("reference_ms"):
        extra.append(f"reference {r['reference_ms']:.2f} ms")
    if r.get("pass_ms"):
        p = r["pass_ms"]
        extra.append(f"passes 1-2 {p['states_ms']:.3f} ms (floor {p['states_floor_ms']:.3f}), pass 3 "
                     f"{p['outputs_ms']:.3f} ms (floor {p['outputs_floor_ms']:.3f}), segments of {p['segment']}")
        if p.get("kernels_ms"):  # inside one forward (profiler): pass 1, pass 2, pass 3
            ms = {name: t for name, t, _ in p["kernels_ms"]}
            extra.append("in one forward: " + ", ".join(
                f"{label} {ms[name]:.3f} ms" for label, name in (("pass 1", "_segment_delta_kernel"),
                                                                 ("pass 2", "_segment_scan_kernel"),
                                                                 ("pass 3", "_segment_output_kernel")) if name in ms))
    if r.get("graph_ms"):
        extra.append(f"CUDA graph {r['graph_ms']:.3f} ms")
    if r.get("fla_fused_recurrent_ms"):
        extra.append(f"fla fused_recurrent {r['fla_fused_recurrent_ms']:.3f} ms")
    if r.get("fla_rel_err") is not None:
        extra.append(f"fla rel err {r['fla_rel_err']:.2g}")
    if r.get("grad_rel_diff_vs_fla") is not None:
        extra.append(f"grads vs fla {r['grad_rel_diff_vs_fla']:.2g}")
    if r.get("fla_grad_rel_err") is not None:
        extra.append(f"fla grads vs reference {r['fla_grad_rel_err']:.2g}")
    if r.get("previous"):
        p = r["previous"]
        extra.append(f"previous run ({(p.get('run') or {}).get('commit', '')[:7]}): sala {p['ms']:.3f} ms, "
                     f"baseline {_fmt(p.get('baseline_ms'), '.3f')} ms")
    if r.get("fla_autotune"):
        extra.append("fla autotune " + ", ".join(f"{k}: {v}" for k, v in r["fla_autotune"].items()))
    if r.get("window_errs"):
        extra.append("windows " + ", ".join(f"{k} {v:.2g}" for k, v in r["window_errs"].items()))
    if r.get("note"):
        extra.append(r["note"])
    return "; ".join(extra)


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def write_report(json_path: Path, md_path: Path) -> None:
    data = json.loads(json_path.read_text())
    lines = [f"# Lightning attention benchmark ({data['card']})", "",
             f"Latest run: torch {data['torch']}, triton {data['triton']}, commit `{data['commit'][:12]}`, "
             f"{data['date']}; command `{data['command']}`. Rows measured by earlier runs are kept; the `run` "
             "column names the commit and card of each row.", "",
             "B=1, H=32, D=128, chunk 64; medians of `triton.testing.do_bench` (L2 flushed before each rep). "
             "speedup = baseline_ms / ms (same run, same card). floor = bytes that must move (fwd: read q, k, v "
             "and write o once; fwd+bwd: also read do and write dq, dk, dv; decode: read + write the states) at "
             f"{COPY_BANDWIDTH / 1e12:.1f} TB/s measured copy bandwidth (the H100's"
             + (f"; this run's card copies at {data['card_copy_bandwidth_tbps']:.2f} TB/s"
                if data.get("card_copy_bandwidth_tbps") else "")
             + "); floor % = floor / ms. bf16 rows write "
             "o in bf16 (as fla does); fp32 rows use TF32 products (as fla does) unless the variant says "
             "otherwise (bf16x3: three bf16 products per float32 product, finer than TF32). Variant `sala` is "
             "the library default; other variants are candidates timed in the same job. Headline rows in bold.",
             "",
             "| case | variant | sala ms | baseline | baseline ms | speedup | floor ms | floor % | correct | "
             "max rel err | run | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if r["case"].startswith("sweep") or "ms" not in r and "error" not in r and "correct" not in r:
            continue
        run = r.get("run") or {}
        run_s = f"{(run.get('commit') or '')[:7]} {(run.get('card') or '').replace('NVIDIA ', '')}".strip()
        name = f"**{r['case']}**" if r["case"] in HEADLINE and r.get("variant", "sala") == "sala" else r["case"]
        bms = r.get("baseline_ms")
        floor = r.get("floor_frac")
        lines.append(
            f"| {name} | {r.get('variant', 'sala')} | {_fmt(r.get('ms'), '.3f')} | {r.get('baseline', '')} | "
            f"{_fmt(bms, '.3f')} | {_fmt(r.get('speedup'), '.2f')}{'x' if r.get('speedup') else ''} | "
            f"{_fmt(r.get('floor_ms'), '.3f')} | {'-' if floor is None else f'{100 * floor:.0f}%'} | "
            f"{r.get('correct')} | {_fmt(r.get('max_rel_err'), '.2g')} | {run_s} | {_extras(r)} |")
    if data.get("errors"):
        lines += ["", "Jobs of the latest run that did not produce a row (older rows of these cases are kept):", ""]
        lines += [f"- {e['case']} ({e.get('variant', 'sala')}): {e['error']}" for e in data["errors"]]
    if data.get("run_notes"):
        lines += ["", "Notes on earlier runs:", ""] + [f"- {n}" for n in data["run_notes"]]
    sweeps = [r for r in data["rows"] if r["case"].startswith("sweep")]
    if sweeps:
        lines += ["", "Launch-config sweep at T=131072 (forward ms; BV = V block, w = warps, s = pipeline stages; "
                  "segments = tokens per segment):", ""]
        for r in sweeps:
            lines.append(f"- {r['case']}: {r['configs']}; segments {r['segments']}; chosen {r['chosen']}")
    md_path.write_text("\n".join(lines) + "\n")


def print_table(rows) -> None:
    """The rows of this run, short."""
    print(f"\n{'case':30s} {'variant':16s} {'ms':>9s} {'base ms':>9s} {'speedup':>8s} {'correct':>7s} {'err':>8s}"
          f"  {'prev ms':>8s} {'prev base':>9s}")
    for r in rows:
        if "ms" not in r and "correct" not in r:
            continue
        sp = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        ms = _fmt(r.get("ms"), ".3f")
        print(f"{r['case']:30s} {r.get('variant', 'sala'):16s} {ms:>9s} {_fmt(r.get('baseline_ms'), '.3f'):>9s} "
              f"{sp:>8s} {str(r.get('correct')):>7s} {_fmt(r.get('max_rel_err'), '.2g'):>8s}"
              f"  {_fmt((r.get('previous') or {}).get('ms'), '.3f'):>8s}"
              f" {_fmt((r.get('previous') or {}).get('baseline_ms'), '.3f'):>9s}"
              + (f"  graph {r['graph_ms']:.3f}" if r.get("graph_ms") else ""))


# the issue's rows that no run has measured yet first, then the headline forwards (with their variants)
# the issue's rows, the targets still missed first (a run cut by its budget keeps what matters most)
HEADLINE_JOBS = [("fwd", torch.bfloat16, 131072), ("fwd", torch.float32, 131072), ("fwd", torch.bfloat16, 1048576),
                 ("fwdbwd", torch.bfloat16, 131072), ("fwdbwd", torch.float32, 131072),
                 ("decode", None, 1), ("decode", None, 16), ("decode", None, 64),
                 ("int64", torch.bfloat16, 1048576), ("varlen", torch.bfloat16, None)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--report", type=Path)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--headline", action="store_true", help="only the issue's rows, in HEADLINE_JOBS order")
    ap.add_argument("--cases", help="regex over '<kind>_<dtype>_<T or B>' job names, e.g. 'decode|fwdbwd'")
    ap.add_argument("--no-variants", action="store_true", help="time only the library default")
    ap.add_argument("--variants", help="regex over variant names: time only the matching ones beside the default")
    ap.add_argument("--fla-tune", choices=("full", "reduced", "min"), default="full",
                    help="shrink fla's autotune spaces for short runs (reduce_fla_autotune)")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip jobs not started within this many seconds")
    args = ap.parse_args()
    if args.report:
        write_report(args.report, args.report.with_suffix(".md"))
        return
    t_start = time.monotonic()
    torch.manual_seed(0)
    res = MergedResults("lightning")
    res.data["card_copy_bandwidth_tbps"] = round(measure_copy_bandwidth() / 1e12, 3)
    print(f"device-to-device copy: {res.data['card_copy_bandwidth_tbps']} TB/s (floors use "
          f"{COPY_BANDWIDTH / 1e12:.1f})", flush=True)
    ops = make_ops()
    if args.fla_tune != "full" and ops[2] is not None:
        try:
            FLA_TUNE.update(reduce_fla_autotune(args.fla_tune))
            print("fla autotune reduced:", FLA_TUNE, flush=True)
        except Exception as exc:
            print("could not reduce fla autotune:", repr(exc), flush=True)
    from sala.ops.lightning_reference import lightning_decay

    if args.no_variants:
        VARIANTS.clear()
    elif args.variants:
        for key, entries in VARIANTS.items():
            VARIANTS[key] = [e for e in entries if re.search(args.variants, e[0])]
    g = lightning_decay(H).cuda()
    scale = D**-0.5
    Ts = [8192, 32768] if args.quick else [8192, 32768, 131072, 524288, 1048576]
    cfg = {}  # launch overrides per dtype: none (the library defaults) unless the sweep picks them
    if not args.no_sweep and not args.quick:
        try:
            cfg = sweep(res, ops, g, scale)
        except Exception:
            traceback.print_exc()
    if args.headline:
        jobs = list(HEADLINE_JOBS)
    else:
        jobs = []
        for dtype in (torch.bfloat16, torch.float32):
            for T in Ts:
                if dtype == torch.float32 and T > 524288:
                    continue  # q, k, v, o in fp32 plus fla's chunk states do not fit 80 GB
                jobs.append(("fwd", dtype, T))
        jobs += [("varlen", torch.bfloat16, None), ("varlen", torch.float32, None)]
        jobs += [("fwdbwd", torch.bfloat16, T) for T in Ts[:3]] + [("fwdbwd", torch.float32, 131072)]
        jobs += [("decode", None, B) for B in (1, 16, 64)]
        if not args.quick:
            jobs.append(("int64", torch.bfloat16, 1048576))
        # headline cases first, so that a run cut short still has them
        jobs.sort(key=lambda j: HEADLINE_JOBS.index(j) if j in HEADLINE_JOBS else len(HEADLINE_JOBS))
    if args.cases:
        pattern = re.compile(args.cases)
        jobs = [j for j in jobs if pattern.search(f"{j[0]}_{DT_NAME.get(j[1], '')}_{j[2]}")]
    start = time.monotonic()
    names = [f"{a}_{DT_NAME.get(b, '')}_{c}" for a, b, c in jobs]
    print(f"startup {start - t_start:.1f} s; jobs {names}", flush=True)
    for kind, dtype, T in jobs:
        name = f"{kind}_{DT_NAME.get(dtype, '')}_{T}"
        if time.monotonic() - start > args.budget_s:
            res.add(case=name, variant="sala", error="skipped: --budget-s reached")
            continue
        t0 = time.monotonic()
        try:
            for key in ("SALA_LIGHTNING_BV", "SALA_LIGHTNING_WARPS", "SALA_LIGHTNING_STAGES"):
                os.environ.pop(key, None)
            if dtype in cfg:
                use_cfg(cfg[dtype])
            if kind == "fwd":
                run_forward(res, ops, dtype, T, g, scale, time_reference=T <= 32768)
            elif kind == "fwdbwd":
                run_fwdbwd(res, ops, dtype, T, g, scale)
            elif kind == "varlen":
                run_varlen(res, ops, dtype, g, scale)
            elif kind == "int64":
                run_int64(res, ops, T)
            else:
                run_decode(res, ops, T, g, scale)
        except Exception as exc:
            traceback.print_exc()
            res.add(case=name, variant="sala", error=f"{type(exc).__name__}: {str(exc)[:300]}")
            free()
        print(f"[{time.monotonic() - start:6.1f} s] {name} took {time.monotonic() - t0:.1f} s", flush=True)
    res.data["fla_chosen_configs"] = fla_chosen_configs()
    res.flush()
    print_table(res.new_rows)
    print(f"\nwrote {res.path} and {res.path.with_suffix('.md')} (merged with {COMMITTED}); "
          f"total {time.monotonic() - t_start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
