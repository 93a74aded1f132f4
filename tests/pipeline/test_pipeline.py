"""The conversion pipeline end to end on a tiny saved Llama teacher with a BPE tokenizer trained in-test:
every phase, the resume across calls (a phase budget, then a deadline), and the report's schema."""

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

from sala.pipeline import PHASES, Pipeline, ProfileError, load_profile, parse_profile
from sala.testing import train_bpe_tokenizer

TEXT = Path(__file__).parents[1] / "eval" / "data" / "shakespeare_excerpt.txt"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_bpe_tokenizer(TEXT.read_text(encoding="utf-8"), vocab_size=300)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    d = tmp_path_factory.mktemp("teacher")
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def tiny_profile(teacher: Path, **over) -> dict:
    stage = {"kind": "distill", "trainable": "all", "steps": 2, "seq_len": 64, "batch_size": 2, "lr": 1e-3}
    raw = {
        "name": "tiny", "teacher": str(teacher), "data": f"text:{TEXT}", "data_options": {"doc_chars": 4000},
        "haystack": str(TEXT), "convert": {"sparse": {"kernel_size": 8, "kernel_stride": 4, "block_size": 16,
                                                     "window_size": 32, "topk": 2, "init_blocks": 1}},
        "halo": {"align_steps": 3, "seq_len": 64, "batch_size": 2, "probe_rows": 2},
        "compare": {"stage": {"name": "distill", **stage}, "tasks": ["passkey"], "lengths": [320], "samples": 1},
        "stages": [{"name": "distill", **stage},
                   {"name": "lm", "kind": "lm", "steps": 1, "seq_len": 512, "batch_size": 2, "lr": 1e-3,
                    "retrieval_fraction": 0.5},
                   {"name": "long", "kind": "lm", "steps": 1, "seq_len": 256, "batch_size": 1, "lr": 1e-3,
                    "sparse": True, "sparse_dense_len": 128, "selection_weight": 0.5}],
        "eval": {"tasks": ["passkey"], "lengths": [320], "samples": 1, "max_new_tokens": 4, "ppl_lengths": [128],
                 "ppl_windows": 1, "ppl_score_tokens": 32, "speed_lengths": [128], "speed_decode_tokens": 2,
                 "chunk_size": 0},
    }
    raw.update(over)
    return raw


