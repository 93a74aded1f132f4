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
