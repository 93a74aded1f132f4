import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from sala import ops
from sala.train.trainer import Trainer


def _final(run):
    return load_file(str(run / "checkpoints" / (run / "checkpoints" / "latest").read_text() / "model.safetensors"))


def test_interrupted_run_resumes_bitwise(recipe_factory, tmp_path):
    rec = recipe_factory()
    full = Trainer(rec, tmp_path / "full", log=lambda *a: None).run()
    assert full["finished"] and len(full["history"]) == 6
    # interrupt inside the distill stage (optimizer state and data position mid-stage), then resume twice
    part = Trainer(rec, tmp_path / "cut", log=lambda *a: None).run(stop_after=3)
    assert not part["finished"] and part["state"]["global_step"] == 3
    part2 = Trainer(rec, tmp_path / "cut", log=lambda *a: None).run(stop_after=5)
    assert part2["state"]["global_step"] == 5
    rest = Trainer(rec, tmp_path / "cut", log=lambda *a: None).run()
    assert rest["finished"]
    a, b = _final(tmp_path / "full"), _final(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    losses_full = [r["loss"] for r in full["history"]]
    losses_cut = [r["loss"] for r in part["history"] + part2["history"] + rest["history"]]
    assert losses_full == losses_cut
    assert (tmp_path / "full" / "final" / "config.json").is_file()


def _logged_steps(run):
    return [json.loads(ln)["global_step"] for ln in (run / "log.jsonl").read_text().splitlines()]


def test_resume_after_a_kill_logs_every_step_once(recipe_factory, tmp_path):
    """A command killed between checkpoints logged steps the resumed run takes again: the training log
    (what the pipeline's report counts) keeps each step once, the resumed ones."""
    rec = recipe_factory()
    run = tmp_path / "run"
    Trainer(rec, run, log=lambda *a: None).run(stop_after=3)
    Trainer(rec, run, log=lambda *a: None).run(stop_after=5)
    ckpts = run / "checkpoints"
    shutil.rmtree(ckpts / "step-0000005")  # killed after logging steps 4 and 5, before their checkpoint
    (ckpts / "latest").write_text("step-0000003")
    assert _logged_steps(run) == [1, 2, 3, 4, 5]
    notes = []
    rest = Trainer(rec, run, log=notes.append).run()
    assert rest["finished"] and _logged_steps(run) == [1, 2, 3, 4, 5, 6]
    assert any("dropped 2 step(s)" in n for n in notes)


def test_steps_run_under_the_recipes_sparse_union_lanes(recipe_factory, tmp_path, monkeypatch):
    """sparse_union_lanes: every training step's forward and backward run with InfLLM-V2's union rest pass
    on (sala.ops.dispatch.sparse_union_lanes), the setting restored after; it changes no result, so a run
    may resume with another value (the recipe's fingerprint leaves it out)."""
    from sala.ops import infllmv2_triton_attn as attn
    from sala.train.trainer import recipe_fingerprint

    seen = {"forward": [], "backward": []}
    real = ops.sparse_attention

    def spy(*a, **k):
        seen["forward"].append(attn.UNION_LANES)
        out = real(*a, **k)
        if out.requires_grad:
            out.register_hook(lambda g: seen["backward"].append(attn.UNION_LANES))
        return out

    monkeypatch.setattr(ops, "sparse_attention", spy)
    stages = [{"name": "long", "kind": "lm", "steps": 2, "seq_len": 64, "batch_size": 1, "lr": 1e-3, "sparse": True}]
    rec = recipe_factory(stages=stages, sparse_union_lanes=16)
    assert recipe_fingerprint(rec) == recipe_fingerprint(recipe_factory(stages=stages))
    before = attn.UNION_LANES
    assert Trainer(rec, tmp_path / "r", log=lambda *a: None).run()["finished"]
    assert seen["forward"] and seen["backward"]
    assert set(seen["forward"]) == {16} and set(seen["backward"]) == {16}
    assert attn.UNION_LANES == before


def test_resume_test_can_fail(recipe_factory, tmp_path):
    """Without the saved optimizer state the resumed run diverges, so the bitwise test above is meaningful."""
    rec = recipe_factory()
    full = Trainer(rec, tmp_path / "full", log=lambda *a: None).run()
    Trainer(rec, tmp_path / "cut", log=lambda *a: None).run(stop_after=3)
    ck = tmp_path / "cut" / "checkpoints" / "step-0000003"
    torch.save(None, ck / "optimizer.pt")
    rest = Trainer(rec, tmp_path / "cut", log=lambda *a: None).run()
    assert [r["loss"] for r in rest["history"]] != [r["loss"] for r in full["history"][3:]]


def test_align_trains_only_lightning_layers_and_reduces_mse(recipe_factory, tmp_path):
    rec = recipe_factory(stages=[{"name": "align", "kind": "align", "trainable": "lightning", "steps": 8,
                                  "seq_len": 32, "batch_size": 8, "lr": 3e-3}],
                         data_options={"n_docs": 8, "min_len": 30, "max_len": 30})
    tr = Trainer(rec, tmp_path / "r", log=lambda *a: None)
    before = {k: v.clone() for k, v in tr.student.state_dict().items()}
    hist = tr.run()["history"]
    after = tr.student.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".self_attn." in k and k.split(".")[2] in ("1", "2") for k in changed)
    assert "model.layers.1.self_attn.z_proj.weight" in changed
    assert hist[-1]["loss"] < 0.8 * hist[0]["loss"]  # same 8 rows every step (one epoch per step)