def test_pipeline_runs_every_phase_resumes_and_reports(teacher_dir, tmp_path):
    prof = parse_profile(tiny_profile(teacher_dir))
    out = tmp_path / "run"
    quiet = lambda *a, **k: None  # noqa: E731
    first = Pipeline(prof, out, device="cpu", log=quiet).run(until="halo")
    assert not first["finished"] and first["done"] == ["teacher_eval", "halo"]
    # a deadline already passed: nothing runs, nothing is lost
    stopped = Pipeline(prof, out, device="cpu", log=quiet).run(deadline=time.time() - 1)
    assert not stopped["finished"] and stopped["next"] == "compare"
    res = Pipeline(prof, out, device="cpu", log=quiet).run()
    assert res["finished"] and res["done"] == list(PHASES)

    state = json.loads((out / "pipeline.json").read_text())
    assert state["commands"] == 3
    s = json.loads((out / "report" / "summary.json").read_text())
    for key in ("card", "teacher", "train_tokens", "train_minutes", "ppl", "passkey", "recall", "layers"):
        assert key in s, key
    assert set(s["recall"]) == {"halo", "uniform", "all_linear"}
    assert all(0.0 <= v <= 1.0 for v in s["recall"].values())
    assert set(s["passkey"]["teacher"]) == {"320"} and set(s["passkey"]["student"]) == {"320"}
    assert s["ppl"]["teacher"] > 1 and s["ppl"]["student"] > 1
    from sala.convert.layer_map import n_attention, uniform_layers

    assert s["layers"]["uniform"] == uniform_layers(4, 0.25, True) and len(s["layers"]["halo"]) == n_attention(4, 0.25)
    # tokens: align 3x2x64 + three compare runs 2x2x64 + student 2x2x64 + 1x2x512 + 1x1x256
    assert s["train_tokens"] == 3 * 2 * 64 + 3 * 2 * 2 * 64 + 2 * 2 * 64 + 2 * 512 + 256
    scores = json.loads((out / "compare" / "scores.json").read_text())
    assert scores["all_linear"]["attention_layers"] == [] and scores["uniform"]["attention_layers"] == s["layers"]["uniform"]
    # the student started from the aligned lightning layers of HALO stage 1
    conv = json.loads((out / "student" / "converted" / "conversion.json").read_text())
    assert conv["init_lightning_layers"] and conv["attention_layers"] == s["layers"]["halo"]
    for name in ("summary.md", "eval_report.md", "halo_sweep.png", "training.png", "accuracy_vs_length.png"):
        assert (out / "report" / name).is_file(), name
    md = (out / "report" / "summary.md").read_text()
    assert "passkey at 320" in md and "| uniform |" in md
    # the long stage's selection alignment loss: logged per step and summed up in the report
    assert all("selection_kl" in r for r in map(json.loads, (out / "student" / "log.jsonl").read_text().splitlines())
               if r["stage"] == "long")
    assert re.search(r"Selection alignment KL.*: student long \d+\.\d+ -> \d+\.\d+\.", md)
    # each passkey rate with its 95% Wilson interval over the profile's sample count
    assert re.search(r"\| passkey at 320 \| \d+% \[\d+-\d+\] \| \d+% \[\d+-\d+\] \|", md)
    assert json.loads((out / "report" / "summary.json").read_text())["passkey_samples"] == prof.eval.samples
    # the report needs only the run's small files (what bench/convert_gpu.sh brings back): rebuilt from a
    # copy without weights, checkpoints or report, on another machine
    light = tmp_path / "light"
    shutil.copytree(out, light, ignore=shutil.ignore_patterns("*.safetensors", "checkpoints", "report"))
    st = json.loads((light / "pipeline.json").read_text())
    st["done"].pop("report")
    assert set(st["phase_devices"]) == set(PHASES) - {"report"}
    # measured on a GPU: the report made here names that card, not this machine
    st["device"], st["phase_devices"] = "NVIDIA H200", {k: "NVIDIA H200" for k in st["phase_devices"]}
    (light / "pipeline.json").write_text(json.dumps(st))
    assert Pipeline(prof, light, device="cpu", log=quiet).run()["finished"]
    s2 = json.loads((light / "report" / "summary.json").read_text())
    for key in ("ppl", "passkey", "recall", "layers", "train_tokens"):
        assert s2[key] == s[key], key
    assert s2["card"] == "NVIDIA H200" and "Card: NVIDIA H200." in (light / "report" / "summary.md").read_text()
    st = json.loads((light / "pipeline.json").read_text())  # phases measured on two cards: each named
    st["done"].pop("report")
    st["phase_devices"]["student_eval"] = "NVIDIA H100"
    (light / "pipeline.json").write_text(json.dumps(st))
    assert Pipeline(prof, light, device="cpu", log=quiet).run()["finished"]
    card = json.loads((light / "report" / "summary.json").read_text())["card"]
    assert "NVIDIA H100 (student_eval)" in card and "NVIDIA H200 (halo)" in card


def test_profile_errors_name_the_problem(teacher_dir, tmp_path):
    with pytest.raises(ProfileError, match="unknown keys"):
        parse_profile(tiny_profile(teacher_dir, learning_rate=1))
    bad = tiny_profile(teacher_dir)
    bad["stages"][0]["kind"] = "nope"
    with pytest.raises(ProfileError, match="kind"):
        parse_profile(bad)
    with pytest.raises(ProfileError, match="bundled profiles"):
        load_profile("no_such_profile")
    bad = tiny_profile(teacher_dir)
    bad["halo"] = dict(bad.get("halo", {}), noise_floor=-1)
    with pytest.raises(ProfileError, match="noise_floor"):
        parse_profile(bad)
    with pytest.raises(ProfileError, match="sparse_union_lanes=-2 must be"):  # at parse time, not at training
        parse_profile(tiny_profile(teacher_dir, sparse_union_lanes=-2))
    prof = parse_profile(tiny_profile(teacher_dir))
    Pipeline(prof, tmp_path / "r", device="cpu", log=lambda *a: None)._save()
    other = parse_profile(tiny_profile(teacher_dir, seed=3))
    with pytest.raises(RuntimeError, match="another profile"):
        Pipeline(other, tmp_path / "r", device="cpu", log=lambda *a: None)
    # a setting spelled out at its default value is the same profile (as is one a newer sala adds with a
    # default): the run folder continues
    same = tiny_profile(teacher_dir)
    same["eval"] = dict(same["eval"], diagnose_topk=[])
    Pipeline(parse_profile(same), tmp_path / "r", device="cpu", log=lambda *a: None)
    from sala.pipeline.run import _set_fields

    hashed = _set_fields(prof)
    assert "diagnose_topk" not in hashed["eval"] and hashed["teacher"] == str(teacher_dir)
    changed = tiny_profile(teacher_dir)
    changed["eval"] = dict(changed["eval"], diagnose_lengths=[320], diagnose_topk=[4])
    with pytest.raises(RuntimeError, match="another profile"):
        Pipeline(parse_profile(changed), tmp_path / "r", device="cpu", log=lambda *a: None)


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_bundled_profiles_parse(name):
    prof = load_profile(name)
    assert prof.teacher == "default" and prof.stages and prof.compare.stage


