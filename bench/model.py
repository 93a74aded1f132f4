"""End-to-end model benchmark on one GPU: time to first token, decode speed and peak memory of a
release-shaped MiniCPM-SALA (random bf16 weights), prefilling in chunks through the cache, optionally against a
dense Qwen3-8B-shaped transformers model measured in the same run (the paper's baseline, SPEC section 6).

    python bench/model.py --lengths 64K 128K 256K 1M --decode 16 [--baseline qwen3-8b] [--layers 32] [--chunk 32K] [--check]

``--check`` first runs the tiny fixture model on the GPU (Triton dispatch) and compares it with the reference
logits, so a wrong kernel never produces a fast number unnoticed. ``--baseline qwen3-8b`` times the dense model
on every length first (one model on the card at a time; out of memory is reported, not fatal) and gives each
SALA row ``baseline_ms`` and ``speedup`` (TTFT). ``--tiny --device cpu`` runs both at toy sizes (the CPU
test of this script). Writes model.json (BENCH.md format) under --out and prints a table; the JSON is
rewritten after every case.
"""

from __future__ import annotations

import argparse
import gc
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

import sala  # noqa: E402,F401  (registers the Auto classes)
from sala.config import release_config  # noqa: E402
from sala.engine.generation import forward_chunk, prefill  # noqa: E402
from sala.modeling import SALAForCausalLM  # noqa: E402


def parse_len(text: str) -> int:
    t = text.upper()
    return int(float(t[:-1]) * 1024) if t.endswith("K") else int(float(t[:-1]) * 1024 * 1024) if t.endswith("M") else int(t)


def _randomize(model, device: str, dtype) -> torch.nn.Module:
    """Meta-built SALA model -> random weights on ``device`` (norm weights near 1, matrices N(0, 0.02))."""
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0, 0.02)
    return model.eval()


def sala_model(n_layers: int, device: str, dtype, tiny: bool) -> SALAForCausalLM:
    kw = {}
    if tiny:
        kw = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  lightning_nkv=4, lightning_nh=4, vocab_size=512,
                  sparse_config=dict(kernel_size=32, kernel_stride=16, init_blocks=1, block_size=64, window_size=64,
                                     topk=2, dense_len=128))
    if n_layers != 32:  # keep the release's sparse share: every 4th layer sparse, first and last too
        mix = ["lightning-attn"] * n_layers
        for i in range(0, n_layers, 4):
            mix[i] = "minicpm4"
        mix[-1] = "minicpm4"
        kw.update(num_hidden_layers=n_layers, mixer_types=mix)
    cfg = release_config(**kw)
    cfg.max_position_embeddings = 1 << 21
    with torch.device("meta"):
        model = SALAForCausalLM(cfg)
    return _randomize(model, device, dtype)


def dense_model(device: str, dtype, tiny: bool):
    """Qwen3-8B's shape (36 layers, 32 q / 8 kv heads, d 128, SwiGLU 12288) through transformers and SDPA."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    shape = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936)
    if tiny:
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, vocab_size=512)
    cfg = Qwen3Config(**shape, max_position_embeddings=1 << 21, rope_theta=1e6, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in place on the device, in the bench dtype (transformers' own init)
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def check_fixture(device: str) -> float:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    fx = ROOT / "tests" / "fixtures" / "minicpm_sala_tiny"
    cases = load_file(str(fx / "cases.safetensors"))
    m = AutoModelForCausalLM.from_pretrained(str(fx)).to(device).eval()
    worst = 0.0
    with torch.no_grad():
        for case in ("a", "c1024", "c1151"):
            got = m(cases[f"{case}.input_ids"].to(device)).logits.cpu()
            worst = max(worst, float((got - cases[f"{case}.logits"]).abs().max()))
    return worst


def cache_bytes(cache) -> int:
    """Bytes the cache holds: SALACache reports its own; transformers' caches are summed over their tensors."""
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        return int(cache.nbytes())
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def kv_exceeds_card(model, T: int, device: str) -> str | None:
    """Why a dense model's K/V cache of T tokens cannot fit next to its weights, or None when it can."""
    if not device.startswith("cuda"):
        return None
    c = model.config
    kv = T * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2 * model.dtype.itemsize
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    total = torch.cuda.get_device_properties(device).total_memory
    if kv + weights > total:
        return (f"out of memory (not run): K/V of {T} tokens needs {kv / 2**30:.1f} GiB beside "
                f"{weights / 2**30:.1f} GiB of weights on a {total / 2**30:.0f} GiB card")
    return None