def test_alignment_target_is_the_teacher_attention_output(recipe_factory, tmp_path):
    """With the student's lightning layer replaced by the teacher's own attention module the MSE is 0."""
    from sala.train.trainer import _capture_attention

    rec = recipe_factory()
    tr = Trainer(rec, tmp_path / "r", log=lambda *a: None)
    ids = torch.randint(3, 64, (2, 12))
    store, handles = _capture_attention(tr.teacher, [1])
    with torch.no_grad():
        want = tr.teacher(ids).logits
    for h in handles:
        h.remove()
    x, y = store[1]
    attn = tr.teacher.model.layers[1].self_attn
    # rerun layer 1's attention on the captured input: identical output
    pos = torch.arange(12).expand(2, 12)
    cos, sin = tr.teacher.model.rotary_emb(x, pos)
    y2 = attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None)[0]
    torch.testing.assert_close(y2, y)
    assert want.abs().max() > 0


def test_sparse_stage_takes_the_sparse_path(recipe_factory, tmp_path, monkeypatch):
    calls = {"sparse": 0, "dense": 0}
    real_sparse, real_dense = ops.sparse_attention, ops.dense_attention

    def sp(*a, **k):
        calls["sparse"] += 1
        return real_sparse(*a, **k)

    def de(*a, **k):
        calls["dense"] += 1
        return real_dense(*a, **k)

    monkeypatch.setattr(ops, "sparse_attention", sp)
    monkeypatch.setattr(ops, "dense_attention", de)
    rec = recipe_factory(stages=[
        {"name": "short", "kind": "lm", "steps": 1, "seq_len": 32, "batch_size": 2, "lr": 1e-3},
        {"name": "long", "kind": "lm", "steps": 1, "seq_len": 64, "batch_size": 1, "lr": 1e-3, "sparse": True,
         "respect_boundaries": False},
        # two rows with document boundaries (the GPU profile's 16K stage: batch 2, sparse)
        {"name": "long2", "kind": "lm", "steps": 1, "seq_len": 64, "batch_size": 2, "lr": 1e-3, "sparse": True},
    ])
    tr = Trainer(rec, tmp_path / "r", log=lambda *a: None)
    res = tr.run(stop_after=1)
    assert calls["dense"] > 0 and calls["sparse"] == 0
    res = Trainer(rec, tmp_path / "r", log=lambda *a: None).run()
    assert calls["sparse"] > 0 and res["finished"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in res["history"])


