import json

import pytest
import torch

from pathlib import Path

from sala.convert.select import RecallCommonProbe, _recall_mask, common_noise_floor, halo_scores, select_attention_layers
from sala.convert.layer_map import parse_layers, uniform_layers


def test_halo_score_formula():
    R = [0.9, 0.5, 0.8, 0.9]
    C = [0.7, 0.69, 0.5, 0.7]
    s = halo_scores(R, C)
    assert s[0] == pytest.approx(0.0) and s[3] == pytest.approx(0.0)
    assert s[1] == pytest.approx(min(50, 0.4 / (0.01 + 1e-10)))  # 40: recall falls, commonsense barely
    assert s[2] == pytest.approx(0.1 / 0.2)
    assert halo_scores([0.1, 0.9], [0.9, 0.9])[0] == 50.0  # capped (C unchanged -> huge ratio)


def test_c_floor_bounds_the_denominator():
    R, C = [0.9, 0.5, 0.8, 0.9], [0.7, 0.6999, 0.5, 0.7]
    assert halo_scores(R, C)[1] == 50.0  # paper: a C loss of 1e-4 makes the ratio explode
    s = halo_scores(R, C, c_floor=0.01)
    assert s[1] == pytest.approx(0.4 / 0.01) and s[2] == pytest.approx(0.1 / 0.2)  # floored / above the floor
    with pytest.raises(ValueError, match="c_floor"):
        halo_scores(R, C, c_floor=-1)


def test_noise_floor_makes_two_gpu_sweeps_agree():
    """The same teacher's sweep in two H200 runs: R and C agree to 0.005, but the paper's score keeps only 4 of
    8 layers in common (C losses of a few tokens in the denominator). Flooring the C loss at ~the paired noise
    of a layer swap (20 of 12,397 tokens) gives both runs the same layers."""
    d = json.loads((Path(__file__).parent / "data" / "halo_sweeps_h200.json").read_text())
    a, b = d["2026-11-29b"], d["2026-11-29c"]

    def choose(run, floor):
        return select_attention_layers(halo_scores(run["R"], run["C"], floor), 0.25, True)

    assert choose(a, 0.0) == a["attention_layers"] and choose(b, 0.0) == b["attention_layers"]
    assert len(set(choose(a, 0.0)) & set(choose(b, 0.0))) == 4
    floor = 20 / d["common_targets"]
    assert choose(a, floor) == choose(b, floor)


def test_common_noise_floor_and_probe_noise():
    rows = [{"C_noise": x} for x in (0.001, 0.004, 0.002)]
    assert common_noise_floor(rows, 0) == 0.0
    assert common_noise_floor(rows, 2.0) == pytest.approx(0.004)  # 2 x the median
    with pytest.raises(ValueError, match="C noise"):
        common_noise_floor([{"R": 1.0}], 1.0)
    with pytest.raises(ValueError, match="noise_floor"):
        common_noise_floor(rows, -1.0)
    # paired noise: sqrt(common tokens whose correctness changed) / common tokens
    docs = [[1, 2, 3, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]
    probe = RecallCommonProbe(docs, 18, 1, eos_id=None)
    n = int(probe.common_t.sum())
    base = torch.zeros_like(probe.common_t)
    hits = base.clone()
    cols = probe.common_t[0].nonzero().flatten()[:4]
    hits[0, cols] = True
    hits[probe.recall_t] = True  # recall tokens do not count
    assert probe.common_noise(hits, base) == pytest.approx(2 / n)


def test_selection_top_quarter_and_forcing():
    scores = [0.0, 5.0, 1.0, 9.0, 0.5, 3.0, 2.0, 0.1]
    assert select_attention_layers(scores, 0.25, force_first_last=False) == [1, 3]
    assert select_attention_layers(scores, 0.25, force_first_last=True) == [0, 7]
    assert select_attention_layers(scores, 0.5, force_first_last=True) == [0, 1, 3, 7]
    assert select_attention_layers([1.0, 1.0, 1.0, 1.0], 0.5, force_first_last=False) == [0, 1]  # ties: lower index


def test_release_like_selection():
    """32 layers, 8 kept with 0 and 31 forced: the six best of the rest fill the slots."""
    scores = [0.0] * 32
    for i, s in zip([9, 16, 17, 22, 29, 30, 5], [9, 8, 7, 6, 5, 4, 3]):
        scores[i] = s
    assert select_attention_layers(scores, 0.25) == [0, 9, 16, 17, 22, 29, 30, 31]


def test_baselines():
    assert uniform_layers(32, 0.25) == [0, 4, 9, 13, 18, 22, 27, 31]
    assert uniform_layers(32, 0.25, force_first_last=False) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert parse_layers("all-linear", 30) == []
    assert parse_layers("uniform", 30) == [0, 4, 8, 12, 17, 21, 25, 29]
    with pytest.raises(ValueError, match="out of range"):
        parse_layers("0,40", 30)


def test_recall_mask():
    #            a  b  c  a  b  d  b  d
    assert _recall_mask([1, 2, 3, 1, 2, 4, 2, 4]) == [False, False, False, False, True, False, False, True]


def test_halo_sweep_end_to_end(tmp_path):
    from sala.train.halo import halo_select

    shape = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2}
    res = halo_select(tmp_path, teacher="random-llama", teacher_shape=shape, data="synthetic",
                      data_options={"n_docs": 32, "min_len": 24, "max_len": 48},
                      align_steps=2, seq_len=32, batch_size=4, probe_rows=4, ratio=0.5, log=lambda *a: None)
    assert len(res["sweep"]) == 4 and res["attention_layers"] == [0, 3]
    assert json.loads((tmp_path / "selection.json").read_text())["attention_layers"] == res["attention_layers"]
    assert "HALO score" in (tmp_path / "sweep.md").read_text()
    assert all(r["C_noise"] >= 0 for r in res["sweep"]) and res["c_floor"] == 0.0  # measured; paper score


def test_halo_sweep_with_noise_floor(tmp_path):
    from sala.train.halo import halo_select

    shape = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2}
    res = halo_select(tmp_path, teacher="random-llama", teacher_shape=shape, data="synthetic",
                      data_options={"n_docs": 32, "min_len": 24, "max_len": 48}, align_steps=2, seq_len=32,
                      batch_size=4, probe_rows=4, ratio=0.5, noise_floor=1.0, log=lambda *a: None)
    noise = sorted(r["C_noise"] for r in res["sweep"])
    assert res["c_floor"] == pytest.approx(noise[len(noise) // 2]) and res["c_floor"] > 0
    assert "C noise" in (tmp_path / "sweep.md").read_text()
    # the sweep changes the model: a converted layer moves R or C away from the teacher's
    base = res["teacher_scores"]
    assert any((r["R"], r["C"]) != (base["R"], base["C"]) for r in res["sweep"])


@pytest.mark.slow
def test_passkey_recall_on_real_teacher():
    """Task-based R (sala.eval passkey) on SmolLM2: the teacher finds short pass keys; a model with its
    layers' attention replaced by untrained lightning layers does not."""
    from sala.convert.select import TaskRecall
    from sala.convert.teacher import fetch_default_teacher, load_teacher
    from sala.convert.transfer import convert_model

    teacher, tok, spec = load_teacher(fetch_default_teacher())
    filler = " ".join(["The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."] * 40)
    rec = TaskRecall(tok, filler, "passkey", length=200, n_samples=1, max_new_tokens=8)
    assert rec(teacher) == 1.0
    broken, _ = convert_model(teacher, spec, [0, 29])
    assert rec(broken) < 1.0
