"""Training recipes: one TOML file per recipe (``src/sala/train/recipes/*.toml``) read into dataclasses.

A recipe names the teacher, the conversion (which layers stay attention), the data, the run-wide options
(autocast, gradient checkpointing, checkpoint interval) and an ordered list of stages. Unknown keys are
errors, so a typo cannot silently fall back to a default.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .schedule import SCHEDULES

RECIPE_DIR = Path(__file__).parent / "recipes"
KINDS = ("align", "distill", "lm")
TRAINABLE = ("lightning", "lightning+gates", "all")


class RecipeError(ValueError):
    """A recipe with a wrong key or value; the message names them."""


@dataclass
class Stage:
    name: str
    kind: str  # align: per-layer MSE vs the teacher's attention output; distill: KL to its logits; lm: next token
    steps: int
    seq_len: int
    batch_size: int  # rows per optimizer step, over all processes
    lr: float
    schedule: str = "constant"
    warmup: int = 0
    final_lr: float | None = None
    decay_fraction: float = 0.1
    decay_shape: str = "exp"
    trainable: str = "all"
    sparse: bool = False  # InfLLM-V2 on in the kept attention layers (dense_len = sparse_dense_len)
    sparse_dense_len: int = -1  # with sparse on: length from which the sparse path runs (-1: always)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    respect_boundaries: bool = True  # no state or attention across packed documents
    retrieval_fraction: float = 0.0  # share of each batch's rows that are synthetic retrieval documents
    answer_weight: float = 1.0  # lm loss weight of the answer tokens of those documents (1: plain next-token loss)
    time_budget_s: float = 0.0  # > 0: after a few steps, cut ``steps`` to what fits in this many seconds
    selection_weight: float = 0.0  # > 0: add that times the selection alignment loss (sala.ops.selection_loss)
    selection_rows: int = 128  # queries per sequence (the last ones) that loss looks at


@dataclass
class Recipe:
    name: str
    teacher: str = "default"  # 'default' (SmolLM2-135M), a path, or 'random-llama' (tests/demos)
    teacher_shape: dict = field(default_factory=dict)  # shape of 'random-llama'
    layers: str = "uniform"  # see sala.convert.layer_map.parse_layers, or a selection.json
    ratio: float = 0.25
    force_first_last: bool = True
    convert: dict = field(default_factory=dict)  # extra ConvertOptions (keep_rope, sparse, ...)
    data: str = "synthetic"  # 'synthetic', 'text:<file>' or 'corpus:<name>'
    data_options: dict = field(default_factory=dict)
    init_lightning_from: str = ""  # a SALA checkpoint folder whose lightning mixers start the student's
    seed: int = 0
    autocast_bf16: bool = False
    gradient_checkpointing: bool = False
    fuse: bool = False  # CUDA: run the layers' elementwise chains through torch.compile (sala.layers.fusion)
    sparse_union_lanes: int = 0  # CUDA: InfLLM-V2's union rest pass in training steps (sala.ops.dispatch)
    parallel: str = "ddp"  # with several processes: 'ddp' (replicas) or 'fsdp2' (fully_shard per layer)
    checkpoint_every: int = 50
    log_every: int = 1
    stages: list[Stage] = field(default_factory=list)


def build_dataclass(cls, raw: dict, where: str, error: type[ValueError] = RecipeError):
    """``cls(**raw)``, refusing unknown keys with an ``error`` that names them and the expected ones."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise error(f"{where}: unknown keys {unknown}; expected some of {sorted(names)}")
    try:
        return cls(**raw)
    except TypeError as e:
        raise error(f"{where}: {e}") from None