def test_gradient_checkpointing_and_bf16_autocast(recipe_factory, tmp_path):
    stages = [{"name": "lm", "kind": "lm", "steps": 2, "seq_len": 32, "batch_size": 4, "lr": 1e-3}]
    plain = Trainer(recipe_factory(stages=stages), tmp_path / "a", log=lambda *a: None).run()
    ckpt = Trainer(recipe_factory(stages=stages, gradient_checkpointing=True), tmp_path / "b", log=lambda *a: None)
    assert ckpt.student.model.layers[0].gradient_checkpointing
    calls, mlp = [], ckpt.student.model.layers[0].mlp
    orig = mlp.forward
    mlp.forward = lambda x: (calls.append(1), orig(x))[1]  # module hooks do not fire in the recompute
    res = ckpt.run()
    assert len(calls) == 4  # 2 steps, each forward recomputed once in backward
    for x, y in zip(plain["history"], res["history"]):
        assert abs(x["loss"] - y["loss"]) < 1e-6 and abs(x["grad_norm"] - y["grad_norm"]) < 1e-5
    bf = Trainer(recipe_factory(stages=stages, autocast_bf16=True), tmp_path / "c", log=lambda *a: None).run()
    for x, y in zip(plain["history"], bf["history"]):
        assert abs(x["loss"] - y["loss"]) < 0.05 * x["loss"]
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in log] == [1, 2]


def test_resume_with_another_recipe_is_refused(recipe_factory, tmp_path):
    import pytest

    Trainer(recipe_factory(), tmp_path / "r", log=lambda *a: None).run(stop_after=1)
    other = recipe_factory(seed=1)
    with pytest.raises(RuntimeError, match="different recipe"):
        Trainer(other, tmp_path / "r", log=lambda *a: None).run()


def test_deadline_stops_with_a_checkpoint_and_resumes_bitwise(recipe_factory, tmp_path, monkeypatch):
    import time

    from sala.train import trainer as T

    rec = recipe_factory()
    full = Trainer(rec, tmp_path / "full", log=lambda *a: None).run()
    assert full["finished"]
    past = Trainer(rec, tmp_path / "cut", log=lambda *a: None).run(deadline=time.time() - 1)
    assert not past["finished"] and past["history"] == []  # nothing started after the deadline

    real_perf_counter = time.perf_counter

    class Clock:  # the wall clock reads 0 when the run starts and 10 after its first step
        calls = 0
        perf_counter = staticmethod(real_perf_counter)

        @classmethod
        def time(cls):
            cls.calls += 1
            return 0.0 if cls.calls == 1 else 10.0

    monkeypatch.setattr(T, "time", Clock)
    part = Trainer(rec, tmp_path / "cut", log=lambda *a: None).run(deadline=5.0)
    monkeypatch.undo()
    assert not part["finished"] and len(part["history"]) == 1  # the step that crossed the deadline
    rest = Trainer(rec, tmp_path / "cut", log=lambda *a: None).run()
    assert rest["finished"]
    a, b = _final(tmp_path / "full"), _final(tmp_path / "cut")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_time_budget_fixes_the_stage_length_and_survives_resume(recipe_factory, tmp_path, monkeypatch):
    from sala.train import trainer as T

    monkeypatch.setattr(T, "CALIBRATION_STEPS", 3)
    stages = [{"name": "lm", "kind": "lm", "steps": 50, "seq_len": 32, "batch_size": 2, "lr": 1e-3,
               "time_budget_s": 1e-9}, {"name": "lm2", "kind": "lm", "steps": 2, "seq_len": 32, "batch_size": 2, "lr": 1e-3}]
    rec = recipe_factory(stages=stages)
    res = Trainer(rec, tmp_path / "r", log=lambda *a: None).run()
    # a budget far below one step: the stage ends right after calibration (3 steps measured, one more at least)
    assert [r["stage"] for r in res["history"]] == ["lm"] * 4 + ["lm2"] * 2
    assert res["state"]["steps_override"] == {"0": 4}
    # the calibrated length is part of the resumable state
    part = Trainer(rec, tmp_path / "s", log=lambda *a: None).run(stop_after=4)
    assert part["state"]["steps_override"] == {"0": 4}
    rest = Trainer(rec, tmp_path / "s", log=lambda *a: None).run()
    assert [r["stage"] for r in rest["history"]] == ["lm2"] * 2


