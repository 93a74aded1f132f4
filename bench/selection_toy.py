"""Toy check of the selection alignment loss (``sala.ops.selection_loss``) on a CPU, minutes per run.

The GPU profile's students lose passkey answers with the sparse path that dense attention gets right, because
InfLLM-V2's stage-1 scores do not rank the needle's block (``docs/results/convert_gpu/runs.md``, 2026-11-29f).
This reproduces the situation in miniature: a 4-layer SALA model (lightning, sparse, lightning, sparse; block
16, top-4 = 2 dynamic blocks of ~20) is trained with **dense** attention on a needle task (a marker token and a
value hidden in 384 random tokens; at the end the marker again and the loss on the value), then evaluated with
the sparse path on. With ``--weights 0 1`` it trains the same model with and without the selection alignment
loss (last 8 queries) and reports, per seed: accuracy with the sparse path and with dense attention, and the
share of samples whose needle block each sparse layer's KV groups select for the marker's query.

    python bench/selection_toy.py --seeds 0 1 --weights 0 1 --steps 700   # ~7 min a run on one core

Writes selection_toy.json (BENCH.md-style rows) under $OUT or bench/results and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sala.layers.sparse import SparseAttention, selection_alignment, selection_kl  # noqa: E402
from sala.modeling import SALAForCausalLM  # noqa: E402
from sala.testing import small_config  # noqa: E402

T, VOCAB, MARK, BLOCK = 384, 64, 3, 16


def needle_batch(n: int, gen: torch.Generator):
    """Random tokens with ``MARK value`` at a random place and ``MARK`` again at T-2; the label is the value."""
    ids = torch.randint(20, VOCAB, (n, T), generator=gen)
    val = torch.randint(10, 20, (n,), generator=gen)
    pos = torch.randint(20, T - 80, (n,), generator=gen)
    ids[torch.arange(n), pos] = MARK
    ids[torch.arange(n), pos + 1] = val
    ids[:, T - 2] = MARK
    ids[:, T - 1] = val
    labels = torch.full_like(ids, -100)
    labels[:, T - 1] = val
    return ids, labels, pos


def toy_model(seed: int) -> SALAForCausalLM:
    torch.manual_seed(seed)
    cfg = small_config(vocab_size=VOCAB, mixer_types=["lightning", "minicpm4", "lightning", "minicpm4"],
                       sparse_config=dict(kernel_size=8, kernel_stride=4, init_blocks=1, block_size=BLOCK,
                                          window_size=32, topk=4, dense_len=64), max_position_embeddings=T + 8)
    return SALAForCausalLM(cfg)


def set_sparse(model, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, SparseAttention):
            m.dense_len = 64 if on else 1 << 62


def train(weight: float, seed: int, steps: int, rows: int = 8, batch: int = 16, lr: float = 2e-3) -> tuple:
    model = toy_model(seed).train()
    set_sparse(model, False)  # dense training, as the GPU profile's stages up to 16K
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    kls = []
    t0 = time.time()
    for step in range(steps):
        ids, labels, _ = needle_batch(batch, gen)
        with selection_alignment(model, rows) if weight else torch.enable_grad() as terms:
            loss = model(input_ids=ids, labels=labels).loss
        objective = loss
        if weight and terms:
            kl = selection_kl(terms)
            objective = objective + weight * kl
            kls.append(float(kl.detach()))
        opt.zero_grad()
        objective.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            print(f"  weight {weight} seed {seed} step {step + 1}/{steps} loss {loss.item():.3f} "
                  f"{time.time() - t0:.0f} s", flush=True)
    return model.eval(), kls, time.time() - t0


def evaluate(model, n: int = 256) -> dict:
    gen = torch.Generator().manual_seed(999)
    ids, _, pos = needle_batch(n, gen)
    out = {}
    for mode in ("sparse", "dense"):
        set_sparse(model, mode == "sparse")
        with torch.no_grad():
            pred = model(input_ids=ids).logits[:, T - 2].argmax(-1)
        out[f"acc_{mode}"] = float((pred == ids[:, T - 1]).float().mean())
    set_sparse(model, True)
    layers = {i: layer.self_attn for i, layer in enumerate(model.model.layers) if isinstance(layer.self_attn, SparseAttention)}
    hits = {i: [] for i in layers}
    for b in range(64):
        for a in layers.values():
            a.capture = {}
        with torch.no_grad():
            model(input_ids=ids[b:b + 1])
        block = int(pos[b] + 1) // BLOCK
        for i, a in layers.items():
            chosen = a.capture["topk_idx"][:, T - 2]  # [KV groups, selected blocks] for the marker's query
            hits[i].append([block in chosen[g].tolist() for g in range(chosen.shape[0])])
    for a in layers.values():
        a.capture = None
    out["needle_selected"] = {f"layer{i}": [round(float(x), 2) for x in torch.tensor(h, dtype=torch.float32).mean(0)]
                              for i, h in hits.items()}
    return out


def one_run(args: tuple) -> dict:
    weight, seed, steps = args
    torch.set_num_threads(1)
    model, kls, seconds = train(weight, seed, steps)
    row = {"case": f"needle_T{T}_seed{seed}", "variant": "selection_loss" if weight else "plain", "weight": weight,
           "seed": seed, "steps": steps, "train_s": round(seconds, 1), **evaluate(model)}
    if kls:
        row["selection_kl_first_last"] = [round(kls[0], 4), round(kls[-1], 4)]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    jobs = [(w, s, args.steps) for s in args.seeds for w in args.weights]
    with ProcessPoolExecutor(max_workers=min(args.workers, len(jobs))) as pool:
        rows = list(pool.map(one_run, jobs))
    out_dir = Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "selection_toy.json"
    path.write_text(json.dumps({"command": "python " + " ".join(sys.argv), "torch": torch.__version__,
                                "device": "cpu", "rows": rows}, indent=1))
    print(f"\n{'seed':>4} {'weight':>6} {'sparse acc':>10} {'dense acc':>9}  needle selected (layer: per KV group)")
    for r in rows:
        sel = "  ".join(f"{k}: {v}" for k, v in r["needle_selected"].items())
        print(f"{r['seed']:>4} {r['weight']:>6} {r['acc_sparse']:>10.3f} {r['acc_dense']:>9.3f}  {sel}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