def test_a_stage_of_only_retrieval_rows_runs(teacher_dir, tmp_path):
    """retrieval_fraction 1.0 (or one row rounded up to one retrieval row): no row comes from the text stream."""
    from sala.train.trainer import Trainer

    prof = parse_profile(tiny_profile(teacher_dir))
    stage = {"name": "lm", "kind": "lm", "steps": 2, "seq_len": 512, "batch_size": 1, "lr": 1e-3,
             "retrieval_fraction": 1.0}
    res = Trainer(prof.recipe("only_retrieval", "uniform", [stage]), tmp_path / "r", device="cpu",
                  log=lambda *a: None).run()
    assert res["finished"] and len(res["history"]) == 2
    assert all(r["targets"] > 400 for r in res["history"])  # one full 512-token retrieval row per step


def test_student_diagnosis_beyond_dense_len(teacher_dir, tmp_path):
    """diagnose_lengths on: the student_eval phase writes eval/student_diagnosis.json (a length below and one
    above the student's dense_len, 256), the report gets its section and summary.json its 'diagnosis'; a
    report without the file says nothing about it; a misspelled key is an error."""
    from sala.pipeline.report import write_pipeline_report

    raw = tiny_profile(teacher_dir)
    raw["convert"]["sparse"]["dense_len"] = 256
    raw["eval"].update(diagnose_lengths=[240, 320], diagnose_samples=2, diagnose_topk=[1, 64])
    prof = parse_profile(raw)
    out = tmp_path / "run"
    lines = []
    pipe = Pipeline(prof, out, device="cpu", log=lines.append)
    assert pipe.run()["finished"]
    d = json.loads((out / "eval" / "student_diagnosis.json").read_text())
    assert not (out / "eval" / "student_diagnosis.partial.json").exists()
    assert d["dense_len"] == [256] and [s["length"] for s in d["summary"]] == [240, 320] and len(d["rows"]) == 4
    below, above = d["summary"]
    assert not below["sparse_path"] and below["selected_share"] is None
    assert above["sparse_path"] and above["selected_share"] is not None
    assert all(r["n_pairs"] > 0 for r in d["rows"] if r["length"] == 320)
    assert sum("needle study 320" in line for line in lines) == 1
    # the budget probe: every (length, topk), in order; 64 blocks cover the whole 320-token context, so that
    # row answers as dense attention does; below dense_len every budget answers as the model does
    probe = d["topk_probe"]
    assert [(r["length"], r["topk"], r["samples"]) for r in probe] == [(240, 1, 2), (240, 64, 2), (320, 1, 2), (320, 64, 2)]
    assert probe[3]["acc_sparse"] == above["acc_dense"]
    assert probe[0]["acc_sparse"] == probe[1]["acc_sparse"] == below["acc_sparse"]
    assert sum("topk probe at 320" in line for line in lines) == 1
    s = json.loads((out / "report" / "summary.json").read_text())
    assert [r["length"] for r in s["diagnosis"]["summary"]] == [240, 320]
    md = (out / "report" / "summary.md").read_text()
    assert "## Retrieval beyond dense_len: selection vs use" in md
    assert "| length | sparse acc | dense acc | needle selected (share of samples) |" in md
    assert "| 320 |" in md and "| 240 | " in md and "- (dense path)" in md
    assert "### Selection budget probe" in md and "| 2 (trained) |" in md and "| 64 |" in md
    assert s["diagnosis"]["topk"] == 2 and len(s["diagnosis"]["topk_probe"]) == 4
    # resumable: the file is kept, not recomputed
    stamp = (out / "eval" / "student_diagnosis.json").stat().st_mtime_ns
    assert pipe._diagnose("student", str(out / "student" / "final"), None) == out / "eval" / "student_diagnosis.json"
    assert (out / "eval" / "student_diagnosis.json").stat().st_mtime_ns == stamp
    # a call stopped between lengths keeps the finished ones; the next call computes only the rest
    final, part = out / "eval" / "student_diagnosis.json", out / "eval" / "student_diagnosis.partial.json"
    kept = dict(d, rows=[dict(r, marker=1) for r in d["rows"] if r["length"] == 240], summary=[below],
                topk_probe=[dict(r, marker=1) for r in probe if r["length"] == 240])
    final.unlink()
    part.write_text(json.dumps(kept))
    assert pipe._diagnose("student", str(out / "student" / "final"), time.time() - 1) is None
    assert pipe._diagnose("student", str(out / "student" / "final"), None) == final
    again = json.loads(final.read_text())
    assert [r.get("marker") for r in again["rows"]] == [1, 1, None, None] and again["summary"] == d["summary"]
    assert [r.get("marker") for r in again["topk_probe"]] == [1, 1, None, None]
    assert not part.exists()
    # off (no file): no section, no key
    final.unlink()
    write_pipeline_report(pipe, tmp_path / "report_off")
    assert "diagnosis" not in json.loads((tmp_path / "report_off" / "summary.json").read_text())
    assert "dense_len: selection vs use" not in (tmp_path / "report_off" / "summary.md").read_text()
    bad = tiny_profile(teacher_dir)
    bad["eval"]["diagnose_length"] = [320]
    with pytest.raises(ProfileError, match="unknown keys"):
        parse_profile(bad)
    bad["eval"] = dict(tiny_profile(teacher_dir)["eval"], diagnose_lengths=[320], diagnose_samples=0)
    with pytest.raises(ProfileError, match="diagnose"):
        parse_profile(bad)
    for lengths, topk in (([], [128]), ([320], [0])):
        bad["eval"] = dict(tiny_profile(teacher_dir)["eval"], diagnose_lengths=lengths, diagnose_topk=topk)
        with pytest.raises(ProfileError, match="diagnose_topk"):
            parse_profile(bad)