def read_named_toml(path_or_name: str | Path, folder: Path, what: str, error: type[ValueError]) -> dict:
    """A TOML file by path, or by name from a folder of bundled files (the error lists them)."""
    p = Path(path_or_name)
    if not p.is_file():
        p = folder / f"{path_or_name}.toml"
    if not p.is_file():
        have = sorted(x.stem for x in folder.glob("*.toml"))
        raise error(f"no {what} file {path_or_name!r} (bundled {what}s: {have})")
    with open(p, "rb") as f:
        return tomllib.load(f)


_build = build_dataclass


def parse_recipe(raw: dict) -> Recipe:
    raw = dict(raw)
    stages = raw.pop("stages", [])
    rec = _build(Recipe, raw, "recipe")
    for i, s in enumerate(stages):
        s = dict(s)
        if "betas" in s:
            s["betas"] = tuple(s["betas"])
        st = _build(Stage, s, f"stages[{i}]")
        if st.kind not in KINDS:
            raise RecipeError(f"stages[{i}].kind={st.kind!r}; expected one of {KINDS}")
        if st.trainable not in TRAINABLE:
            raise RecipeError(f"stages[{i}].trainable={st.trainable!r}; expected one of {TRAINABLE}")
        if st.schedule not in SCHEDULES:
            raise RecipeError(f"stages[{i}].schedule={st.schedule!r}; expected one of {SCHEDULES}")
        if st.kind == "align" and st.trainable != "lightning":
            raise RecipeError(f"stages[{i}]: alignment trains only the lightning layers (trainable='lightning')")
        if not 0.0 <= st.retrieval_fraction <= 1.0:
            raise RecipeError(f"stages[{i}].retrieval_fraction={st.retrieval_fraction} must be in [0, 1]")
        if st.answer_weight != 1.0 and not (st.answer_weight > 0 and st.kind == "lm" and st.retrieval_fraction > 0):
            raise RecipeError(f"stages[{i}].answer_weight={st.answer_weight}: needs a positive weight, kind 'lm' and "
                              f"retrieval_fraction > 0 (it weights the answers of the retrieval rows)")
        if st.selection_weight < 0 or st.selection_rows <= 0:
            raise RecipeError(f"stages[{i}]: selection_weight={st.selection_weight} must be >= 0 and "
                              f"selection_rows={st.selection_rows} positive")
        if st.selection_weight > 0 and st.kind == "align":
            raise RecipeError(f"stages[{i}].selection_weight: an align stage trains only the lightning layers; "
                              f"the selection alignment loss trains the sparse layers' q and k (kind 'lm' or 'distill')")
        if st.time_budget_s < 0:
            raise RecipeError(f"stages[{i}].time_budget_s={st.time_budget_s} must be >= 0")
        for key in ("steps", "seq_len", "batch_size"):
            if getattr(st, key) <= 0:
                raise RecipeError(f"stages[{i}].{key}={getattr(st, key)} must be positive")
        rec.stages.append(st)
    if rec.parallel not in ("ddp", "fsdp2"):
        raise RecipeError(f"parallel={rec.parallel!r}; expected 'ddp' or 'fsdp2'")
    if not isinstance(rec.sparse_union_lanes, int) or rec.sparse_union_lanes < 0:
        raise RecipeError(f"sparse_union_lanes={rec.sparse_union_lanes!r} must be an integer >= 0 (0: off)")
    if not rec.stages:
        raise RecipeError("recipe has no [[stages]]")
    if rec.gradient_checkpointing and any(s.selection_weight > 0 for s in rec.stages):
        raise RecipeError("selection_weight with gradient_checkpointing: the loss's terms are collected during the "
                          "forward, which checkpointing runs twice; turn one of them off")
    if len({s.name for s in rec.stages}) != len(rec.stages):
        raise RecipeError("stage names must be unique")
    return rec


def load_recipe(path_or_name: str | Path) -> Recipe:
    """A recipe from a TOML path, or by name from the bundled recipes (``cpu_tiny``, ``gpu_smollm2``)."""
    return parse_recipe(read_named_toml(path_or_name, RECIPE_DIR, "recipe", RecipeError))
