"""Run the evaluation suite over one or more causal LMs and collect one results dict.

Any transformers causal LM loads (``import sala`` registers SALA checkpoints with the Auto classes);
a ``.gguf`` path loads through transformers' ``gguf_file=``. Each model is scored with its own tokenizer
on the same seeded task instances, the same held-out text and the same lengths, so the rows compare.
"""

from __future__ import annotations

import datetime as _dt
import gc
import platform
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..engine.generation import answer, eos_ids
from ..engine.loading import ModelSpec, is_random_init, load_model, parse_model_spec, resolve_device, resolve_dtype
from .haystack import Haystack
from .perplexity import perplexity_at_lengths, window_starts
from .scoring import sample_score
from .speed import measure_speed
from .tasks import TASKS, generate_samples

DEFAULT_TASKS = ["passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"]


@dataclass
class EvalConfig:
    models: list[str]
    out_dir: str
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    lengths: list[int] = field(default_factory=lambda: [4096])
    samples: int = 4
    seed: int = 42
    depths: list[float] | None = None
    max_new_tokens: int | None = None
    haystack: str = "brown,shakespeare"
    ppl_corpus: str = "shakespeare,brown"
    ppl_lengths: list[int] | None = None  # None: same as lengths; []: skip
    ppl_windows: int = 4
    ppl_score_tokens: int = 256
    speed_lengths: list[int] | None = None  # None: same as lengths; []: skip
    speed_decode_tokens: int = 32
    speed_repeats: int = 1
    chunk_size: int | None = 4096
    device: str = "auto"
    dtype: str = "auto"
    cache: str | None = None


def _model_info(spec: ModelSpec, model) -> dict:
    folder = Path(spec.folder)
    return {"name": spec.name, "path": spec.path, "class": type(model).__name__,
            "params": sum(p.numel() for p in model.parameters()),
            "random_init": is_random_init(folder),
            "max_position_embeddings": getattr(model.config, "max_position_embeddings", None)}


def skip_reason(e: BaseException) -> str | None:
    """Why a length could not run, for errors that end one length and not the run (else None: re-raise).

    Out of memory, and a model that refuses a context past its ``max_position_embeddings`` (SALA does;
    RoPE models run on, which is what a length-generalization sweep wants to see).
    """
    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
        return "out of memory"
    if isinstance(e, ValueError) and "max_position_embeddings" in str(e):
        return str(e)
    return None


def _token_stream(tok, text: str) -> torch.Tensor:
    return torch.tensor(tok(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)


def run_eval(cfg: EvalConfig, progress=None) -> dict:
    """Evaluate every model of ``cfg``; ``progress`` is a rich ``Progress`` (or None) to advance."""
    from ..data import resolve_text

    for t in cfg.tasks:
        if t not in TASKS:
            raise KeyError(f"unknown task {t!r}; available: {', '.join(TASKS)}")
    specs = [parse_model_spec(m) for m in cfg.models]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must differ (use label=path): {names}")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    ppl_lengths = cfg.lengths if cfg.ppl_lengths is None else cfg.ppl_lengths
    speed_lengths = cfg.lengths if cfg.speed_lengths is None else cfg.speed_lengths

    hay_text = resolve_text(cfg.haystack, "train", cfg.cache) if cfg.tasks or speed_lengths else ""
    ppl_text = resolve_text(cfg.ppl_corpus, "heldout", cfg.cache) if ppl_lengths else ""
    results: dict = {
        "meta": {
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            **{k: v for k, v in asdict(cfg).items() if k not in ("models", "dtype", "device")},
            "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
            "haystack": f"{cfg.haystack} (train split)" if not Path(cfg.haystack).is_file() else cfg.haystack,
            "ppl_corpus": f"{cfg.ppl_corpus} (held-out split)" if not Path(cfg.ppl_corpus).is_file() else cfg.ppl_corpus,
            "ppl_lengths": ppl_lengths, "speed_lengths": speed_lengths,
        },
        "models": [], "tasks": [], "perplexity": [], "speed": [], "skipped": [],
    }
    total = len(specs) * (len(cfg.tasks) * len(cfg.lengths) * cfg.samples + len(ppl_lengths) * cfg.ppl_windows + len(speed_lengths))
    bar = progress.add_task("eval", total=total) if progress is not None else None

    def advance(n: int = 1, desc: str | None = None):
        if progress is not None:
            progress.update(bar, advance=n, **({"description": desc} if desc else {}))

    for spec in specs:
        model, tok = load_model(spec, device, dtype)
        results["models"].append(_model_info(spec, model))
        eos = eos_ids(model, tok)
        if cfg.tasks:
            hay = Haystack(hay_text, tok)
            for task in cfg.tasks:
                for L in cfg.lengths:
                    advance(0, f"{spec.name}: {task} @ {L}")
                    rows: list[dict] = []
                    try:
                        samples = generate_samples(task, tok, hay, L, cfg.samples, cfg.seed, cfg.depths, cfg.max_new_tokens)
                        for s in samples:
                            pred, gen = answer(model, tok, s, eos, cfg.chunk_size)
                            rows.append({**s.summary(), "prediction": pred, "score": sample_score(pred, s.answers),
                                         "prefill_s": round(gen.prefill_s, 4)})
                            advance()
                    except Exception as e:  # noqa: BLE001 - keep evaluating other lengths after an OOM
                        if (why := skip_reason(e)) is None:
                            raise
                        results["skipped"].append(f"{spec.name}: {task} at {L} tokens: {why}")
                        advance(cfg.samples - len(rows))
                        continue
                    score = 100.0 * sum(r["score"] for r in rows) / len(rows)
                    results["tasks"].append({"model": spec.name, "task": task, "length": L, "score": score,
                                             "n_samples": len(rows), "samples": rows})
        if ppl_lengths:
            stream = _token_stream(tok, ppl_text)
            fitting = []
            for L in ppl_lengths:
                if window_starts(stream.numel(), L, cfg.ppl_windows):
                    fitting.append(L)
                else:
                    results["skipped"].append(f"{spec.name}: perplexity at {L} tokens: the held-out text has only "
                                              f"{stream.numel()} tokens under this tokenizer")
                    advance(cfg.ppl_windows)
            advance(0, f"{spec.name}: perplexity")
            for L in fitting:
                done = []
                try:
                    (r,) = perplexity_at_lengths(model, stream, [L], cfg.ppl_windows, cfg.ppl_score_tokens,
                                                 cfg.chunk_size, progress=lambda: (advance(), done.append(1)))
                    results["perplexity"].append({"model": spec.name, **r.as_dict()})
                except Exception as e:  # noqa: BLE001
                    if (why := skip_reason(e)) is None:
                        raise
                    results["skipped"].append(f"{spec.name}: perplexity at {L} tokens: {why}")
                advance(cfg.ppl_windows - len(done))  # deduplicated or failed windows: keep the bar honest
        if speed_lengths:
            advance(0, f"{spec.name}: speed")
            prompt = Haystack(hay_text, tok).take(min(max(speed_lengths), 1 << 21))
            stream = _token_stream(tok, prompt)
            for L in speed_lengths:
                try:
                    (r,) = measure_speed(model, stream, [L], cfg.speed_decode_tokens, cfg.speed_repeats, cfg.chunk_size)
                    results["speed"].append({"model": spec.name, **r.as_dict()})
                except Exception as e:  # noqa: BLE001
                    if (why := skip_reason(e)) is None:
                        raise
                    results["skipped"].append(f"{spec.name}: speed at {L} tokens: {why}")
                advance()
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def progress_bar(enabled: bool = True):
    """A rich progress bar (or a no-op context yielding None)."""
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn())
