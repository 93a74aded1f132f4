"""Run a recipe: convert the teacher, then train the SALA student stage by stage with exact resume.

Stage kinds (SPEC section 5, paper section 5):
* ``align``: HALO stage 1. One teacher forward captures every layer's attention input and output; each
  lightning layer gets the teacher's input (teacher forcing, all layers in parallel) and is trained to
  reproduce the teacher's attention output (MSE). Only the lightning layers are trainable.
* ``distill``: KL(teacher || student) on full-vocabulary logits.
* ``lm``: next-token loss (continual training; warmup-stable-decay or exponential decay schedules;
  long-context stages raise ``seq_len`` and switch InfLLM-V2 on).

Rows of a global batch are split over processes (``torchrun``, DDP); losses are normalised by the global
target count. Checkpoints hold model, optimizer, trainer position, data position and RNG, so an
interrupted run continues bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..config import LIGHTNING
from ..convert.layer_map import parse_layers
from ..convert.teacher import load_teacher, random_llama_teacher, resolve_teacher
from ..convert.transfer import ConvertOptions, convert_model, save_converted
from ..data.packing import IGNORE, Packed, concat_packed, unpack_segments
from ..data.retrieval import retrieval_documents, retrieval_documents_with_answers
from ..layers.fusion import fusion
from ..layers.sparse import DENSE_ALWAYS, SparseAttention, selection_alignment, selection_kl
from ..ops.dispatch import sparse_union_lanes
from . import distributed as D
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from .data import PackedStream, StreamState, load_documents
from .losses import masked_mse_sum
from .recipe import Recipe, Stage
from .schedule import lr_at

LM_LOSS_CHUNK = 8192  # tokens per chunk of the lm and distillation losses (sala.ops.linear_ce)
CALIBRATION_STEPS = 20  # a stage with a time budget measures this many steps before fixing its length
COMPILE_STEPS = 2  # its first steps include compilation and warm-up: left out of the measurement
MAX_RETRIEVAL_DOCS = 256  # synthetic retrieval documents per stage (the stream cycles through them)


def recipe_fingerprint(recipe: Recipe) -> str:
    """Short hash of everything in the recipe that changes what a step computes (not the logging cadence)."""
    d = asdict(recipe)
    for k in ("checkpoint_every", "log_every", "fuse", "sparse_union_lanes"):
        d.pop(k)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def copy_lightning_mixers(student: nn.Module, folder: str | Path) -> list[int]:
    """Copy into ``student`` the lightning mixers of the SALA checkpoint in ``folder``, for the layers that are
    lightning in both; returns those layers. HALO's aligned all-lightning model is the usual source: stage-1
    alignment trains every layer on the teacher's own inputs (teacher forcing), so its result for a layer
    does not depend on which other layers stay attention, and every student can start from it."""
    from safetensors.torch import load_file

    from ..config import SALAConfig

    folder = Path(folder)
    src_types = SALAConfig.from_pretrained(folder).mixer_types
    dst_types = student.config.mixer_types
    if len(src_types) != len(dst_types):
        raise ValueError(f"{folder} has {len(src_types)} layers, the student {len(dst_types)}")
    weights: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(str(f)))
    layers = [i for i, (a, b) in enumerate(zip(src_types, dst_types)) if a == b == LIGHTNING]
    for i in layers:
        mixer = student.model.layers[i].self_attn
        prefix = f"model.layers.{i}.self_attn."
        state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        missing, unexpected = mixer.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{folder}: layer {i} mixer does not match (missing {missing}, unexpected {unexpected})")
    return layers


class AlignModule(nn.Module):
    """The lightning mixers of the student, run on the teacher's attention inputs (one module for DDP)."""

    def __init__(self, mixers: dict[int, nn.Module]):
        super().__init__()
        self.idx = sorted(mixers)
        self.mixers = nn.ModuleList(mixers[i] for i in self.idx)

    def forward(self, inputs: dict[int, torch.Tensor], targets: dict[int, torch.Tensor], position_ids, token_mask, mask):
        total = count = 0.0
        for i, mixer in zip(self.idx, self.mixers):
            out = mixer(inputs[i], position_ids, token_mask)
            s, c = masked_mse_sum(out, targets[i], mask)
            total, count = total + s, count + c
        return total, count