def test_answer_weight_scales_exactly_the_answer_tokens(teacher_dir, tmp_path):
    """answer_weight: the retrieval rows' answer tokens (and only they) get the weight in the lm loss, so the
    step's loss is the plain one plus (w - 1) x the answers' cross-entropy; the rows are the same tokens."""
    from sala.train.losses import lm_sum
    from sala.train.trainer import Trainer

    prof = parse_profile(tiny_profile(teacher_dir))
    base = {"name": "lm", "kind": "lm", "steps": 1, "seq_len": 512, "batch_size": 1, "lr": 1e-3,
            "retrieval_fraction": 1.0}
    plain = Trainer(prof.recipe("plain", "uniform", [base]), tmp_path / "a", device="cpu", log=lambda *a: None)
    heavy = Trainer(prof.recipe("heavy", "uniform", [{**base, "answer_weight": 8.0}]), tmp_path / "b", device="cpu",
                    log=lambda *a: None)
    rows = []
    for tr in (plain, heavy):
        stage = tr.recipe.stages[0]
        stream, n = tr._retrieval_stream(0, stage, None)
        rows.append((tr, stage, stream.next_batch(n)))
    (tr_a, st_a, batch_a), (tr_b, st_b, batch_b) = rows
    assert torch.equal(batch_a.input_ids, batch_b.input_ids) and batch_a.marks is None
    ids, am, labels, w_plain = tr_a._inputs(batch_a, st_a)
    _, _, _, w = tr_b._inputs(batch_b, st_b)
    assert w_plain is None and set(w.unique().tolist()) == {1.0, 8.0}
    tok = tr_b.tokenizer
    answers = tok.decode(ids[w == 8.0].tolist()).split()
    text = tok.decode(ids[0].tolist())
    assert answers and all(a.isdigit() and text.count(a) >= 2 for a in answers)  # each value: fact + answer
    logits = torch.randn(1, ids.shape[1], len(tok), generator=torch.Generator().manual_seed(0))
    s1, c1 = lm_sum(logits, labels)
    s8, c8 = lm_sum(logits, labels, w)
    ce = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], reduction="none", ignore_index=-100)
    torch.testing.assert_close(s8, s1 + 7.0 * ce[w[0, 1:] == 8.0].sum())
    assert c1 == c8
    assert heavy.run()["finished"]