class StepClock:
    """Per-step decode times: CUDA events on a GPU (no sync between steps), wall time on the CPU."""

    def __init__(self, device: str, n: int):
        self.cuda = device.startswith("cuda")
        self.marks = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)] if self.cuda else []
        self.walls: list[float] = []

    def mark(self) -> None:
        if self.cuda:
            self.marks[len(self.walls)].record()
        self.walls.append(time.perf_counter())

    def steps_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return sorted(self.marks[i].elapsed_time(self.marks[i + 1]) for i in range(len(self.walls) - 1))
        return sorted((b - a) * 1e3 for a, b in zip(self.walls, self.walls[1:]))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def warm_up(model, device: str, chunk: int, vocab: int, length: int) -> None:
    """Compile and autotune every kernel (prefill, dense and sparse decode) before timing."""
    ids = torch.randint(3, vocab, (1, length), device=device)
    logits, cache = prefill(model, ids, chunk)
    tok = logits.argmax(-1, keepdim=True)
    for _ in range(8):
        logits, cache = forward_chunk(model, tok, cache, keep=1)
        tok = logits[:, -1].argmax(-1, keepdim=True)
    del cache
    sync(device)


def prompt(T: int, vocab: int, device: str) -> torch.Tensor:
    """The random prompt of length T (seeded: every variant of a length sees the same tokens)."""
    g = torch.Generator().manual_seed(T)
    return torch.randint(3, vocab, (1, T), generator=g).to(device)


