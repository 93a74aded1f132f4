"""End-to-end model benchmark on one GPU: time to first token, decode speed and peak memory of a
release-shaped MiniCPM-SALA (random bf16 weights), prefilling in chunks through the cache.

    python bench/model.py --lengths 8K 32K 128K --decode 32 [--layers 32] [--chunk 32K] [--check]

``--check`` first runs the tiny fixture model on the GPU (Triton dispatch) and on the CPU reference and
reports the largest logit difference, so a wrong kernel never produces a fast number unnoticed.
Writes bench/results/model.json (BENCH.md format) and prints a table; JSON is rewritten after every case.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import sala  # noqa: E402
from sala.config import release_config  # noqa: E402
from sala.modeling import CACHE_FIELD, SALAForCausalLM  # noqa: E402


def parse_len(text: str) -> int:
    t = text.upper()
    return int(float(t[:-1]) * 1024) if t.endswith("K") else int(float(t[:-1]) * 1024 * 1024) if t.endswith("M") else int(t)


def random_model(n_layers: int, dtype=torch.bfloat16) -> SALAForCausalLM:
    cfg = release_config()
    if n_layers != 32:  # keep the release's sparse share: every 4th layer sparse, first and last too
        mix = ["lightning-attn"] * n_layers
        for i in range(0, n_layers, 4):
            mix[i] = "minicpm4"
        mix[-1] = "minicpm4"
        cfg = release_config(num_hidden_layers=n_layers, mixer_types=mix)
    cfg.max_position_embeddings = 1 << 21
    with torch.device("meta"):
        model = SALAForCausalLM(cfg)
    model = model.to_empty(device="cuda").to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0, 0.02)
    return model.eval()


def check_fixture() -> float:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    fx = ROOT / "tests" / "fixtures" / "minicpm_sala_tiny"
    cases = load_file(str(fx / "cases.safetensors"))
    m = AutoModelForCausalLM.from_pretrained(str(fx)).cuda().eval()
    worst = 0.0
    with torch.no_grad():
        for case in ("a", "c1024", "c1151"):
            got = m(cases[f"{case}.input_ids"].cuda()).logits.cpu()
            worst = max(worst, float((got - cases[f"{case}.logits"]).abs().max()))
    return worst


def prefill(model, ids: torch.Tensor, chunk: int, reserve: int = 0):
    """Chunked prefill; ``reserve`` sizes the cache for the prompt and the decode steps after the first chunk."""
    cache = None
    out = None
    for s in range(0, ids.shape[1], chunk):
        out = model(ids[:, s : s + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = getattr(out, CACHE_FIELD)
        if s == 0 and reserve:
            cache.reserve(reserve)
    return out, cache


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", nargs="+", default=["8K", "32K", "128K"])
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--chunk", default="32K")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--profile-decode", action="store_true", help="print where 5 decode steps spend time")
    ap.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "bench" / "results")))
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    commit = os.environ.get("SALA_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    result = {
        "card": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": __import__("triton").__version__, "commit": commit, "date": str(date.today()),
        "command": "python bench/model.py " + " ".join(sys.argv[1:]), "rows": [],
    }

    def save():
        (out_dir / "model.json").write_text(json.dumps(result, indent=1))

    if args.check:
        err = check_fixture()
        result["fixture_max_abs_logit_err_cuda"] = err
        print(f"fixture on CUDA: max |logit diff| {err:.2e}", flush=True)
        save()
    model = random_model(args.layers)
    chunk = parse_len(args.chunk)
    with torch.no_grad():  # compile and autotune every kernel (prefill, dense and sparse decode) before timing
        warm_ids = torch.randint(3, model.config.vocab_size, (1, 9000), device="cuda")
        out, cache = prefill(model, warm_ids, chunk)
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(40):
            tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        del cache, out, warm_ids
    torch.cuda.synchronize()
    for text in args.lengths:
        T = parse_len(text)
        ids = torch.randint(3, model.config.vocab_size, (1, T), device="cuda")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        row = {"case": f"ttft_T{T}", "variant": "sala", "layers": args.layers}
        try:
            with torch.no_grad():
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out, cache = prefill(model, ids, chunk, reserve=T + args.decode + 16)
                torch.cuda.synchronize()
                ttft = time.perf_counter() - t0
                tok = out.logits[:, -1:].argmax(-1)
                for _ in range(4):  # untimed: new shapes of this context length
                    out = model(tok, past_key_values=cache, use_cache=True)
                    tok = out.logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
                t1 = time.perf_counter()
                marks = [torch.cuda.Event(enable_timing=True) for _ in range(args.decode + 1)]
                marks[0].record()
                for i in range(args.decode):
                    out = model(tok, past_key_values=cache, use_cache=True)
                    tok = out.logits[:, -1:].argmax(-1)
                    marks[i + 1].record()
                torch.cuda.synchronize()
                per_tok = (time.perf_counter() - t1) / max(1, args.decode)
                steps = sorted(marks[i].elapsed_time(marks[i + 1]) for i in range(args.decode))
                # a step far above the median is a compilation or a plan rebuild (the first run's problem)
                row.update(decode_step_ms_median=steps[len(steps) // 2] if steps else None,
                           decode_step_ms_max=steps[-1] if steps else None)
                if args.profile_decode:
                    from torch.profiler import ProfilerActivity, profile

                    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                        for _ in range(5):
                            tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
                        torch.cuda.synchronize()
                    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=14), flush=True)
            row.update(ms=ttft * 1e3, decode_ms_per_token=per_tok * 1e3,
                       peak_gib=torch.cuda.max_memory_allocated() / 2**30, cache_gib=cache.nbytes() / 2**30,
                       baseline=None, baseline_ms=None, correct=bool(args.check) or None)
        except torch.OutOfMemoryError as err:
            row.update(ms=None, note=f"out of memory: {str(err)[:120]}")
        result["rows"].append(row)
        save()
        print(json.dumps(row), flush=True)
        del ids
    print(f"\n{'case':>16} {'TTFT s':>8} {'decode ms/tok':>14} {'peak GiB':>9}")
    for r in result["rows"]:
        if r.get("ms") is not None:
            print(f"{r['case']:>16} {r['ms'] / 1e3:8.2f} {r['decode_ms_per_token']:14.1f} {r['peak_gib']:9.1f}")
        else:
            print(f"{r['case']:>16} {r.get('note')}")


if __name__ == "__main__":
    main()