def _capture_attention(teacher: nn.Module, layers: list[int]):
    """Forward hooks recording (input, output) of the teacher's attention modules for ``layers``."""
    store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for i in layers:
        attn = teacher.model.layers[i].self_attn

        def hook(mod, args, kwargs, output, i=i):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            y = output[0] if isinstance(output, tuple) else output
            store[i] = (x.detach(), y.detach())

        handles.append(attn.register_forward_hook(hook, with_kwargs=True))
    return store, handles


class Trainer:
    def __init__(self, recipe: Recipe, out_dir: str | Path, device: str | None = None, log=print):
        self.recipe = recipe
        self.out = Path(out_dir)
        self.rank, self.world = D.init_from_env()
        if device is None:
            device = f"cuda:{self.rank % max(1, torch.cuda.device_count())}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and recipe.autocast_bf16:
            torch.backends.cuda.matmul.allow_tf32 = True  # what autocast leaves in float32 (losses, norms) uses TF32
        self.log = log if self.rank == 0 else (lambda *a, **k: None)
        self._setup()

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        r = self.recipe
        if r.teacher == "random-llama":
            self.teacher, self.tokenizer, self.spec = random_llama_teacher(seed=r.seed, **r.teacher_shape)
        else:
            folder, gguf = resolve_teacher(r.teacher)
            self.teacher, self.tokenizer, self.spec = load_teacher(folder, gguf)
        self.teacher.to(self.device).requires_grad_(False)
        if r.layers.endswith(".json"):
            attn = json.loads(Path(r.layers).read_text())["attention_layers"]
        else:
            attn = parse_layers(r.layers, self.spec.num_layers, r.ratio, r.force_first_last)
        opts = ConvertOptions(seed=r.seed, **r.convert)
        self.student, self.report = convert_model(self.teacher, self.spec, attn, opts)
        self.lightning = [i for i, m in enumerate(self.student.config.mixer_types) if m == LIGHTNING]
        if r.init_lightning_from:
            self.report["init_lightning_from"] = r.init_lightning_from
            self.report["init_lightning_layers"] = copy_lightning_mixers(self.student, r.init_lightning_from)
        self.student.to(self.device)
        if r.gradient_checkpointing:
            if hasattr(self.student, "activation_checkpointing_enable"):  # renamed in transformers 5.2x
                self.student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.sharded = D.is_distributed() and r.parallel == "fsdp2"
        self._convert_args = (attn, opts)
        if self.rank == 0 and not (self.out / "converted" / "config.json").is_file():
            save_converted(self.student, self.out / "converted", self.tokenizer, self.report)
        D.barrier()
        if self.sharded:
            D.shard_fsdp2(self.student, [self.student.model.layers[i].self_attn for i in self.lightning])
        vocab = self.spec.vocab_size
        self.docs = load_documents(r.data, self.tokenizer, vocab_size=vocab, seed=r.seed, **r.data_options)
        self.eos = self.spec.eos_token_id if not isinstance(self.spec.eos_token_id, list) else self.spec.eos_token_id[0]
        self.pad = 0

    def _retrieval_stream(self, si: int, stage: Stage, state: dict | None) -> tuple[PackedStream | None, int]:
        """The stage's stream of synthetic retrieval rows and how many of each batch's rows it supplies."""
        n_rows = round(stage.retrieval_fraction * stage.batch_size)
        if stage.retrieval_fraction > 0:
            n_rows = max(1, n_rows)
        if n_rows == 0:
            return None, 0
        if self.tokenizer is None:
            raise ValueError(f"stage {stage.name!r}: retrieval_fraction needs a real tokenizer (not synthetic data)")
        filler = [t for d in self.docs for t in d]
        n_docs = min(MAX_RETRIEVAL_DOCS, stage.steps * n_rows)
        args = (self.tokenizer, filler, n_docs, stage.seq_len - 1)
        marks = None
        if stage.answer_weight != 1.0:
            docs, marks = retrieval_documents_with_answers(*args, seed=self.recipe.seed * 1000 + si)
        else:
            docs = retrieval_documents(*args, seed=self.recipe.seed * 1000 + si)
        stream = PackedStream(docs, stage.seq_len, self.eos, self.pad, seed=self.recipe.seed * 1000 + si + 500,
                              state=StreamState(**state) if state else None, marks=marks)
        return stream, n_rows

    def _plain_copy(self, state: dict):
        """An unsharded student holding ``state`` (for saving a sharded run as a normal checkpoint)."""
        attn, opts = self._convert_args
        model, _ = convert_model(self.teacher, self.spec, attn, opts)
        D.load_model_state(model, state, sharded=False)
        return model

    # ------------------------------------------------------------------ pieces
    def _trainable(self, stage: Stage) -> list[tuple[str, nn.Parameter]]:
        self.student.requires_grad_(False)
        if stage.trainable == "all":
            self.student.requires_grad_(True)
        else:
            for i in self.lightning:
                self.student.model.layers[i].self_attn.requires_grad_(True)
            if stage.trainable == "lightning+gates":
                for layer in self.student.model.layers:
                    gate = getattr(layer.self_attn, "o_gate", None)
                    if gate is not None:
                        gate.requires_grad_(True)
        return [(n, p) for n, p in self.student.named_parameters() if p.requires_grad]

    def _set_sparse(self, stage: Stage) -> None:
        for m in self.student.modules():
            if isinstance(m, SparseAttention):
                m.dense_len = stage.sparse_dense_len if stage.sparse else DENSE_ALWAYS

    def _inputs(self, batch: Packed, stage: Stage):
        """This process's rows as (input_ids, attention_mask or None, labels, per-token loss weights or None)."""
        rows = batch[torch.arange(self.rank, len(batch), self.world)]
        if stage.respect_boundaries:
            u = unpack_segments(rows, pad_id=self.pad)
            ids, am, labels, marks = u.input_ids, u.attention_mask, u.labels, u.marks
        else:
            ids, labels = rows.input_ids, rows.input_ids.masked_fill(rows.segment_ids < 0, -100)
            am, marks = (rows.segment_ids >= 0).long(), rows.marks
        if bool(am.all()):
            am = None
        weights = None
        if stage.answer_weight != 1.0 and marks is not None:
            weights = 1.0 + (stage.answer_weight - 1.0) * marks.float()
        dev = self.device
        return (ids.to(dev), (am.to(dev) if am is not None else None), labels.to(dev),
                weights.to(dev) if weights is not None else None)

    def _drop_steps_after(self, global_step: int) -> None:
        """Keep only the log.jsonl rows up to the checkpoint being resumed: a process stopped between two
        checkpoints (a killed command) logged steps that the resumed run takes again."""
        path = self.out / "log.jsonl"
        if not path.is_file():
            return
        lines = path.read_text().splitlines(keepends=True)
        kept = [ln for ln in lines if json.loads(ln).get("global_step", 0) <= global_step]
        if len(kept) != len(lines):
            path.write_text("".join(kept))
            self.log(f"log.jsonl: dropped {len(lines) - len(kept)} step(s) logged after that checkpoint")

    def _fusion(self):
        return fusion(self.recipe.fuse and self.device.type == "cuda")

    def _autocast(self):
        if not self.recipe.autocast_bf16:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _selection(self, stage: Stage):
        """Collect the selection alignment loss's terms from the student's sparse layers (weight > 0)."""
        if stage.selection_weight <= 0:
            return nullcontext(None)
        return selection_alignment(self.student, stage.selection_rows)

    def _loss(self, stage: Stage, module: nn.Module, batch: Packed):
        ids, am, labels, weights = self._inputs(batch, stage)
        real = am.bool() if am is not None else None
        with self._autocast():
            if stage.kind == "align" and self.sharded:
                s, c = self._align_through_student(module, ids, am, real)
            elif stage.kind == "align":
                layer_ids = self.lightning
                store = self._teacher_attention(ids, am)
                B, T = ids.shape
                pos = torch.arange(T, device=ids.device).expand(B, T)
                s, c = module({i: store[i][0] for i in layer_ids}, {i: store[i][1] for i in layer_ids}, pos, real, real)
            elif stage.kind == "distill":
                with torch.no_grad():
                    t_logits = self.teacher(input_ids=ids, attention_mask=am).logits
                out = module(input_ids=ids, attention_mask=am, use_cache=False, teacher_logits=t_logits,
                             loss_chunk_tokens=LM_LOSS_CHUNK)  # the student's chunked KL (no [tokens, vocab] copies)
                c = real.sum() if real is not None else torch.tensor(ids.numel())
                s = out.loss * c
            else:  # the student's own chunked loss: no [tokens, vocab] logits (a quarter of a 32K step's memory)
                out = module(input_ids=ids, attention_mask=am, use_cache=False, labels=labels, loss_weights=weights,
                             loss_chunk_tokens=LM_LOSS_CHUNK)
                c = (labels[:, 1:] != IGNORE).sum()
                s = out.loss * c
        return s, torch.as_tensor(c, dtype=torch.float32, device=self.device)

    def _teacher_attention(self, ids, am):
        """Run the teacher once and return each lightning layer's captured attention (input, output)."""
        store, handles = _capture_attention(self.teacher, self.lightning)
        try:
            with torch.no_grad():
                self.teacher(input_ids=ids, attention_mask=am)
        finally:
            for h in handles:
                h.remove()
        return store

    def _align_through_student(self, student, ids, am, real):
        """Alignment for a sharded student: FSDP2 gathers parameters in the root's forward, so the whole
        student runs, with each lightning mixer's input replaced by the teacher's (teacher forcing) and its
        output compared with the teacher's attention output. Same numbers as ``AlignModule``."""
        store = self._teacher_attention(ids, am)
        outs: dict[int, torch.Tensor] = {}
        hooks = []
        for i in self.lightning:
            mixer = self.student.model.layers[i].self_attn
            hooks.append(mixer.register_forward_pre_hook(lambda m, args, i=i: (store[i][0],) + tuple(args[1:])))
            hooks.append(mixer.register_forward_hook(lambda m, args, out, i=i: outs.__setitem__(i, out)))
        try:
            student(input_ids=ids, attention_mask=am, use_cache=False, logits_to_keep=1)
        finally:
            for h in hooks:
                h.remove()
        total = count = 0.0
        for i in self.lightning:
            s_, c_ = masked_mse_sum(outs[i], store[i][1], real)
            total, count = total + s_, count + c_
        return total, count

    def _calibrated_steps(self, stage: Stage, done: int, step_times: list[float]) -> tuple[int, float]:
        """(steps, seconds per step) of a time-budgeted stage: the budget over the mean step time after the
        first ``COMPILE_STEPS`` (compilation), at least one more than done, at most ``stage.steps``; the same
        on every process (rank 0 decides). The mean, not the median: step times can be bimodal (a 16K stage
        alternated 0.3 and 0.8 s steps, and the median of 10 planned 197 steps where 285 fitted)."""
        measured = step_times[COMPILE_STEPS:] if len(step_times) > COMPILE_STEPS else step_times
        per_step = sum(measured) / len(measured)
        n = min(stage.steps, max(done + 1, int(stage.time_budget_s / max(per_step, 1e-6))))
        mine = torch.tensor(float(n) if self.rank == 0 else 0.0, device=self.device)
        return int(D.all_sum(mine).item()), per_step

    # ------------------------------------------------------------------ main loop
    def run(self, stop_after: int | None = None, deadline: float | None = None) -> dict:
        """Train every stage (resuming from the latest checkpoint); ``stop_after`` ends the call after that
        many global steps, ``deadline`` (a ``time.time()`` value) at the first step ending after it, both with
        a checkpoint, so a run split over time-limited commands continues exactly. Returns a summary."""
        r = self.recipe
        ckpt_root = self.out / "checkpoints"
        state = {"stage_index": 0, "stage_step": 0, "global_step": 0, "stream": None, "recipe": recipe_fingerprint(r)}
        opt_state = None
        latest = latest_checkpoint(ckpt_root)
        fingerprint = recipe_fingerprint(r)
        if latest is not None:
            state, model_state, opt_state, rng = load_checkpoint(latest)
            D.load_model_state(self.student, model_state, self.sharded)
            if state.get("recipe") not in (None, fingerprint):
                raise RuntimeError(f"{self.out} was trained with a different recipe (fingerprint {state['recipe']} != "
                                   f"{fingerprint}); resume with the same recipe or use a new run folder")
            set_rng_state(rng)
            self.log(f"resumed from {latest} (stage {state['stage_index']}, step {state['stage_step']})")
            if self.rank == 0:
                self._drop_steps_after(state["global_step"])
        else:
            torch.manual_seed(r.seed)
        history = []
        state.setdefault("steps_override", {})
        if deadline is not None and time.time() >= deadline and state["stage_index"] < len(r.stages):
            return {"finished": False, "state": state, "history": history}
        while state["stage_index"] < len(r.stages):
            si = state["stage_index"]
            stage = r.stages[si]
            n_steps = int(state["steps_override"].get(str(si), stage.steps))
            params = self._trainable(stage)
            self._set_sparse(stage)
            if self.sharded:
                module = self.student
            else:
                base = AlignModule({i: self.student.model.layers[i].self_attn for i in self.lightning}) \
                    if stage.kind == "align" else self.student
                module = D.wrap(base)
            module.train()
            self.teacher.eval()
            opt = torch.optim.AdamW([p for _, p in params], lr=stage.lr, betas=stage.betas,
                                    weight_decay=stage.weight_decay)
            if opt_state is not None:
                D.load_optimizer_state(self.student, opt, opt_state, self.sharded)
                opt_state = None
            stream = PackedStream(self.docs, stage.seq_len, self.eos, self.pad, seed=r.seed * 1000 + si,
                                  state=StreamState(**state["stream"]) if state["stream"] else None)
            aux, n_aux = self._retrieval_stream(si, stage, state.get("stream_aux"))
            n_params = sum(p.numel() for _, p in params)
            self.log(f"stage {si} {stage.name} ({stage.kind}): {n_steps} steps x {stage.batch_size} x "
                     f"{stage.seq_len}, {n_params:,} trainable parameters, sparse {'on' if stage.sparse else 'off'}"
                     + (f", {n_aux} retrieval row(s) per batch" if n_aux else "")
                     + (f", time budget {stage.time_budget_s:.0f} s" if stage.time_budget_s else ""))
            step_times: list[float] = []
            while state["stage_step"] < n_steps:
                step = state["stage_step"]
                t0 = time.perf_counter()
                lr = lr_at(step, n_steps, stage.lr, stage.schedule, stage.warmup, stage.final_lr,
                           stage.decay_fraction, stage.decay_shape)
                for g in opt.param_groups:
                    g["lr"] = lr
                parts = [stream.next_batch(stage.batch_size - n_aux)] if stage.batch_size > n_aux else []
                batch = concat_packed(parts + ([aux.next_batch(n_aux)] if aux is not None else []))
                opt.zero_grad(set_to_none=True)
                with sparse_union_lanes(self.recipe.sparse_union_lanes):  # read by the backward too
                    with self._fusion(), self._selection(stage) as sel_terms:
                        loss_sum, count = self._loss(stage, module, batch)
                    total = D.all_sum(count).clamp_min(1.0)
                    objective = loss_sum * (self.world / total)  # DDP: world * sum / total = global mean
                    sel_kl = selection_kl(sel_terms)  # this process's sequences and sparse layers
                    if sel_kl is not None:
                        objective = objective + stage.selection_weight * sel_kl
                    objective.backward()
                gnorm = torch.nn.utils.clip_grad_norm_([p for _, p in params], stage.grad_clip) \
                    if stage.grad_clip > 0 else torch.tensor(0.0)
                if hasattr(gnorm, "full_tensor"):  # DTensor under FSDP2
                    gnorm = gnorm.full_tensor()
                opt.step()
                loss = float(D.all_sum(loss_sum.detach().float()) / total)
                state["stage_step"] += 1
                state["global_step"] += 1
                state["stream"] = stream.state.to_dict()
                state["stream_aux"] = aux.state.to_dict() if aux is not None else None
                rec = {"stage": stage.name, "kind": stage.kind, "step": step, "global_step": state["global_step"],
                       "loss": loss, "lr": lr, "grad_norm": float(gnorm), "targets": float(total),
                       "seconds": time.perf_counter() - t0}
                if sel_kl is not None:
                    rec["selection_kl"] = float(D.all_sum(sel_kl.detach().float()) / self.world)
                step_times.append(rec["seconds"])
                if (stage.time_budget_s and str(si) not in state["steps_override"]
                        and state["stage_step"] >= CALIBRATION_STEPS and len(step_times) >= 3):
                    n_steps, per_step = self._calibrated_steps(stage, state["stage_step"], step_times)
                    state["steps_override"][str(si)] = n_steps
                    self.log(f"  [{stage.name}] {per_step:.3f} s/step -> {n_steps} steps in the "
                             f"{stage.time_budget_s:.0f} s budget")
                history.append(rec)
                if self.rank == 0:
                    self.out.mkdir(parents=True, exist_ok=True)
                    with open(self.out / "log.jsonl", "a") as f:
                        f.write(json.dumps(rec) + "\n")
                if step % r.log_every == 0 or state["stage_step"] == n_steps:
                    self.log(f"  [{stage.name}] step {step + 1}/{n_steps} loss {loss:.5f} lr {lr:.2e} "
                             f"|g| {float(gnorm):.3f} {rec['seconds']:.2f}s")
                stage_done = state["stage_step"] == n_steps
                if stage_done:
                    state.update(stage_index=si + 1, stage_step=0, stream=None, stream_aux=None)
                stop = stop_after is not None and state["global_step"] >= stop_after
                stop = stop or (deadline is not None and time.time() >= deadline
                                and state["stage_index"] < len(r.stages))
                if stage_done or stop or state["global_step"] % r.checkpoint_every == 0:
                    model_state = D.full_model_state(self.student, self.sharded)  # collective when sharded
                    opt_full = None if stage_done else D.full_optimizer_state(self.student, opt, self.sharded)
                    if self.rank == 0:
                        save_checkpoint(ckpt_root, state["global_step"], model_state, opt_full, dict(state))
                    D.barrier()
                if stop:
                    return {"finished": False, "state": state, "history": history}
                if stage_done:
                    break
        full = D.full_model_state(self.student, self.sharded) if self.sharded else None
        if self.rank == 0:
            final = self.out / "final"
            model = self._plain_copy(full) if self.sharded else self.student
            save_converted(model, final, self.tokenizer, {**self.report, "recipe": r.name,
                                                          "steps": state["global_step"]})
        D.barrier()
        return {"finished": True, "state": state, "history": history}
