"""HALO selection end to end: align an all-lightning student, sweep the layers, write the choice.

Writes into the run folder: ``align/`` (the alignment run, resumable), ``sweep.json``, ``sweep.md`` and
``selection.json`` (``sala convert --layers <run>/selection.json`` uses it).
"""

from __future__ import annotations

from pathlib import Path

from ..convert.select import RecallCommonProbe, TaskRecall, layer_sweep, write_selection
from ..convert.transfer import ConvertOptions, convert_model
from .recipe import parse_recipe
from .trainer import Trainer


def halo_select(out_dir: str | Path, teacher: str = "default", data: str = "synthetic", data_options: dict | None = None,
                align_steps: int = 200, seq_len: int = 512, batch_size: int = 8, lr: float = 1e-3,
                probe_rows: int = 8, probe_seq_len: int | None = None, ratio: float = 0.25,
                force_first_last: bool = True, teacher_shape: dict | None = None, seed: int = 0,
                recall: str = "bigram", haystack: str = "shakespeare", time_budget_s: float = 0.0,
                autocast_bf16: bool = False, fuse: bool = False, deadline: float | None = None, device: str | None = None,
                noise_floor: float = 0.0, log=print) -> dict | None:
    """``recall``: 'bigram' (in-context bigram recall on the data) or 'task:<name>:<length>:<samples>'
    (RULER-style retrieval from ``sala.eval.tasks`` on the ``haystack`` corpus or text file, e.g.
    'task:passkey:1024:8'); C is always the other-token accuracy of the probe. ``time_budget_s`` caps the
    alignment's time (``align_steps`` is then a maximum); at ``deadline`` (a ``time.time()`` value) the
    alignment stops with a checkpoint and None is returned: call again to continue. ``noise_floor``: see
    :mod:`sala.convert.select` (0: the paper's score)."""
    out = Path(out_dir)
    recipe = parse_recipe({
        "name": "halo_align", "teacher": teacher, "teacher_shape": teacher_shape or {}, "layers": "all-linear",
        "data": data, "data_options": data_options or {}, "seed": seed, "checkpoint_every": max(1, align_steps // 4),
        "log_every": max(1, align_steps // 10), "autocast_bf16": autocast_bf16, "fuse": fuse,
        "stages": [{"name": "align", "kind": "align", "trainable": "lightning", "steps": align_steps,
                    "seq_len": seq_len, "batch_size": batch_size, "lr": lr, "schedule": "cosine",
                    "warmup": min(50, align_steps // 10), "final_lr": lr / 100, "time_budget_s": time_budget_s}],
    })
    tr = Trainer(recipe, out / "align", device=device, log=log)
    if not tr.run(deadline=deadline)["finished"]:
        return None
    aligned = tr.student.eval()
    reference, _ = convert_model(tr.teacher, tr.spec, list(range(tr.spec.num_layers)),
                                 ConvertOptions(keep_rope=True, attn_output_gate=False, sparse={"dense_len": 1 << 30}))
    reference.to(tr.device).eval()
    probe = RecallCommonProbe(tr.docs, probe_seq_len or seq_len, probe_rows, tr.eos)
    task_recall = None
    if recall.startswith("task:"):
        from ..data.corpora import resolve_text

        _, task, length, n = recall.split(":")
        task_recall = TaskRecall(tr.tokenizer, resolve_text(haystack, "train"), task, int(length), int(n), seed=42 + seed)
    elif recall != "bigram":
        raise ValueError(f"recall={recall!r}: use 'bigram' or 'task:<name>:<length>:<samples>'")
    teacher_hits = probe.hits(reference)
    r0, c0 = probe.scores(teacher_hits)
    if task_recall is not None:
        r0 = task_recall(reference)

    def score(model):
        hits = probe.hits(model)
        r, c = probe.scores(hits)
        extra = {"C_noise": probe.common_noise(hits, teacher_hits)}
        return (task_recall(model) if task_recall is not None else r), c, extra

    log(f"teacher: R {r0:.4f} C {c0:.4f} ({probe.counts()}, recall from {recall})")
    rows = layer_sweep(reference, aligned, score,
                       progress=lambda i, r, c: log(f"layer {i:3d}: R {r:.4f} C {c:.4f}"))
    result = write_selection(out, rows, ratio, force_first_last, baseline={"R": r0, "C": c0}, noise_floor=noise_floor,
                             extra={"probe": probe.counts(), "recall": recall, "align_steps": align_steps,
                                    "teacher": teacher})
    log(f"attention layers: {result['attention_layers']} (uniform: {result['uniform_baseline']})")
    return result
