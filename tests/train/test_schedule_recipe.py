import math

import pytest

from sala.train.recipe import RecipeError, load_recipe, parse_recipe
from sala.train.schedule import lr_at


def test_warmup_and_constant():
    assert [lr_at(s, 10, 1.0, "constant", warmup=4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_wsd_is_flat_then_decays_to_final():
    lrs = [lr_at(s, 10, 1.0, "wsd", warmup=2, final_lr=0.01, decay_fraction=0.3) for s in range(10)]
    assert lrs[2:7] == [1.0] * 5
    assert lrs[7] > lrs[8] > lrs[9] and math.isclose(lrs[9], 0.01)
    lin = [lr_at(s, 10, 1.0, "wsd", final_lr=0.0, decay_fraction=0.5, decay_shape="linear") for s in range(10)]
    assert lin[5:] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0])


def test_exponential_decay_matches_release_shape():
    # the release: 7.5e-3 -> 3.75e-4 exponentially; equal ratios between consecutive steps
    lrs = [lr_at(s, 5, 7.5e-3, "exp", final_lr=3.75e-4) for s in range(5)]
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert ratios == pytest.approx([ratios[0]] * 4)
    assert lrs[-1] == pytest.approx(3.75e-4)


def test_cosine_end_points():
    assert lr_at(9, 10, 1.0, "cosine", final_lr=0.1) == pytest.approx(0.1)
    assert lr_at(0, 1000, 1.0, "cosine", final_lr=0.1) == pytest.approx(1.0, abs=1e-5)


def test_bundled_recipes_parse():
    tiny = load_recipe("cpu_tiny")
    assert [s.kind for s in tiny.stages] == ["align", "distill", "lm", "lm", "lm"]
    assert tiny.stages[-1].sparse and tiny.stages[-1].seq_len > tiny.stages[0].seq_len
    gpu = load_recipe("gpu_smollm2")
    assert gpu.teacher == "default" and gpu.stages[0].kind == "align"


def test_recipe_errors_name_the_key():
    with pytest.raises(RecipeError, match="unknown keys \\['lrr'\\]"):
        parse_recipe({"name": "x", "stages": [{"name": "a", "kind": "lm", "steps": 1, "seq_len": 8,
                                               "batch_size": 1, "lr": 1.0, "lrr": 2}]})
    with pytest.raises(RecipeError, match="alignment trains only"):
        parse_recipe({"name": "x", "stages": [{"name": "a", "kind": "align", "steps": 1, "seq_len": 8,
                                               "batch_size": 1, "lr": 1.0, "trainable": "all"}]})
    with pytest.raises(RecipeError, match="no recipe file"):
        load_recipe("nope")
    lm = [{"name": "a", "kind": "lm", "steps": 1, "seq_len": 8, "batch_size": 1, "lr": 1.0}]
    for bad in (-1, 1.5, "16"):
        with pytest.raises(RecipeError, match="sparse_union_lanes"):
            parse_recipe({"name": "x", "sparse_union_lanes": bad, "stages": lm})
    assert parse_recipe({"name": "x", "sparse_union_lanes": 16, "stages": lm}).sparse_union_lanes == 16


def test_text_source_documents(tmp_path):
    from sala.train.data import load_documents

    text = "\n\n".join(f"paragraph {i} " + "word " * 20 for i in range(10))
    (tmp_path / "t.txt").write_text(text)

    class Tok:
        def __call__(self, s, add_special_tokens=False):
            return {"input_ids": [len(w) for w in s.split()]}

    docs = load_documents(f"text:{tmp_path / 't.txt'}", Tok(), doc_chars=300)
    assert 2 <= len(docs) <= 5 and sum(map(len, docs)) == 10 * 22
    assert len(load_documents(f"text:{tmp_path / 't.txt'}", Tok(), doc_chars=300, max_docs=1)) == 1