def test_answer_weight_needs_an_lm_stage_with_retrieval_rows(teacher_dir):
    from sala.train.recipe import RecipeError

    prof = parse_profile(tiny_profile(teacher_dir))
    for bad in ({"kind": "lm", "answer_weight": 4.0},  # no retrieval rows
                {"kind": "distill", "retrieval_fraction": 0.5, "answer_weight": 4.0},
                {"kind": "lm", "retrieval_fraction": 0.5, "answer_weight": 0.0}):
        stage = {"name": "s", "steps": 1, "seq_len": 64, "batch_size": 2, "lr": 1e-3, **bad}
        with pytest.raises(RecipeError, match="answer_weight"):
            prof.recipe("bad", "uniform", [stage])


def test_reuse_takes_unchanged_phases_from_an_earlier_run(teacher_dir, tmp_path):
    """--reuse: a run whose profile changes only the student's stages takes the teacher evaluation and the
    equal-budget comparison from the earlier run (files copied, paths rewritten, the report says so); a changed
    teacher-eval setting measures the teacher again, a changed HALO setting the comparison; a folder that is
    not a run is an error."""
    first = tmp_path / "first"
    assert Pipeline(parse_profile(tiny_profile(teacher_dir)), first, device="cpu", log=lambda *a: None).run()["finished"]
    before = json.loads((first / "pipeline.json").read_text())

    raw = tiny_profile(teacher_dir)
    raw["stages"] = [dict(raw["stages"][0], steps=3)]  # only the student changes, and its diagnosis
    raw["eval"] = dict(raw["eval"], diagnose_lengths=[320], diagnose_samples=1)
    lines = []
    second = tmp_path / "second"
    assert Pipeline(parse_profile(raw), second, device="cpu", log=lines.append, reuse=first).run()["finished"]
    st = json.loads((second / "pipeline.json").read_text())
    assert set(st["reused"]) == {"teacher_eval", "compare"}
    assert st["done"]["compare"] == before["done"]["compare"]
    assert st["done"]["teacher_eval"]["results"] == str(second / "eval" / "teacher.json")
    assert (second / "eval" / "teacher.json").read_text() == (first / "eval" / "teacher.json").read_text()
    assert (second / "compare" / "scores.json").read_text() == (first / "compare" / "scores.json").read_text()
    assert st["seconds"]["teacher_eval"] == before["seconds"]["teacher_eval"]
    assert not any(line == "pipeline: teacher_eval" or line == "pipeline: compare" for line in lines)
    assert "Reused from an earlier run" in (second / "report" / "summary.md").read_text()
    assert json.loads((second / "report" / "summary.json").read_text())["reused"]["compare"]["from"] == str(first)

    raw = tiny_profile(teacher_dir)
    raw["eval"] = dict(raw["eval"], samples=2)  # the teacher evaluation changes
    raw["halo"] = dict(raw["halo"], lr=5e-4)  # the aligned layers the comparison starts from change
    lines = []
    third = Pipeline(parse_profile(raw), tmp_path / "third", device="cpu", log=lines.append, reuse=first)
    assert third.run(until="compare")["done"] == ["teacher_eval", "halo", "compare"]
    assert "reused" not in third.state
    assert any("teacher_eval measured here" in line and "eval" in line for line in lines)
    assert any("compare measured here" in line and "halo" in line for line in lines)

    (first / "eval" / "teacher.json").unlink()  # a reuse folder without a phase's files: measured here
    lines = []
    fifth = Pipeline(parse_profile(tiny_profile(teacher_dir)), tmp_path / "fifth", device="cpu", log=lines.append,
                     reuse=first)
    assert fifth.run(until="teacher_eval")["done"] == ["teacher_eval"] and "reused" not in fifth.state
    assert any("teacher_eval measured here" in line and "missing there" in line for line in lines)

    with pytest.raises(FileNotFoundError, match="not a pipeline run folder"):
        Pipeline(parse_profile(raw), tmp_path / "fourth", device="cpu", reuse=tmp_path)
