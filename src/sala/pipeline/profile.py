"""Pipeline profiles: one TOML file (``src/sala/pipeline/profiles/*.toml``) says everything a conversion run
does, from the teacher to the report: HALO selection, the equal-budget comparison of layer choices, the
student's training stages (a ``sala.train`` recipe) and the evaluation. Unknown keys are errors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..train.recipe import RecipeError, build_dataclass, parse_recipe, read_named_toml

PROFILE_DIR = Path(__file__).parent / "profiles"


class ProfileError(ValueError):
    """A profile with a wrong key or value; the message names them."""


@dataclass
class HaloSpec:
    """HALO stage 1 (alignment of an all-lightning student) and the one-layer-at-a-time sweep."""

    align_steps: int = 200
    seq_len: int = 512
    batch_size: int = 8
    lr: float = 1e-3
    time_budget_s: float = 0.0  # > 0: the alignment runs at most this long (steps is then a maximum)
    probe_rows: int = 8
    probe_seq_len: int = 0  # 0: seq_len
    recall: str = "bigram"  # or 'task:<name>:<length>:<samples>'
    noise_floor: float = 0.0  # > 0: C losses floored at this many median C noises (sala.convert.select); 0: paper


@dataclass
class CompareSpec:
    """HALO vs uniform vs all-linear: the same short training from the same aligned layers, then recall."""

    stage: dict = field(default_factory=dict)  # one sala.train stage (kind, steps, seq_len, batch_size, lr, ...)
    tasks: list[str] = field(default_factory=lambda: ["passkey", "niah_single"])
    lengths: list[int] = field(default_factory=lambda: [1024])
    samples: int = 8


@dataclass
class EvalSpec:
    tasks: list[str] = field(default_factory=lambda: ["passkey", "niah_single"])
    lengths: list[int] = field(default_factory=lambda: [4096])
    samples: int = 8
    max_new_tokens: int = 12
    ppl_lengths: list[int] = field(default_factory=lambda: [1024])
    ppl_windows: int = 4
    ppl_score_tokens: int = 256
    headline_ppl_length: int = 0  # 0: the largest of ppl_lengths
    speed_lengths: list[int] = field(default_factory=lambda: [4096])
    speed_decode_tokens: int = 16
    chunk_size: int = 4096
    # passkey beyond dense_len, per sample: sparse vs dense-only answer and whether the sparse layers select
    # the needle's block (sala.eval.selection.needle_study) -> eval/student_diagnosis.json; empty: off
    diagnose_lengths: list[int] = field(default_factory=list)
    diagnose_samples: int = 16
    # other selection budgets (blocks per query, as the config's topk) tried on the same passkey samples at
    # the diagnose_lengths, sparse accuracy only (sala.eval.selection.topk_probe); empty: off
    diagnose_topk: list[int] = field(default_factory=list)


@dataclass
class Profile:
    name: str
    teacher: str = "default"  # 'default' (SmolLM2-135M-Instruct, fetched) or a local folder / GGUF
    data: str = "corpus:shakespeare,brown"  # training text (train split), see sala.train.data
    data_options: dict = field(default_factory=dict)
    haystack: str = "shakespeare,brown"  # evaluation text: corpus names (held-out split) or a .txt file
    seed: int = 0
    ratio: float = 0.25
    force_first_last: bool = True
    autocast_bf16: bool = False
    gradient_checkpointing: bool = False
    fuse: bool = False  # CUDA: fused elementwise chains in training (torch.compile, sala.layers.fusion)
    sparse_union_lanes: int = 0  # CUDA: InfLLM-V2's union rest pass in training (sala.ops.dispatch)
    convert: dict = field(default_factory=dict)
    halo: HaloSpec = field(default_factory=HaloSpec)
    compare: CompareSpec = field(default_factory=CompareSpec)
    stages: list[dict] = field(default_factory=list)  # the student's training stages (sala.train recipe stages)
    eval: EvalSpec = field(default_factory=EvalSpec)

    def recipe(self, name: str, layers: str, stages: list[dict], init_lightning_from: str = "",
               checkpoint_every: int = 100, log_every: int = 10):
        """A ``sala.train`` recipe for this profile's teacher and data."""
        return parse_recipe({
            "name": name, "teacher": self.teacher, "layers": layers, "ratio": self.ratio,
            "force_first_last": self.force_first_last, "convert": dict(self.convert), "data": self.data,
            "data_options": dict(self.data_options), "init_lightning_from": init_lightning_from, "seed": self.seed,
            "autocast_bf16": self.autocast_bf16, "gradient_checkpointing": self.gradient_checkpointing,
            "fuse": self.fuse, "sparse_union_lanes": self.sparse_union_lanes, "checkpoint_every": checkpoint_every, "log_every": log_every, "stages": [dict(s) for s in stages],
        })

    def to_dict(self) -> dict:
        return asdict(self)


def _build(cls, raw: dict, where: str):
    return build_dataclass(cls, raw, where, ProfileError)


def parse_profile(raw: dict) -> Profile:
    raw = dict(raw)
    parts = {"halo": HaloSpec, "compare": CompareSpec, "eval": EvalSpec}
    sub = {k: _build(cls, dict(raw.pop(k, {})), k) for k, cls in parts.items()}
    prof = _build(Profile, raw, "profile")
    for k, v in sub.items():
        setattr(prof, k, v)
    if not prof.stages:
        raise ProfileError("profile has no [[stages]] for the student")
    if not prof.compare.stage:
        raise ProfileError("profile has no [compare] stage")
    try:  # the stages must form valid recipes; checked now rather than after an hour of training
        prof.recipe("check", "uniform", prof.stages)
        prof.recipe("check", "uniform", [prof.compare.stage])
    except RecipeError as e:
        raise ProfileError(f"invalid training settings: {e}") from None
    if prof.halo.noise_floor < 0:
        raise ProfileError(f"halo.noise_floor={prof.halo.noise_floor} must be >= 0")
    for key in ("align_steps", "seq_len", "batch_size", "probe_rows"):
        if getattr(prof.halo, key) <= 0:
            raise ProfileError(f"halo.{key}={getattr(prof.halo, key)} must be positive")
    if not prof.eval.lengths or prof.eval.samples <= 0:
        raise ProfileError("eval needs lengths and samples > 0")
    if prof.eval.diagnose_lengths and (prof.eval.diagnose_samples <= 0 or min(prof.eval.diagnose_lengths) <= 0):
        raise ProfileError("eval.diagnose_lengths needs positive lengths and diagnose_samples > 0")
    if prof.eval.diagnose_topk and (not prof.eval.diagnose_lengths or min(prof.eval.diagnose_topk) < 1):
        raise ProfileError("eval.diagnose_topk needs diagnose_lengths and budgets >= 1 block")
    return prof


def load_profile(path_or_name: str | Path) -> Profile:
    """A profile from a TOML path, or by name from the bundled profiles (``cpu``, ``gpu``)."""
    return parse_profile(read_named_toml(path_or_name, PROFILE_DIR, "profile", ProfileError))