def test_calibration_takes_the_mean_step_time_after_compilation(recipe_factory, tmp_path):
    """Bimodal step times (as a 16K stage showed): the budget is divided by their mean, the compile steps left
    out; the result stays within [done + 1, steps]."""
    from sala.train.recipe import Stage

    tr = Trainer(recipe_factory(), tmp_path / "c", log=lambda *a: None)
    times = [9.0, 4.0] + [0.25, 0.75] * 9  # two compile steps, then 0.5 s on average (median 0.75 in the recent half)
    stage = Stage(name="s", kind="lm", steps=1000, seq_len=32, batch_size=2, lr=1e-3, time_budget_s=50.0)
    n, per_step = tr._calibrated_steps(stage, 20, times)
    assert per_step == pytest.approx(0.5) and n == 100
    assert tr._calibrated_steps(Stage(**{**stage.__dict__, "steps": 50}), 20, times)[0] == 50
    assert tr._calibrated_steps(Stage(**{**stage.__dict__, "time_budget_s": 1.0}), 20, times)[0] == 21


def test_init_lightning_from_copies_the_aligned_mixers(recipe_factory, tmp_path):
    aligned = Trainer(recipe_factory(layers="all-linear", stages=[
        {"name": "align", "kind": "align", "trainable": "lightning", "steps": 2, "seq_len": 32, "batch_size": 4,
         "lr": 1e-2}]), tmp_path / "align", log=lambda *a: None)
    aligned.run()
    src = aligned.student.state_dict()
    tr = Trainer(recipe_factory(init_lightning_from=str(tmp_path / "align" / "final")), tmp_path / "s",
                 log=lambda *a: None)
    assert tr.report["init_lightning_layers"] == [1, 2]  # layer 0 stays attention
    dst = tr.student.state_dict()
    fresh = Trainer(recipe_factory(), tmp_path / "f", log=lambda *a: None).student.state_dict()
    for k in dst:
        if k.startswith(("model.layers.1.self_attn.", "model.layers.2.self_attn.")):
            assert torch.equal(dst[k], src[k]), k
    assert not torch.equal(dst["model.layers.1.self_attn.q_proj.weight"], fresh["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(dst["model.layers.0.self_attn.q_proj.weight"], fresh["model.layers.0.self_attn.q_proj.weight"])


def test_retrieval_documents_end_with_an_answer_from_the_text():
    from sala.testing import train_bpe_tokenizer
    from sala.data.retrieval import retrieval_documents

    text = (__import__("pathlib").Path(__file__).parents[1] / "eval" / "data" / "shakespeare_excerpt.txt").read_text()
    tok = train_bpe_tokenizer(text, vocab_size=300)
    filler = tok(text[:20000], add_special_tokens=False)["input_ids"]
    docs = retrieval_documents(tok, filler, 6, 400, seed=1, questions="one")
    assert all(380 <= len(d) <= 400 for d in docs) and len({tuple(d) for d in docs}) == 6
    decoded = [tok.decode(d) for d in docs]
    for d in decoded:  # the question is last and its answer is one of the inserted values
        answer = d.rstrip(".").split()[-1]
        assert answer.isdigit() and d.count(answer) >= 2, d[-200:]
    assert docs == retrieval_documents(tok, filler, 6, 400, seed=1, questions="one")


def test_retrieval_documents_ask_about_every_fact_with_its_own_answer():
    """questions='all': every inserted fact is asked once after the text, and each answer is that fact's value."""
    import re

    from sala.testing import train_bpe_tokenizer
    from sala.data.retrieval import TEMPLATES, facts_for_length, retrieval_documents

    text = (__import__("pathlib").Path(__file__).parents[1] / "eval" / "data" / "shakespeare_excerpt.txt").read_text()
    tok = train_bpe_tokenizer(text, vocab_size=300)
    filler = tok(text[:20000], add_special_tokens=False)["input_ids"]
    assert facts_for_length(16384) == 8 and facts_for_length(1000) == 4
    docs = retrieval_documents(tok, filler, 12, 3000, seed=2)
    def pattern(template: str) -> re.Pattern:
        return re.compile(re.escape(template).replace(r"\{k\}", r"(?P<k>[a-z]+-[a-z]+)", 1)
                          .replace(r"\{k\}", r"(?P=k)").replace(r"\{v\}", r"(?P<v>\d+)"))

    fact_res = [pattern(f) for f, _ in TEMPLATES]
    ask_res = [pattern(q + " {v}.") for _, q in TEMPLATES]
    n_questions = []
    for d in docs:
        s = tok.decode(d)
        facts = {m["k"]: (m["v"], m.end()) for rx in fact_res for m in rx.finditer(s)}
        asks = {m["k"]: (m["v"], m.start()) for rx in ask_res for m in rx.finditer(s)}
        assert facts and asks.keys() == facts.keys(), (facts, asks)
        assert all(asks[k][0] == facts[k][0] for k in facts)  # each answer is its own fact's value
        assert min(p for _, p in asks.values()) > max(p for _, p in facts.values())  # questions come last
        n_questions.append(len(asks))
    assert max(n_questions) > 1 and len(docs[0]) <= 3000

def test_selection_weight_adds_the_alignment_loss_without_changing_the_forward(recipe_factory, tmp_path, monkeypatch):
    """selection_weight > 0: each step's objective gains weight x the selection alignment loss of every
    sequence in every sparse layer (logged as selection_kl); the lm loss of the first step, which the forward
    alone decides, is the same as without it, and the trained weights differ."""
    import sala.layers.sparse as sparse_mod

    calls = []
    real = sparse_mod.selection_alignment_loss_batch

    def spy(q, k, params, scale, rows):
        calls.append((tuple(q.shape[:2]), rows))
        return real(q, k, params, scale, rows)

    monkeypatch.setattr(sparse_mod, "selection_alignment_loss_batch", spy)
    stage = {"name": "long", "kind": "lm", "steps": 2, "seq_len": 96, "batch_size": 2, "lr": 1e-2,
             "sparse": True, "respect_boundaries": False}
    plain = Trainer(recipe_factory(stages=[stage]), tmp_path / "plain", log=lambda *a: None).run()
    assert not calls and "selection_kl" not in plain["history"][0]
    rec = recipe_factory(stages=[dict(stage, selection_weight=1.0, selection_rows=40)])
    res = Trainer(rec, tmp_path / "sel", log=lambda *a: None).run()
    assert calls == [((2, 96), 40)] * 2  # one sparse layer, its 2 rows in one call a step, 2 steps
    kls = [r["selection_kl"] for r in res["history"]]
    assert all(k > 0 and k == k for k in kls)
    assert res["history"][0]["loss"] == pytest.approx(plain["history"][0]["loss"], rel=1e-6)
    a, b = _final(tmp_path / "plain"), _final(tmp_path / "sel")
    q_key = next(n for n in a if "layers.0.self_attn.q_proj" in n)
    assert not torch.equal(a[q_key], b[q_key])


@pytest.mark.parametrize("over,match", [
    ({"stages": [{"name": "a", "kind": "align", "trainable": "lightning", "steps": 1, "seq_len": 32, "batch_size": 1,
                  "lr": 1e-3, "selection_weight": 0.5}]}, "align"),
    ({"stages": [{"name": "l", "kind": "lm", "steps": 1, "seq_len": 32, "batch_size": 1, "lr": 1e-3,
                  "selection_weight": -1.0}]}, "selection_weight"),
    ({"stages": [{"name": "l", "kind": "lm", "steps": 1, "seq_len": 32, "batch_size": 1, "lr": 1e-3,
                  "selection_weight": 0.5, "selection_rows": 0}]}, "selection_rows"),
    ({"gradient_checkpointing": True, "stages": [{"name": "l", "kind": "lm", "steps": 1, "seq_len": 32,
                                                  "batch_size": 1, "lr": 1e-3, "selection_weight": 0.5}]},
     "gradient_checkpointing"),
])
def test_selection_settings_are_checked(recipe_factory, over, match):
    from sala.train.recipe import RecipeError

    with pytest.raises(RecipeError, match=match):
        recipe_factory(**over)