def measure(model, ids: torch.Tensor, chunk: int, decode: int, device: str, profile_decode: bool = False) -> dict:
    """TTFT of the prompt ``ids`` (chunked prefill), then ``decode`` timed greedy steps after 4 untimed.
    The row's ``tokens`` are the greedy tokens (compared across variants, then dropped from the JSON)."""
    T = ids.shape[1]
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    row: dict = {}
    try:
        with torch.no_grad():
            sync(device)
            t0 = time.perf_counter()
            logits, cache = prefill(model, ids, chunk, reserve=T + decode + 16)
            sync(device)
            ttft = time.perf_counter() - t0
            tok = logits.argmax(-1, keepdim=True)
            toks = [tok]
            for _ in range(4):  # untimed: new shapes of this context length (and graph captures)
                logits, cache = forward_chunk(model, tok, cache, keep=1)
                tok = logits[:, -1].argmax(-1, keepdim=True)
                toks.append(tok)
            sync(device)
            clock = StepClock(device, decode)
            t1 = time.perf_counter()
            clock.mark()
            for _ in range(decode):
                logits, cache = forward_chunk(model, tok, cache, keep=1)
                tok = logits[:, -1].argmax(-1, keepdim=True)
                toks.append(tok)
                clock.mark()
            sync(device)
            per_tok = (time.perf_counter() - t1) / max(1, decode)
            steps = clock.steps_ms()
            if profile_decode and device.startswith("cuda"):
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        logits, cache = forward_chunk(model, tok, cache, keep=1)
                        tok = logits[:, -1].argmax(-1, keepdim=True)
                    sync(device)
                print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=14), flush=True)
        row.update(ms=ttft * 1e3, decode_ms_per_token=per_tok * 1e3,
                   decode_step_ms_median=steps[len(steps) // 2] if steps else None,
                   decode_step_ms_max=steps[-1] if steps else None,
                   peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
                   cache_gib=cache_bytes(cache) / 2**30, tokens=torch.cat(toks, 1)[0].tolist())
        del cache
    except torch.OutOfMemoryError as err:
        row.update(ms=None, note=f"out of memory: {str(err)[:120]}")
    gc.collect()
    return row


def graphs_row(model, ids, eager: dict, eager_tokens: list[int], chunk: int, decode: int, device: str) -> dict:
    """The same prompt with decode graphs on: decode time against the eager row, tokens compared."""
    from sala.engine.graphs import CudaGraphBackend, EagerBackend, disable_decode_graphs, enable_decode_graphs

    runner = enable_decode_graphs(model, CudaGraphBackend() if device.startswith("cuda") else EagerBackend())
    try:
        row = {"case": eager["case"], "variant": "sala-graphs", "layers": eager["layers"],
               **measure(model, ids, chunk, decode, device)}
    finally:
        disable_decode_graphs(model)
    tokens = row.pop("tokens", None)
    base = eager.get("decode_ms_per_token")
    row.update(baseline="sala (eager decode)", baseline_ms=base, graphs=len(runner.graphs),
               speedup=(base / row["decode_ms_per_token"]) if base and row.get("decode_ms_per_token") else None,
               correct=tokens == eager_tokens, note="ms = TTFT; speedup = eager decode ms / graph decode ms")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", nargs="+", default=["8K", "32K", "128K"])
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--chunk", default="32K")
    ap.add_argument("--baseline", choices=["none", "qwen3-8b"], default="none",
                    help="a dense model timed on the same lengths in the same run")
    ap.add_argument("--decode-graphs", action="store_true",
                    help="also time SALA with lightning layers replayed as CUDA graphs (sala.engine.graphs)")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--profile-decode", action="store_true", help="print where 5 decode steps spend time")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="toy sizes of both models (the CPU test of this script)")
    ap.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "bench" / "results")))
    args = ap.parse_args()
    device = args.device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    commit = os.environ.get("SALA_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    result = {
        "card": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "torch": torch.__version__, "triton": getattr(sys.modules.get("triton"), "__version__", None),
        "commit": commit, "date": str(date.today()), "command": "python bench/model.py " + " ".join(sys.argv[1:]),
        "rows": [],
    }

    def save():
        (out_dir / "model.json").write_text(json.dumps(result, indent=1))

    if args.check:
        err = check_fixture(device)
        result["fixture_max_abs_logit_err_cuda"] = err
        print(f"fixture on {device}: max |logit diff| {err:.2e}", flush=True)
        save()
    chunk = parse_len(args.chunk)
    lengths = [parse_len(t) for t in args.lengths]
    dense_ms: dict[int, float | None] = {}
    builds = []
    if args.baseline == "qwen3-8b":
        builds.append(("dense-qwen3-8b", lambda: dense_model(device, dtype, args.tiny)))
    builds.append(("sala", lambda: sala_model(args.layers, device, dtype, args.tiny)))
    for variant, build in builds:
        model = build()
        warm_up(model, device, chunk, model.config.vocab_size, min(9000, max(lengths)))
        for T in lengths:
            row = {"case": f"ttft_T{T}", "variant": variant, "layers": model.config.num_hidden_layers}
            ids = prompt(T, model.config.vocab_size, device)
            too_big = kv_exceeds_card(model, T, device) if variant != "sala" else None
            if too_big:  # a dense prefill would run for minutes before failing: say so without running it
                row.update(ms=None, note=too_big)
            else:
                row.update(measure(model, ids, chunk, args.decode, device, args.profile_decode and variant == "sala"))
            tokens = row.pop("tokens", None)
            if variant == "sala":
                base = dense_ms.get(T)
                row.update(baseline="dense-qwen3-8b" if T in dense_ms else None, baseline_ms=base,
                           speedup=(base / row["ms"]) if base and row.get("ms") else None,
                           correct=bool(args.check) or None)
            else:
                dense_ms[T] = row.get("ms")
                row.update(baseline=None, baseline_ms=None)
            result["rows"].append(row)
            save()
            print(json.dumps(row), flush=True)
            if variant == "sala" and args.decode_graphs and row.get("ms") is not None:
                result["rows"].append(graphs_row(model, ids, row, tokens, chunk, args.decode, device))
                save()
                print(json.dumps(result["rows"][-1]), flush=True)
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    print("\nspeedup: sala rows = dense TTFT / sala TTFT; sala-graphs rows = eager decode / graph decode")
    print(f"{'case':>16} {'variant':>16} {'TTFT s':>8} {'decode ms/tok':>14} {'peak GiB':>9} {'speedup':>13}")
    for r in result["rows"]:
        if r.get("ms") is None:
            print(f"{r['case']:>16} {r['variant']:>16} {r.get('note')}")
            continue
        peak = f"{r['peak_gib']:9.1f}" if r.get("peak_gib") is not None else f"{'-':>9}"
        speed = f"{r['speedup']:12.2f}x" if r.get("speedup") else f"{'-':>13}"
        print(f"{r['case']:>16} {r['variant']:>16} {r['ms'] / 1e3:8.2f} {r['decode_ms_per_token']:14.1f} {peak} {speed}")


if __name__ == "__main__":
    main()
