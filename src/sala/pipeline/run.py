"""The conversion pipeline, phase by phase, resumable across time-limited commands.

Phases (each writes into the run folder and is recorded in ``pipeline.json`` when done):

1. ``teacher_eval``: the teacher on the evaluation (retrieval vs length, held-out perplexity, speed);
2. ``halo``: HALO stage 1 on an all-lightning student, the one-layer sweep, the chosen attention layers;
3. ``compare``: HALO's layers vs uniform interleaving vs all-linear, each trained the same short stage from
   the same aligned lightning layers, then scored for recall (equal training budget);
4. ``student``: the student on HALO's layers, trained through the profile's stages;
5. ``student_eval``: the student on the same evaluation as the teacher;
6. ``report``: tables, plots and a JSON summary (``report/``).

Training phases stop at a deadline with a checkpoint and continue where they stopped on the next call;
other phases are not started when less than ``reserve_s`` seconds remain before the deadline.

``reuse``: an earlier run folder (its small files are enough: ``run.tgz`` of ``bench/convert_gpu.sh``) whose
``teacher_eval`` and ``compare`` results are taken instead of measured again when every setting they depend
on is equal (``REUSABLE``), the card is the same, and, for ``compare``, HALO chose the same layers. A run that
changes only the student's stages then spends its machine time on the student.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from ..config import LIGHTNING
from ..engine.loading import resolve_device
from .profile import Profile

PHASES = ("teacher_eval", "halo", "compare", "student", "student_eval", "report")
LAYER_CHOICES = (("halo", None), ("uniform", "uniform"), ("all_linear", "all-linear"))
# phase -> (profile settings its result depends on, files it leaves in the run folder); "eval" without the
# student-only diagnosis settings
REUSABLE = {
    "teacher_eval": (("teacher", "haystack", "seed", "autocast_bf16", "eval"), ("eval/teacher.json",)),
    "compare": (("teacher", "data", "data_options", "haystack", "seed", "ratio", "force_first_last", "autocast_bf16",
                 "fuse", "convert", "halo", "compare", "eval.max_new_tokens", "eval.chunk_size"), ("compare",)),
}
STUDENT_ONLY_EVAL = ("diagnose_lengths", "diagnose_samples", "diagnose_topk")


def _setting(settings: dict, path: str):
    """A profile setting by dotted path (None where absent); ``eval`` without the student-only keys."""
    value = settings
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if path == "eval" and isinstance(value, dict):
        value = {k: v for k, v in value.items() if k not in STUDENT_ONLY_EVAL}
    return value


def _set_fields(obj) -> dict:
    """A dataclass's fields that differ from their defaults, nested dataclasses likewise."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            value = _set_fields(value)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if dataclasses.is_dataclass(default):
            default = _set_fields(default)
        if value != default:
            out[f.name] = value
    return out


def profile_fingerprint(profile: Profile) -> str:
    """Hash of the profile's settings that differ from the defaults: a run folder refuses another profile,
    but not a newer sala whose profiles gained a setting left at its default."""
    return hashlib.sha256(json.dumps(_set_fields(profile), sort_keys=True, default=str).encode()).hexdigest()[:16]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def retrieval_accuracy(model, tokenizer, text: str, tasks: list[str], lengths: list[int], samples: int,
                       seed: int = 42, max_new_tokens: int | None = None, chunk_size: int | None = 4096) -> dict:
    """Mean RULER string-match score (in [0, 1]) of greedy answers to retrieval samples, per task@length
    and overall; samples come from ``sala.eval.tasks`` with ``text`` as haystack."""
    from ..engine.generation import answer, eos_ids
    from ..eval.haystack import Haystack
    from ..eval.scoring import sample_score
    from ..eval.tasks import generate_samples

    hay, eos = Haystack(text, tokenizer), eos_ids(model, tokenizer)
    per, all_scores = {}, []
    for task in tasks:
        for length in lengths:
            scores = [sample_score(answer(model, tokenizer, s, eos, chunk_size)[0], s.answers)
                      for s in generate_samples(task, tokenizer, hay, length, samples, seed, None, max_new_tokens)]
            per[f"{task}@{length}"] = sum(scores) / len(scores)
            all_scores += scores
    return {"score": sum(all_scores) / len(all_scores), "per_task": per}


