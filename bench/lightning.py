"""Lightning attention on one GPU: sala's Triton kernels vs fla ``chunk_simple_gla`` (same ``g_gamma``)
vs the PyTorch reference. Checks correctness and times, in one run, on one card.

    python bench/lightning.py            # full run (writes lightning.json under $OUT or bench/results)
    python bench/lightning.py --quick    # small sizes only
    python bench/lightning.py --report bench/results/lightning.json   # (re)write lightning.md from a JSON

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

from common import COPY_BANDWIDTH, Results, rel_err, results_dir, time_ms  # noqa: E402

H, D = 32, 128
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


# ----------------------------------------------------------------------------------------------- checks
def windowed_error(o, ht, q, k, v, g, scale, reference) -> float:
    """Max relative error of (o, final state) against the reference on exact windows (module doc)."""
    T = q.shape[1]
    errs = []
    if T <= 16384:
        ro, rh = reference(q.float(), k.float(), v.float(), g, scale)
        return max(rel_err(o.float(), ro), rel_err(ht, rh) if ht is not None else 0.0)
    ro, _ = reference(q[:, :4096].float(), k[:, :4096].float(), v[:, :4096].float(), g, scale)
    errs.append(rel_err(o[:, :4096].float(), ro))
    ends = [T]
    if T >= 524288 + 2048:
        ends.append(524288 + 2048)
    for end in ends:
        s = end - 12288
        ro, rh = reference(q[:, s:end].float(), k[:, s:end].float(), v[:, s:end].float(), g, scale)
        errs.append(rel_err(o[:, end - 4096:end].float(), ro[:, -4096:]))
        if end == T and ht is not None:
            errs.append(rel_err(ht.float(), rh))
    return max(errs)


# ------------------------------------------------------------------------------------------- callables
def make_ops():
    from sala.ops.lightning_reference import lightning_attn_chunked
    from sala.ops.lightning_triton import lightning_attn_triton

    def ours(q, k, v, g, scale, cu=None, out_dtype=None):
        return lightning_attn_triton(q, k, v, g, scale, cu_seqlens=cu, out_dtype=out_dtype or q.dtype)

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


# ---------------------------------------------------------------------------------------------- cases
def run_forward(res, ops, dtype, T, g, scale, time_reference):
    ours, reference, fla, _ = ops
    case = f"fwd_{DT_NAME[dtype]}_T{T}"
    q, k, v = (rand((1, T, H, D), dtype) for _ in range(3))
    size = q.element_size()
    row = dict(case=case, variant="sala", baseline="fla.chunk_simple_gla",
               floor_ms=floor_ms(4 * T * H * D * size))
    o, ht = ours(q, k, v, g, scale)
    torch.cuda.synchronize()
    err = windowed_error(o, ht, q, k, v, g, scale, reference)
    del o, ht
    free()
    row["ms"] = time_ms(lambda: ours(q, k, v, g, scale))
    row.update(correct=err < TOL[dtype], max_rel_err=err, floor_frac=row["floor_ms"] / row["ms"])
    notes = []
    if fla is not None:
        try:
            fo, fh = fla(q, k, v, g, scale)
            torch.cuda.synchronize()
            ferr = windowed_error(fo, fh, q, k, v, g, scale, reference)
            del fo, fh
            free()
            row["fla_rel_err"] = ferr
            if ferr < TOL[dtype]:
                row["baseline_ms"] = time_ms(lambda: fla(q, k, v, g, scale))
            else:
                row["baseline_ms"] = None
                notes.append(f"fla output WRONG (rel err {ferr:.3g} vs reference windows); not timed")
        except Exception as exc:
            row["baseline_ms"] = None
            notes.append(f"fla failed: {type(exc).__name__}: {str(exc)[:200]}")
            free()
    if time_reference:
        row["reference_ms"] = time_ms(lambda: reference(q, k, v, g, scale), warmup=3, rep=20)
    row["note"] = "; ".join(notes)
    del q, k, v
    free()
    return res.add(**row)


def run_fwdbwd(res, ops, dtype, T, g, scale):
    ours, reference, fla, _ = ops
    case = f"fwdbwd_{DT_NAME[dtype]}_T{T}"
    q, k, v = (rand((1, T, H, D), dtype, True) for _ in range(3))
    do = rand((1, T, H, D), dtype)
    size = q.element_size()
    row = dict(case=case, variant="sala", baseline="fla.chunk_simple_gla", floor_ms=floor_ms(11 * T * H * D * size))

    def step(fn):
        o, _ = fn(q, k, v, g, scale)
        o.backward(do)

    def grads(fn):
        for x in (q, k, v):  # timing loops leave their last grads behind: never accumulate onto them
            x.grad = None
        step(fn)
        out = [x.grad.detach().clone() for x in (q, k, v)]
        for x in (q, k, v):
            x.grad = None
        return out

    ours_g = grads(ours)
    notes = []
    if T <= 16384:  # reference autograd (float32 leaves)
        qr, kr, vr = (x.detach().float().requires_grad_(True) for x in (q, k, v))
        ro, _ = reference(qr, kr, vr, g, scale)
        ro.backward(do.float())
        err = max(rel_err(a.float(), b.grad) for a, b in zip(ours_g, (qr, kr, vr)))
        del qr, kr, vr, ro
        notes.append("grads vs reference autograd")
    else:
        err = None
    free()
    row["ms"] = time_ms(lambda: step(ours), grad_to_none=[q, k, v])
    if fla is not None:
        try:
            fla_g = grads(fla)
            dev = max(rel_err(a.float(), b.float()) for a, b in zip(ours_g, fla_g))
            row["grad_rel_diff_vs_fla"] = dev
            if err is None:
                err = dev
                notes.append("grads vs fla (no reference at this size)")
            del fla_g
            free()
            row["baseline_ms"] = time_ms(lambda: step(fla), grad_to_none=[q, k, v])
        except Exception as exc:
            row["baseline_ms"] = None
            notes.append(f"fla failed: {type(exc).__name__}: {str(exc)[:200]}")
    row.update(correct=err is not None and err < TOL[dtype], max_rel_err=err, floor_frac=row["floor_ms"] / row["ms"],
               note="; ".join(notes))
    del q, k, v, do, ours_g
    free()
    return res.add(**row)


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
    del q, k, v, o, ht, ro, rh
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
        del q, k, v
        free()
    return best


def use_cfg(cfg):
    os.environ.update(SALA_LIGHTNING_BV=str(cfg[0]), SALA_LIGHTNING_WARPS=str(cfg[1]), SALA_LIGHTNING_STAGES=str(cfg[2]))


# --------------------------------------------------------------------------------------------- report
def write_report(json_path: Path, md_path: Path) -> None:
    data = json.loads(json_path.read_text())
    lines = [f"# Lightning attention benchmark ({data['card']})", "",
             f"torch {data['torch']}, triton {data['triton']}, commit `{data['commit'][:12]}`, {data['date']}; "
             f"command `{data['command']}`.", "",
             "B=1, H=32, D=128, chunk 64; medians of `triton.testing.do_bench` (L2 flushed before each rep). "
             "speedup = baseline_ms / ms (same run, same card). floor = bytes that must move (fwd: read q, k, v "
             "and write o once; fwd+bwd: also read do and write dq, dk, dv; decode: read + write the states) at "
             f"{COPY_BANDWIDTH / 1e12:.1f} TB/s measured copy bandwidth; floor % = floor / ms. bf16 rows write "
             "o in bf16 (as fla does); fp32 rows use TF32 products (as fla does). Headline rows in bold.", "",
             "| case | sala ms | baseline | baseline ms | speedup | floor ms | floor % | correct | max rel err | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if r["case"].startswith("sweep"):
            continue
        if "ms" not in r:
            lines.append(f"| {r['case']} | ERROR | | | | | | | | {r.get('error', '')} |")
            continue
        name = f"**{r['case']}**" if r["case"] in HEADLINE else r["case"]
        bms = r.get("baseline_ms")
        extra = []
        if r.get("reference_ms"):
            extra.append(f"reference {r['reference_ms']:.2f} ms")
        if r.get("graph_ms"):
            extra.append(f"CUDA graph {r['graph_ms']:.3f} ms")
        if r.get("fla_fused_recurrent_ms"):
            extra.append(f"fla fused_recurrent {r['fla_fused_recurrent_ms']:.3f} ms")
        if r.get("fla_rel_err") is not None:
            extra.append(f"fla rel err {r['fla_rel_err']:.2g}")
        if r.get("grad_rel_diff_vs_fla") is not None:
            extra.append(f"grads vs fla {r['grad_rel_diff_vs_fla']:.2g}")
        if r.get("note"):
            extra.append(r["note"])
        err = r.get("max_rel_err")
        lines.append(
            f"| {name} | {r['ms']:.3f} | {r.get('baseline', '')} | {bms:.3f} | {r.get('speedup', 0):.2f}x | "
            f"{r['floor_ms']:.3f} | {100 * r['floor_frac']:.0f}% | {r['correct']} | "
            f"{err:.2g} | {'; '.join(extra)} |" if bms else
            f"| {name} | {r['ms']:.3f} | {r.get('baseline', '')} | - | - | {r['floor_ms']:.3f} | "
            f"{100 * r['floor_frac']:.0f}% | {r['correct']} | {err if err is None else f'{err:.2g}'} | {'; '.join(extra)} |"
        )
    if data.get("run_notes"):
        lines += ["", "Notes on this run:", ""] + [f"- {n}" for n in data["run_notes"]]
    sweeps = [r for r in data["rows"] if r["case"].startswith("sweep")]
    if sweeps:
        lines += ["", "Launch-config sweep at T=131072 (forward ms; BV = V block, w = warps, s = pipeline stages; "
                  "segments = tokens per segment):", ""]
        for r in sweeps:
            lines.append(f"- {r['case']}: {r['configs']}; segments {r['segments']}; chosen {r['chosen']}")
    md_path.write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--report", type=Path)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--cases", help="regex over '<kind>_<dtype>_<T or B>' job names, e.g. 'decode|fwdbwd'")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip jobs not started within this many seconds")
    args = ap.parse_args()
    if args.report:
        write_report(args.report, args.report.with_suffix(".md"))
        return
    torch.manual_seed(0)
    res = Results("lightning")
    ops = make_ops()
    from sala.ops.lightning_reference import lightning_decay

    g = lightning_decay(H).cuda()
    scale = D**-0.5
    Ts = [8192, 32768] if args.quick else [8192, 32768, 131072, 524288, 1048576]
    cfg = {torch.bfloat16: (64, 4, 2), torch.float32: (64, 8, 2)}  # the library defaults (measured)
    if not args.no_sweep and not args.quick:
        try:
            cfg = sweep(res, ops, g, scale)
        except Exception:
            traceback.print_exc()
    jobs = []
    for dtype in (torch.bfloat16, torch.float32):
        for T in Ts:
            if dtype == torch.float32 and T > 524288:
                continue  # q, k, v, o in fp32 plus fla's chunk states do not fit 80 GB
            jobs.append(("fwd", dtype, T))
    jobs += [("varlen", torch.bfloat16, None), ("varlen", torch.float32, None)]
    jobs += [("fwdbwd", torch.bfloat16, T) for T in Ts[:3]] + [("fwdbwd", torch.float32, 131072)]
    jobs += [("decode", None, B) for B in (1, 16, 64)]
    # headline cases first, so that a run cut short still has them
    first = {("decode", None, 1), ("fwd", torch.bfloat16, 131072), ("fwd", torch.float32, 131072),
             ("fwdbwd", torch.bfloat16, 131072), ("varlen", torch.bfloat16, None), ("fwd", torch.bfloat16, 1048576)}
    jobs.sort(key=lambda j: j not in first)
    if args.cases:
        pattern = re.compile(args.cases)
        jobs = [j for j in jobs if pattern.search(f"{j[0]}_{DT_NAME.get(j[1], '')}_{j[2]}")]
    start = time.monotonic()
    for kind, dtype, T in jobs:
        if time.monotonic() - start > args.budget_s:
            res.add(case=f"{kind}_{DT_NAME.get(dtype, '')}_{T}", variant="sala", error="skipped: --budget-s reached")
            continue
        try:
            if dtype is not None:
                use_cfg(cfg[dtype])
            if kind == "fwd":
                run_forward(res, ops, dtype, T, g, scale, time_reference=T <= 32768)
            elif kind == "fwdbwd":
                run_fwdbwd(res, ops, dtype, T, g, scale)
            elif kind == "varlen":
                run_varlen(res, ops, dtype, g, scale)
            else:
                run_decode(res, ops, T, g, scale)
        except Exception as exc:
            traceback.print_exc()
            res.add(case=f"{kind}_{T}_{dtype}", variant="sala", error=f"{type(exc).__name__}: {str(exc)[:300]}")
            free()
    write_report(res.path, res.path.with_suffix(".md"))
    print(Path(res.path.with_suffix(".md")).read_text())


if __name__ == "__main__":
    main()
