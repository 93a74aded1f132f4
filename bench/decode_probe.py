"""Diagnose per-step decode time on the tiny fixture model (bf16, CUDA): wall time of each step and the
Triton kernels compiled during it (new entries in a fresh TRITON_CACHE_DIR)."""

import os
import sys
import tempfile
import time
from pathlib import Path

cache_dir = tempfile.mkdtemp()
os.environ["TRITON_CACHE_DIR"] = cache_dir
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import sala  # noqa: E402,F401
from sala.modeling import CACHE_FIELD  # noqa: E402


def kernels() -> set[str]:
    return {p.name for p in Path(cache_dir).rglob("*.json") if not p.name.startswith("__grp")}


steps: list[dict] = []
model = AutoModelForCausalLM.from_pretrained(str(ROOT / "tests/fixtures/minicpm_sala_tiny")).to("cuda", torch.bfloat16).eval()
for label, T in (("dense", 200), ("sparse", 700)):
    ids = torch.randint(3, 500, (1, T), device="cuda")
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = getattr(out, CACHE_FIELD)
        tok = out.logits[:, -1:].argmax(-1)
        for step in range(12):
            before = kernels()
            torch.cuda.synchronize()
            t = time.perf_counter()
            tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            new = sorted(kernels() - before)
            ms = 1e3 * (time.perf_counter() - t)
            steps.append({"path": label, "step": step, "ctx": T + step + 1, "ms": round(ms, 2), "compiled": new})
            print(f"{label} step {step} ctx {T + step + 1}: {ms:.1f} ms, compiled {new}", flush=True)
if os.environ.get("OUT"):  # the device run's output folder
    import json

    Path(os.environ["OUT"], "decode_probe.json").write_text(json.dumps(
        {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": steps}, indent=1))
