"""Training-step profile of the GPU profile's student (SmolLM2-135M converted, HALO layer map) on one card.

Each case is one stage shape of ``sala pipeline --profile gpu``: a full step (forward, backward, gradient
clipping, AdamW) under bf16 autocast with float32 master weights, as ``sala.train.trainer`` runs it. The
baseline is the teacher architecture itself (transformers' Llama, SDPA attention) trained the same way on
the same shapes in the same run, so the ratio says what the SALA layers cost over a plain Transformer.
For each case a ``torch.profiler`` pass splits the device time by kernel (top rows and a per-family sum)
and compares it with the step's wall time (the gap is host time the GPU waits for). ``--fuse`` adds the
student with ``sala.layers.fusion`` on (the elementwise chains compiled; the recipes' ``fuse = true``);
``--union LANES`` the sparse cases with InfLLM-V2's union rest pass (random weights select unrelated blocks, so
this bounds its cost where rows share nothing);
``sala-full-logits`` rows take the student's loss from its full logits, the path before the chunked losses
(``sala.ops.linear_ce``), for their time and peak memory side by side.

    python bench/train_step.py [--cases lm4k long32k] [--steps 6] [--fuse] [--union 16]
                               [--student DIR]
                               [--tiny --device cpu]

Random weights and random tokens: the timing of a step does not depend on what the weights have learned.
Writes train_step.json (BENCH.md format) under $OUT or bench/results and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from common import Results  # noqa: E402
from sala.convert.teacher import random_llama_teacher  # noqa: E402
from sala.convert.transfer import ConvertOptions, convert_model  # noqa: E402
from sala.layers.fusion import fusion  # noqa: E402
from sala.layers.sparse import DENSE_ALWAYS, SparseAttention, selection_alignment, selection_kl  # noqa: E402
from sala.ops import dispatch  # noqa: E402
from sala.modeling import SALAForCausalLM  # noqa: E402
from sala.train.losses import kl_sum, lm_sum  # noqa: E402
from sala.train.trainer import LM_LOSS_CHUNK  # noqa: E402

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, max_position_embeddings=8192,
                    tie_word_embeddings=True, initializer_range=0.02)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
HALO_LAYERS = [0, 12, 15, 16, 18, 23, 25, 29]  # the layers HALO chose in the committed GPU profile run
# (name, kind, batch, seq_len, sparse): the student stages of profiles/gpu.toml
CASES = [("distill", "distill", 16, 1024, False), ("lm4k", "lm", 4, 4096, False),
         ("long16k", "lm", 2, 16384, False), ("long32k", "lm", 1, 32768, True)]
# kernel name -> family (first match); sala's Triton kernels by their names in sala.ops
FAMILIES = [("lightning", r"^_segment_|^_decode_kernel"),
            ("infllmv2", r"^_fwd_kernel|^_fwd_forced|^_fwd_union|^_bwd_dq|^_bwd_dkdv|^_merge_splits|^_k2_lse|^_block_key|^_row_topk"),
            ("sdpa", r"flash|fmha|cudnn|sdpa"), ("gemm", r"gemm|cutlass|nvjet|matmul|xmma|cublas"),
            ("optimizer", r"adam|multi_tensor"), ("softmax/loss", r"softmax|nll|cross_entropy|log_softmax")]


def build(kind: str, tiny: bool, device: str):
    """(teacher, student) on ``device``: the random Llama teacher and its SALA conversion."""
    shape = TINY if tiny else SMOLLM2_135M
    teacher, _, spec = random_llama_teacher(seed=0, **shape)
    layers = [0, shape["num_hidden_layers"] - 1] if tiny else HALO_LAYERS
    student, _ = convert_model(teacher, spec, layers, ConvertOptions(sparse={"dense_len": 64} if tiny else {}))
    teacher.config._attn_implementation = "sdpa"
    return teacher.to(device), student.to(device)


def trained_student(path: str, device: str):
    """(a trained SALA checkpoint in float32 on ``device``, its tokenizer): real weights make real block
    selections (neighbouring rows sharing blocks), which random weights do not."""
    from sala.engine.loading import load_model

    return load_model(path, device, torch.float32)


def text_ids(tok, text: str, batch: int, seq: int, device: str) -> torch.Tensor:
    """[batch, seq] tokens of ``text`` (corpus names, held-out split, or a .txt file), repeated if short."""
    from sala.data.corpora import resolve_text

    ids = tok(resolve_text(text, split="heldout"), add_special_tokens=False)["input_ids"]
    need = batch * seq
    ids = (ids * (need // len(ids) + 1))[:need]
    return torch.tensor(ids, device=device).view(batch, seq)


def make_step(model, teacher, kind: str, ids: torch.Tensor, distill_from=None, full_logits: bool = False,
              selection: float = 0.0):
    """One training step of ``model`` (AdamW, clip 1.0) as the trainer runs it. ``full_logits``: the SALA
    student's loss from its full logits (the path before the chunked losses) instead of its chunked loss.
    ``selection`` > 0: plus that times the selection alignment loss (128 rows), as a stage with
    ``selection_weight`` adds it."""
    chunked = isinstance(model, SALAForCausalLM) and not full_logits
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    labels = ids.clone()
    autocast = torch.autocast(device_type=ids.device.type, dtype=torch.bfloat16)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast, (selection_alignment(model, 128) if selection else contextlib.nullcontext()) as terms:
            if kind == "distill":
                with torch.no_grad():
                    t_logits = distill_from(input_ids=ids).logits
                if chunked:  # the trainer's path: the student's chunked KL
                    c = ids.numel()
                    s = model(input_ids=ids, use_cache=False, teacher_logits=t_logits,
                              loss_chunk_tokens=LM_LOSS_CHUNK).loss * c
                else:
                    s, c = kl_sum(model(input_ids=ids, use_cache=False).logits, t_logits, None)
            elif chunked:  # the trainer's path: the student's chunked loss
                c = (labels[:, 1:] != -100).sum()
                s = model(input_ids=ids, use_cache=False, labels=labels, loss_chunk_tokens=LM_LOSS_CHUNK).loss * c
            else:
                s, c = lm_sum(model(input_ids=ids, use_cache=False).logits, labels)
        objective = s / c
        if terms:
            objective = objective + selection * selection_kl(terms)
        objective.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(s.detach())  # the trainer's one host sync per step

    return step


def time_step(step, device: str, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def profile_step(step, device: str, top: int) -> dict:
    """Device time per kernel of one step (top rows and family sums) against the step's wall time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        step()
        if device == "cuda":
            torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3
    rows = []
    for e in prof.key_averages():
        # CUDA: the kernels themselves (operator rows would count their kernels' time twice); CPU runs
        # (the script's test): the host time of each operator instead
        on_device = e.device_type == torch.autograd.DeviceType.CUDA
        dev_us = (getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)) \
            if device == "cuda" and on_device else (e.self_cpu_time_total if device != "cuda" else 0)
        if dev_us > 0:
            rows.append({"kernel": e.key[:90], "ms": round(dev_us / 1e3, 3), "calls": e.count})
    rows.sort(key=lambda r: -r["ms"])
    total = sum(r["ms"] for r in rows)
    fam = {name: 0.0 for name, _ in FAMILIES}
    fam["other"] = 0.0
    for r in rows:
        name = next((n for n, pat in FAMILIES if re.search(pat, r["kernel"], re.I)), "other")
        fam[name] += r["ms"]
    launches = sum(r["calls"] for r in rows)
    return {"wall_ms": round(wall, 1), "device_ms": round(total, 1), "kernel_launches": launches,
            "families_ms": {k: round(v, 1) for k, v in fam.items()}, "top": rows[:top]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="*", default=[c[0] for c in CASES])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per case (after 2 warm-up steps)")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--tiny", action="store_true", help="toy sizes (CPU test of this script)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--fuse", action="store_true", help="also time the student with sala.layers.fusion on")
    ap.add_argument("--union", type=int, default=0, metavar="LANES",
                    help="also time the sparse cases with the union rest pass (infllmv2_triton_attn.UNION_LANES)")
    ap.add_argument("--selection", type=float, default=0.0, metavar="WEIGHT",
                    help="also time the sparse cases with the selection alignment loss at this weight (with --union's "
                         "rest pass when given), as the GPU profile's long stages train")
    ap.add_argument("--student", help="a trained SALA checkpoint folder: the student variants use its weights "
                    "and held-out corpus text instead of random ones (real block selections)")
    ap.add_argument("--text", default="shakespeare,brown,austen", help="--student's text: corpus names or a .txt")
    args = ap.parse_args()
    trained = trained_student(args.student, args.device) if args.student else None
    # a trained student serves every case: its sparse layers' own dense_len, restored in the sparse cases
    trained_dense_len = ({m: m.dense_len for m in trained[0].modules() if isinstance(m, SparseAttention)}
                         if trained else {})
    res = Results("train_step")
    table = []
    for name, kind, batch, seq, sparse in CASES:
        if name not in args.cases:
            continue
        if args.tiny:
            batch, seq = 2, 128
        teacher, student = build(kind, args.tiny, args.device)
        if trained is not None:
            student = trained[0]
        for m in student.modules():
            if isinstance(m, SparseAttention):
                m.dense_len = trained_dense_len.get(m, m.dense_len) if sparse else DENSE_ALWAYS
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(3, teacher.config.vocab_size, (batch, seq), generator=gen).to(args.device)
        if trained is not None:
            ids = text_ids(trained[1], args.text, batch, seq, args.device) % teacher.config.vocab_size  # (tiny test models)
        tokens = batch * seq
        out = {}
        variants = [("dense_llama", teacher), ("sala", student), ("sala-full-logits", student)] \
            + ([("sala-fused", student)] if args.fuse else []) \
            + ([(f"sala-union{args.union}", student)] if args.union and sparse else []) \
            + ([(f"sala{f'-union{args.union}' if args.union else ''}-selection", student)]
               if args.selection and sparse else [])
        for variant, model in variants:
            model.train().requires_grad_(True)
            if kind == "distill":
                teacher_copy = teacher if variant != "dense_llama" else None
                if variant == "dense_llama":  # the dense model distils from a frozen copy of itself
                    import copy
                    teacher_copy = copy.deepcopy(teacher).eval().requires_grad_(False)
            else:
                teacher_copy = None
            step = make_step(model, teacher, kind, ids, teacher_copy, full_logits=variant == "sala-full-logits",
                             selection=args.selection if variant.endswith("-selection") else 0.0)
            if variant != "dense_llama" and kind == "distill":
                teacher.eval().requires_grad_(False)
            settings = contextlib.ExitStack()
            try:
                settings.enter_context(fusion(variant == "sala-fused", devices=(args.device,)))
                settings.enter_context(dispatch.sparse_union_lanes(args.union if "-union" in variant else 0))
                if args.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                time_step(step, args.device, 2)
                ms = statistics.median(time_step(step, args.device, args.steps))
                peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
                prof = None if args.no_profile else profile_step(step, args.device, args.top)
                out[variant] = dict(ms=ms, peak=peak, prof=prof)
            except torch.OutOfMemoryError as e:
                out[variant] = dict(ms=None, peak=None, prof=None, error=str(e)[:200])
            finally:
                settings.close()
            del step
            if args.device == "cuda":
                torch.cuda.empty_cache()
        base = out["dense_llama"]
        for variant, _ in variants:
            o, sala = out[variant], variant != "dense_llama"
            row = res.add(case=f"step_{name}_{batch}x{seq}", variant=variant, ms=o["ms"],
                          baseline="transformers Llama (teacher architecture, SDPA), same step" if sala else None,
                          baseline_ms=base["ms"] if sala else None,
                          tokens_per_s=round(tokens / o["ms"] * 1e3) if o["ms"] else None,
                          peak_gib=round(o["peak"], 2) if o["peak"] else None, sparse=sparse and sala,
                          profile=o["prof"], note=o.get("error"),
                          student=(args.student if sala and args.student else None))
            table.append(row)
        del teacher, student
    print(f"\n{'case':28} {'variant':12} {'ms':>9} {'tok/s':>10} {'vs dense':>8} {'GiB':>6} {'device ms':>9}  families")
    for r in table:
        p = r["profile"] or {}
        fam = " ".join(f"{k}={v}" for k, v in (p.get("families_ms") or {}).items() if v)
        print(f"{r['case']:28} {r['variant']:12} {r['ms'] or float('nan'):9.1f} {r['tokens_per_s'] or 0:10,} "
              f"{(str(r.get('speedup')) if r.get('speedup') else '-'):>8} {r['peak_gib'] or 0:6.2f} "
              f"{p.get('device_ms', 0):9.1f}  {fam}")
    for r in table:
        if r["profile"]:
            print(f"\n{r['case']} {r['variant']}: wall {r['profile']['wall_ms']} ms, device {r['profile']['device_ms']} ms, "
                  f"{r['profile']['kernel_launches']} launches")
            for k in r["profile"]["top"][:10]:
                print(f"  {k['ms']:8.2f} ms {k['calls']:5d}x  {k['kernel']}")


if __name__ == "__main__":
    main()
