"""The needle-selection diagnostic on a tiny SALA model whose sparse path engages from 256 tokens."""

import pytest
import torch

from sala.eval.haystack import Haystack
from sala.eval.selection import needle_selection, needle_token_span
from sala.eval.tasks import generate_samples


@pytest.fixture(scope="module")
def samples(tokenizer, corpus_text):
    return generate_samples("passkey", tokenizer, Haystack(corpus_text, tokenizer), 700, 3, seed=5,
                            depths=[0.0, 0.5, 1.0])


def test_span_covers_the_needle(tokenizer, samples):
    for s in samples:
        a, b = needle_token_span(tokenizer, s.prompt, s.needles[0])
        assert 0 < a < b <= len(s.input_ids)
        assert s.answers[0] in tokenizer.decode(s.input_ids[a:b])


def test_selection_rows_are_consistent(tokenizer, samples, builders):
    model = builders["sala"](len(tokenizer), seed=3)
    sparse = [l.self_attn for l in model.model.layers if hasattr(l.self_attn, "params")]
    bs, window = sparse[0].params.block_size, sparse[0].params.window_size
    for s in samples:
        span = needle_token_span(tokenizer, s.prompt, s.needles[0])
        rows = needle_selection(model, torch.tensor([s.input_ids]), span, chunk_size=256)
        n_blocks = -(-len(s.input_ids) // bs)
        assert len(rows) == len(sparse) * sparse[0].num_kv_heads
        for r in rows:
            assert 1 <= r["rank"] <= r["n_blocks"] == n_blocks
            assert not r["selected"] or r["rank"] <= r["n_selected"]
            if r["rank"] <= r["n_selected"] - 1:  # strictly inside the top-k (no tie at the edge): chosen
                assert r["selected"]
        if span[0] >= len(s.input_ids) - window:  # inside the forced local window: always selected, rank 1
            assert all(r["selected"] and r["rank"] == 1 for r in rows)
    # the model is left as it was: no capture dict stays attached
    assert all(a.capture is None for a in sparse)


def test_dense_model_is_refused(builders, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="no sparse"):
        needle_selection(llama, torch.tensor([[1, 2, 3]]), (0, 1))


# ------------------------------------------------------------------ dense_attention_only and needle_study
def _sparse_modules(model):
    from sala.layers.sparse import SparseAttention

    return [m for m in model.modules() if isinstance(m, SparseAttention)]


def test_dense_attention_only_matches_a_dense_configured_model_and_restores(tokenizer, samples, builders):
    from sala.eval.selection import dense_attention_only
    from sala.layers.sparse import DENSE_ALWAYS
    from sala.modeling import SALAForCausalLM

    model = builders["sala"](len(tokenizer), seed=4)
    layers = _sparse_modules(model)
    layers[0].dense_len = -1  # per-layer values come back, not one shared value
    before = [m.dense_len for m in layers]
    ids = torch.tensor([samples[1].input_ids])  # 700 tokens: past dense_len (256)
    cfg = model.config.to_dict()
    cfg["sparse_config"] = dict(cfg["sparse_config"], dense_len=1 << 30)
    dense = SALAForCausalLM(type(model.config)(**cfg)).eval()
    dense.load_state_dict(model.state_dict())
    with torch.no_grad():
        sparse_logits = model(ids).logits
        with dense_attention_only(model) as m:
            assert m is model and all(l.dense_len == DENSE_ALWAYS for l in layers)
            dense_logits = model(ids).logits
        ref = dense(ids).logits
    assert [m.dense_len for m in layers] == before
    torch.testing.assert_close(dense_logits, ref)  # the same as a model configured to attend densely
    assert (dense_logits - sparse_logits).abs().max() > 1e-3  # and not what the sparse path computes
    # restored after an error inside the block too
    with pytest.raises(RuntimeError, match="boom"):
        with dense_attention_only(model):
            raise RuntimeError("boom")
    assert [m.dense_len for m in layers] == before


def test_needle_study_real_model_rows_and_summary(tokenizer, corpus_text, builders):
    """A random tiny model: the structure, and the summary as means over its rows; below dense_len (200 < 256)
    nothing is selected and the selection fields are None."""
    from sala.eval.selection import needle_study

    model = builders["sala"](len(tokenizer), seed=3)
    before = [m.dense_len for m in _sparse_modules(model)]
    res = needle_study(model, tokenizer, corpus_text, [200, 700], 3, chunk_size=256, seed=5, max_new_tokens=3)
    assert [m.dense_len for m in _sparse_modules(model)] == before
    rows, summ = res["rows"], res["summary"]
    assert len(rows) == 6 and [s["length"] for s in summ] == [200, 700] and res["dense_len"] == [256]
    for r in rows:
        assert 0.0 <= r["correct_sparse"] <= 1.0 and 0.0 <= r["correct_dense"] <= 1.0
        if r["length"] == 200:
            assert not r["sparse_path"] and r["selected_frac"] is None and r["median_rank"] is None
            assert r["per_layer"] == [] and r["correct_dense"] == r["correct_sparse"]
        else:
            assert r["sparse_path"] and r["n_pairs"] == len(r["per_layer"]) == 2 * 2  # 2 sparse layers x 2 groups
            assert r["selected_frac"] == pytest.approx(sum(p["selected"] for p in r["per_layer"]) / 4, abs=1e-4)
            assert 1 <= r["median_rank"] <= r["per_layer"][0]["n_blocks"]
    assert [r["depth"] for r in rows[:3]] == [0.0, 0.5, 1.0]
    low, high = summ
    assert low["sparse_path"] is False and low["selected_share"] is None
    assert low["acc_selected"] is None and low["acc_not_selected"] is None and low["median_rank"] is None
    assert high["sparse_path"] is True and 0.0 <= high["selected_share"] <= 1.0
    for s in summ:
        sub = [r for r in rows if r["length"] == s["length"]]
        assert s["acc_sparse"] == pytest.approx(sum(r["correct_sparse"] for r in sub) / 3)
        assert s["acc_dense"] == pytest.approx(sum(r["correct_dense"] for r in sub) / 3)


def test_needle_study_summary_separates_the_causes(tokenizer, corpus_text, builders, monkeypatch):
    """With answers scripted (right with dense attention; with the sparse path right only for even samples),
    the summary's accuracies, shares and miss counts are the ones the rows imply."""
    import sala.eval.selection as sel
    from sala.layers.sparse import DENSE_ALWAYS

    model = builders["sala"](len(tokenizer), seed=3)
    layers = _sparse_modules(model)

    def scripted(model_, tok, sample, eos, chunk):
        dense = all(m.dense_len == DENSE_ALWAYS for m in layers)
        return (f"It is {sample.answers[0]}." if dense or sample.index % 2 == 0 else "It is 1.", None)

    monkeypatch.setattr(sel, "answer", scripted)
    res = sel.needle_study(model, tokenizer, corpus_text, [200, 700], 4, chunk_size=None, seed=5)
    low, high = res["summary"]
    # depths 0, 1/3, 2/3, 1: even samples (right) are depths 0 and 2/3
    assert low["acc_sparse"] == high["acc_sparse"] == 0.5
    assert high["acc_dense"] == 1.0 and low["acc_dense"] == 0.5  # below dense_len the dense answer is the same run
    assert high["acc_shallow"] == 0.5 and high["acc_deep"] == 0.5
    assert high["misses"]["total"] == 2 and high["misses"]["dense_also_wrong"] == 0
    assert low["misses"] == {"total": 2, "dense_also_wrong": 2, "not_selected": 0, "selected": 0}
    rows = [r for r in res["rows"] if r["length"] == 700]
    hit = [r for r in rows if r["selected_frac"] > 0.5]
    assert high["selected_share"] == len(hit) / 4
    assert high["misses"]["selected"] == sum(r["index"] % 2 == 1 for r in hit)
    assert high["misses"]["not_selected"] == 2 - high["misses"]["selected"]
    exp = lambda rs: sum(r["index"] % 2 == 0 for r in rs) / len(rs) if rs else None  # noqa: E731
    assert high["acc_selected"] == exp(hit) and high["acc_not_selected"] == exp([r for r in rows if r not in hit])


def test_summary_table_and_log_line():
    from sala.eval.selection import format_summary, summarize_length, summary_table

    def row(i, depth, ok_s, ok_d, frac, steps):
        return {"length": 4096, "index": i, "n_tokens": 4090, "depth": depth, "sparse_path": True,
                "correct_sparse": ok_s, "correct_dense": ok_d, "selected_frac": frac, "median_rank": 3.0,
                "step_selected_frac": [frac] + steps}

    s = summarize_length([row(0, 0.0, 0.0, 1.0, 0.25, [0.9]), row(1, 0.3, 1.0, 1.0, 0.75, [0.25]),
                          row(2, 0.6, 0.0, 0.0, 1.0, [1.0]), row(3, 0.9, 1.0, 1.0, 0.5, [0.6])])
    assert s["acc_sparse"] == 0.5 and s["acc_dense"] == 0.75 and s["selected_share"] == 0.5
    assert s["acc_selected"] == 0.5 and s["acc_not_selected"] == 0.5  # selected: 1 (right), 2 (wrong)
    assert s["acc_shallow"] == 0.5 and s["acc_deep"] == 0.5
    assert s["misses"] == {"total": 2, "dense_also_wrong": 1, "not_selected": 1, "selected": 1}
    # every answer token selects the needle only in sample 2 (row 1 loses it at its second token)
    assert s["selected_every_step_share"] == 0.25 and s["acc_selected_every_step"] == 0.0
    assert s["acc_not_every_step"] == 2 / 3
    lines = summary_table([s], lambda n: f"{n // 1024}K")
    assert lines[2] == "| 4K | 50% | 75% | 50% | 50% | 50% | 50% | 50% | 25% | 0% | 67% |"
    assert "2 wrong: 1 not selected, 1 selected, 1 also wrong dense" in format_summary(s)


def test_selection_topk_changes_the_budget_and_restores(tokenizer, samples, builders):
    """A budget covering every block attends like dense attention; a small one does not; the layers' own
    settings come back, also after an error; a budget below one block is refused."""
    from sala.eval.selection import dense_attention_only, selection_topk

    model = builders["sala"](len(tokenizer), seed=4)
    layers = _sparse_modules(model)
    before = [m.params for m in layers]
    ids = torch.tensor([samples[1].input_ids])  # 700 tokens: past dense_len (256), 11 blocks of 64
    with torch.no_grad():
        with dense_attention_only(model):
            dense = model(ids).logits
        with selection_topk(model, 64) as m:
            assert m is model and all(l.params.topk == 64 for l in layers)
            everything = model(ids).logits
        with selection_topk(model, 1):
            narrow = model(ids).logits
    assert [m.params for m in layers] == before
    torch.testing.assert_close(everything, dense, atol=1e-4, rtol=1e-4)
    assert (narrow - dense).abs().max() > 1e-3
    with pytest.raises(RuntimeError, match="boom"):
        with selection_topk(model, 2):
            raise RuntimeError("boom")
    assert [m.params for m in layers] == before
    with pytest.raises(ValueError, match="topk"):
        with selection_topk(model, 0):
            pass


def test_topk_probe_asks_the_needle_studys_questions_under_each_budget(tokenizer, corpus_text, builders, monkeypatch):
    """Scripted answers (right when the active budget is at least 4 blocks, for even samples only): the probe's
    accuracies follow the budget, each budget sees the needle study's samples, and the budget is restored."""
    import sala.eval.selection as sel

    model = builders["sala"](len(tokenizer), seed=3)
    own = [m.params.topk for m in _sparse_modules(model)]
    seen = []

    def scripted(m, tok, sample, eos, chunk):
        topk = _sparse_modules(m)[0].params.topk
        seen.append((topk, sample.prompt))
        return 1.0 if topk >= 4 and sample.index % 2 == 0 else 0.0

    monkeypatch.setattr(sel, "sample_score_of", scripted)
    res = sel.topk_probe(model, tokenizer, corpus_text, 700, 4, [2, 8], chunk_size=256, seed=5, max_new_tokens=3)
    assert res == [{"topk": 2, "length": 700, "samples": 4, "acc_sparse": 0.0},
                   {"topk": 8, "length": 700, "samples": 4, "acc_sparse": 0.5}]
    assert [m.params.topk for m in _sparse_modules(model)] == own
    prompts = [p for t, p in seen if t == 2]
    assert prompts == [p for t, p in seen if t == 8] and len(set(prompts)) == 4
    study = sel.needle_study(model, tokenizer, corpus_text, [700], 4, chunk_size=256, seed=5, max_new_tokens=3)
    assert len(study["rows"]) == 4
    assert [p for _, p in seen[8:]] == prompts  # the study's sparse answers: the same questions


def test_selection_follows_every_answer_token(tokenizer, samples, builders, corpus_text):
    """Teacher-forced answer tokens after the prompt: one set of (layer, group) rows per step, step 0 the same
    as without them; the needle study records the share per step for the answer's tokens."""
    from sala.eval.selection import answer_prefix, needle_study

    model = builders["sala"](len(tokenizer), seed=3)
    s = samples[1]
    span = needle_token_span(tokenizer, s.prompt, s.needles[0])
    ids = torch.tensor([s.input_ids])
    alone = needle_selection(model, ids, span, chunk_size=256)
    follow = tokenizer(" " + s.answers[0], add_special_tokens=False)["input_ids"]
    steps = needle_selection(model, ids, span, chunk_size=256, follow=follow)
    n = len(alone)
    assert len(steps) == n * (len(follow) + 1) and [r["step"] for r in steps[::n]] == list(range(len(follow) + 1))
    assert steps[:n] == alone  # step 0 alone is the same query
    assert all(r["n_blocks"] >= alone[0]["n_blocks"] for r in steps)
    # the shortest generated prefix holding the answer
    toks = tokenizer("The key is " + s.answers[0] + ". Done", add_special_tokens=False)["input_ids"]
    pre = answer_prefix(tokenizer, toks, s.answers[0])
    assert s.answers[0] in tokenizer.decode(pre) and s.answers[0] not in tokenizer.decode(pre[:-1])
    assert answer_prefix(tokenizer, toks[:2], "nowhere") == toks[:2]
    res = needle_study(model, tokenizer, corpus_text, [700], 2, chunk_size=256, seed=5, max_new_tokens=6)
    for r in res["rows"]:
        assert len(r["step_selected_frac"]) >= 1 and r["step_selected_frac"][0] == r["selected_frac"]
        assert len(r["step_per_layer"]) == (len(r["step_selected_frac"]) - 1) * r["n_pairs"]