def scores_by_task(results: dict) -> dict[str, float]:
    """``{'task@length': score}`` of an evaluation's results (``sala.eval.runner.run_eval``)."""
    return {f"{t['task']}@{t['length']}": round(t["score"], 2) for t in results["tasks"]}


class Pipeline:
    def __init__(self, profile: Profile, out_dir: str | Path, device: str | None = None, log=print,
                 reuse: str | Path | None = None):
        self.p = profile
        self.out = Path(out_dir)
        self.device = resolve_device(device)
        self.log = log
        self.reuse = Path(reuse) if reuse else None
        if self.reuse is not None and not (self.reuse / "pipeline.json").is_file():
            raise FileNotFoundError(f"reuse: {self.reuse} has no pipeline.json (not a pipeline run folder)")
        self.state_path = self.out / "pipeline.json"
        self.state = self._load_state()

    # ------------------------------------------------------------------ state
    def _load_state(self) -> dict:
        fp = profile_fingerprint(self.p)
        if self.state_path.is_file():
            st = json.loads(self.state_path.read_text())
            if st.get("fingerprint") != fp:
                raise RuntimeError(f"{self.out} was run with another profile ({st.get('profile')}, fingerprint "
                                   f"{st.get('fingerprint')} != {fp}); use a new run folder")
            return st
        return {"profile": self.p.name, "fingerprint": fp, "profile_settings": self.p.to_dict(), "done": {},
                "seconds": {}, "commands": 0}

    def _save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1, default=str))
        tmp.replace(self.state_path)

    # ------------------------------------------------------------------ helpers
    def teacher_path(self) -> str:
        """The teacher as ``sala eval`` loads it: a folder, or a GGUF file."""
        from ..convert.teacher import resolve_teacher

        folder, gguf = resolve_teacher(self.p.teacher)
        return str(Path(folder) / gguf) if gguf else str(folder)

    def eval_text_path(self) -> Path:
        """The evaluation text (haystack and perplexity): the held-out split of the profile's corpora, written
        once into the run folder (or the profile's own .txt file)."""
        if Path(self.p.haystack).is_file():
            return Path(self.p.haystack)
        path = self.out / "eval_text.txt"
        if not path.is_file():
            from ..data.corpora import resolve_text

            self.out.mkdir(parents=True, exist_ok=True)
            path.write_text(resolve_text(self.p.haystack, "heldout"), encoding="utf-8")
        return path

    def _autocast(self):
        if self.device.type == "cuda" and self.p.autocast_bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    @property
    def aligned(self) -> Path:
        return self.out / "halo" / "align" / "final"

    @property
    def selection(self) -> Path:
        return self.out / "halo" / "selection.json"

    # ------------------------------------------------------------------ phases
    def _eval(self, label: str, path: str) -> dict:
        from ..eval.runner import EvalConfig, run_eval

        e = self.p.eval
        text = str(self.eval_text_path())
        cfg = EvalConfig(models=[f"{label}={path}"], out_dir=str(self.out / "eval"), tasks=list(e.tasks),
                         lengths=list(e.lengths), samples=e.samples, seed=42 + self.p.seed,
                         max_new_tokens=e.max_new_tokens, haystack=text, ppl_corpus=text,
                         ppl_lengths=list(e.ppl_lengths), ppl_windows=e.ppl_windows,
                         ppl_score_tokens=e.ppl_score_tokens, speed_lengths=list(e.speed_lengths),
                         speed_decode_tokens=e.speed_decode_tokens, chunk_size=e.chunk_size or None,
                         device=str(self.device))
        res = run_eval(cfg)
        path_out = self.out / "eval" / f"{label}.json"
        path_out.parent.mkdir(parents=True, exist_ok=True)
        path_out.write_text(json.dumps(res, indent=1, default=str))
        scores = scores_by_task(res)
        self.log(f"{label}: {scores}; ppl {[round(p['ppl'], 2) for p in res['perplexity']]}")
        return {"results": str(path_out), "scores": scores}

    def _phase_teacher_eval(self, deadline):
        return self._eval("teacher", self.teacher_path())

    def _phase_halo(self, deadline):
        from ..train.halo import halo_select

        h = self.p.halo
        res = halo_select(self.out / "halo", teacher=self.p.teacher, data=self.p.data, data_options=self.p.data_options,
                          align_steps=h.align_steps, seq_len=h.seq_len, batch_size=h.batch_size, lr=h.lr,
                          probe_rows=h.probe_rows, probe_seq_len=h.probe_seq_len or None, ratio=self.p.ratio,
                          force_first_last=self.p.force_first_last, seed=self.p.seed, recall=h.recall,
                          haystack=str(self.eval_text_path()), time_budget_s=h.time_budget_s,
                          autocast_bf16=self.p.autocast_bf16, fuse=self.p.fuse, deadline=deadline,
                          noise_floor=h.noise_floor, log=self.log,
                          device=str(self.device))
        if res is None:
            return None
        return {"attention_layers": res["attention_layers"], "uniform": res["uniform_baseline"]}

    def _phase_compare(self, deadline):
        from ..convert.select import RecallCommonProbe
        from ..train.data import load_documents
        from ..train.trainer import Trainer

        scores_path = self.out / "compare" / "scores.json"
        scores = json.loads(scores_path.read_text()) if scores_path.is_file() else {}
        c = self.p.compare
        text = self.eval_text_path().read_text(encoding="utf-8")
        probe = None  # the in-context recall probe on the evaluation text: the same rows for every choice
        for name, layers in LAYER_CHOICES:
            if name in scores:
                continue
            recipe = self.p.recipe(f"compare_{name}", layers or str(self.selection), [c.stage],
                                   init_lightning_from=str(self.aligned), checkpoint_every=10**9)
            tr = Trainer(recipe, self.out / "compare" / name, device=str(self.device), log=self.log)
            if not tr.run(deadline=deadline)["finished"]:
                return None
            student = tr.student.eval()
            with torch.no_grad(), self._autocast():
                rec = retrieval_accuracy(student, tr.tokenizer, text, c.tasks, c.lengths, c.samples, seed=4242 + self.p.seed,
                                         max_new_tokens=self.p.eval.max_new_tokens, chunk_size=self.p.eval.chunk_size or None)
                if probe is None:
                    docs = load_documents(f"text:{self.eval_text_path()}", tr.tokenizer)
                    probe = RecallCommonProbe(docs, self.p.halo.probe_seq_len or self.p.halo.seq_len,
                                              self.p.halo.probe_rows, tr.eos)
                r, cc = probe(student)
            scores[name] = {"recall": rec["score"], "per_task": rec["per_task"], "bigram_recall": r, "other_acc": cc,
                            "attention_layers": [i for i, m in enumerate(student.config.mixer_types) if m != LIGHTNING]}
            self.log(f"compare {name}: recall {rec['score']:.3f} {rec['per_task']} bigram R {r:.4f} C {cc:.4f}")
            scores_path.parent.mkdir(parents=True, exist_ok=True)
            scores_path.write_text(json.dumps(scores, indent=1))
            del tr, student
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return {k: round(v["recall"], 4) for k, v in scores.items()}

    def _phase_student(self, deadline):
        from ..train.trainer import Trainer

        # Checkpoints only where a stage ends or the deadline stops it: periodic ones (~2 GB with the optimizer)
        # took a fifth of the GPU profile's distillation time, which the time budgets do not see.
        recipe = self.p.recipe("student", str(self.selection), self.p.stages, init_lightning_from=str(self.aligned),
                               checkpoint_every=10**9)
        tr = Trainer(recipe, self.out / "student", device=str(self.device), log=self.log)
        res = tr.run(deadline=deadline)
        if not res["finished"]:
            return None
        return {"final": str(self.out / "student" / "final"), "global_steps": res["state"]["global_step"]}

    def _phase_student_eval(self, deadline):
        path = str(self.out / "student" / "final")
        done = self.out / "eval" / "student.json"
        if done.is_file() and self.p.eval.diagnose_lengths:  # an earlier call stopped in the diagnosis
            res = json.loads(done.read_text())
            out = {"results": str(done), "scores": scores_by_task(res)}
            self.log(f"student: evaluation kept from {done}")
        else:
            out = self._eval("student", path)
        if self.p.eval.diagnose_lengths:
            diag = self._diagnose("student", path, deadline)
            if diag is None:
                return None
            out["diagnosis"] = str(diag)
        return out

    @property
    def diagnosis(self) -> Path:
        return self.out / "eval" / "student_diagnosis.json"

    def _diagnose(self, label: str, path: str, deadline) -> Path | None:
        """``sala.eval.selection.needle_study`` of a model at the profile's ``diagnose_lengths``, then the
        ``diagnose_topk`` probe (``topk_probe``) at each of them, on the evaluation text with the evaluation's
        chunk size and seed, one length at a time: each finished piece is saved, a deadline between pieces
        stops the phase (``None``) and the next call goes on from there."""
        from ..engine.loading import load_model, parse_model_spec, resolve_dtype
        from ..eval.selection import format_summary, needle_study, topk_probe

        e = self.p.eval
        part = self.diagnosis.with_suffix(".partial.json")
        if self.diagnosis.is_file():
            return self.diagnosis
        done = json.loads(part.read_text()) if part.is_file() else {"model": label, "rows": [], "summary": []}
        done.setdefault("topk_probe", [])
        todo = [("study", L) for L in e.diagnose_lengths if L not in {s["length"] for s in done["summary"]}]
        todo += [("probe", L) for L in e.diagnose_lengths if e.diagnose_topk
                 and L not in {r["length"] for r in done["topk_probe"]}]
        if todo:
            model, tok = load_model(parse_model_spec(path), self.device, resolve_dtype("auto", self.device))
            text = self.eval_text_path().read_text(encoding="utf-8")
            kw = dict(seed=42 + self.p.seed, max_new_tokens=e.max_new_tokens)
            for kind, L in todo:
                if deadline is not None and time.time() >= deadline:
                    self.log(f"{label} diagnosis: stopping before the {kind} at length {L} (deadline)")
                    return None
                with torch.no_grad(), self._autocast():
                    if kind == "study":
                        res = needle_study(model, tok, text, [L], e.diagnose_samples, e.chunk_size or None, **kw)
                    else:
                        res = topk_probe(model, tok, text, L, e.diagnose_samples, e.diagnose_topk,
                                         e.chunk_size or None, **kw)
                if kind == "study":
                    self.log(f"{label} diagnosis: {format_summary(res['summary'][0])}")
                    done["rows"] += res["rows"]
                    done["summary"] += res["summary"]
                    done["dense_len"], done["most"] = res["dense_len"], res["most"]
                else:
                    self.log(f"{label} topk probe at {L}: " + ", ".join(
                        f"top-{r['topk']} {100 * r['acc_sparse']:.0f}%" for r in res))
                    done["topk_probe"] += res
                part.parent.mkdir(parents=True, exist_ok=True)
                part.write_text(json.dumps(done, indent=1))
            del model
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        order = {L: i for i, L in enumerate(e.diagnose_lengths)}
        done["summary"].sort(key=lambda s: order.get(s["length"], len(order)))
        done["topk_probe"].sort(key=lambda r: (order.get(r["length"], len(order)), r["topk"]))
        done["card"] = device_name(self.device)
        self.diagnosis.write_text(json.dumps(done, indent=1))
        part.unlink(missing_ok=True)
        return self.diagnosis

    def _phase_report(self, deadline):
        from .report import write_pipeline_report

        paths = write_pipeline_report(self, self.out / "report")
        return {k: str(v) for k, v in paths.items()}

    def _reused(self, phase: str) -> dict | None:
        """``phase``'s result taken from the ``reuse`` run (its files copied here), or None with the reason
        logged when a setting it depends on, the card, or (compare) HALO's layers differ."""
        if self.reuse is None or phase not in REUSABLE:
            return None
        prev = json.loads((self.reuse / "pipeline.json").read_text())
        result = prev.get("done", {}).get(phase)
        keys, files = REUSABLE[phase]
        mine = json.loads(json.dumps(self.p.to_dict(), default=str))
        theirs = prev.get("profile_settings", {})
        why = [f"setting {k} differs" for k in keys if _setting(mine, k) != _setting(theirs, k)]
        if result is None:
            why = ["not done there"]
        if prev.get("device") != device_name(self.device):
            why.append(f"card {prev.get('device')} there, {device_name(self.device)} here")
        if phase == "compare" and prev.get("done", {}).get("halo") != self.state["done"].get("halo"):
            why.append("HALO chose other layers")
        why += [f"{rel} (missing there)" for rel in files if not (self.reuse / rel).exists()]
        if why:
            self.log(f"pipeline: {phase} measured here, not reused from {self.reuse} ({'; '.join(why)})")
            return None
        for rel in files:
            src, dst = self.reuse / rel, self.out / rel
            if src.is_dir():
                shutil.copytree(src, dst, dirs_exist_ok=True)
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
        if "results" in result:  # an absolute path in the other run's folder
            result = dict(result, results=str(self.out / files[0]))
        self.state["seconds"][phase] = prev.get("seconds", {}).get(phase, 0.0)
        self.state.setdefault("reused", {})[phase] = {"from": str(self.reuse), "fingerprint": prev.get("fingerprint"),
                                                      "seconds": self.state["seconds"][phase]}
        self.log(f"pipeline: {phase} reused from {self.reuse} (same settings, card{' and layers' if phase == 'compare' else ''})")
        return result

    # ------------------------------------------------------------------ driver
    def run(self, deadline: float | None = None, reserve_s: float = 0.0, until: str | None = None) -> dict:
        """Run the phases not yet done; returns ``{'finished', 'next', 'done'}``."""
        self.state["commands"] = self.state.get("commands", 0) + 1
        self._save()
        for phase in PHASES:
            if phase in self.state["done"]:
                continue
            if until is not None and PHASES.index(phase) > PHASES.index(until):
                break
            reused = self._reused(phase)
            if reused is not None:
                self.state["done"][phase] = reused
                self._save()
                continue
            training = phase in ("halo", "compare", "student")
            if deadline is not None and time.time() >= deadline - (0.0 if training else reserve_s):
                self.log(f"pipeline: stopping before {phase} (deadline)")
                return {"finished": False, "next": phase, "done": list(self.state["done"])}
            self.log(f"pipeline: {phase}")
            if phase != "report":  # the card of the measurements (a report made later elsewhere keeps it)
                self.state["device"] = device_name(self.device)
                self.state.setdefault("phase_devices", {})[phase] = self.state["device"]
            t0 = time.time()
            result = getattr(self, f"_phase_{phase}")(deadline)
            self.state["seconds"][phase] = self.state["seconds"].get(phase, 0.0) + time.time() - t0
            if result is None:
                self._save()
                self.log(f"pipeline: {phase} stopped at the deadline; run again to continue")
                return {"finished": False, "next": phase, "done": list(self.state["done"])}
            self.state["done"][phase] = result
            self._save()
        finished = all(p in self.state["done"] for p in PHASES)
        return {"finished": finished, "next": None if finished else next(p for p in PHASES if p not in self.state["done"]),
                "done": list(self.state["done"])}
