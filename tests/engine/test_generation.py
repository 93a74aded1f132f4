"""The model-agnostic greedy loop (chunked prefill + cached decode) matches transformers' generate()."""

import pytest
import torch

from sala.engine.generation import eos_ids, greedy_generate, prefill


@pytest.mark.parametrize("kind", ["llama", "sala"])
def test_greedy_matches_generate(kind, builders):
    model = builders[kind](211, seed=4).double()
    ids = torch.randint(3, 211, (1, 300), generator=torch.Generator().manual_seed(4))
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                         eos_token_id=None, pad_token_id=0)[0, 300:].tolist()
    for chunk in (None, 64):
        got = greedy_generate(model, ids, 12, eos_token_ids=(), chunk_size=chunk)
        assert got.tokens == ref, chunk
        assert got.prefill_s > 0 and got.decode_s > 0


def test_prefill_last_logits_match_full_forward(builders):
    model = builders["llama"](211, seed=5).double()
    ids = torch.randint(3, 211, (1, 150), generator=torch.Generator().manual_seed(5))
    last, cache = prefill(model, ids, chunk_size=40)
    ref = model(input_ids=ids).logits[:, -1]
    torch.testing.assert_close(last, ref, rtol=1e-10, atol=1e-10)
    assert cache.get_seq_length() == 150


def test_stops_at_eos_and_strips_it(builders):
    model = builders["llama"](211, seed=6)
    ids = torch.randint(3, 211, (1, 20), generator=torch.Generator().manual_seed(6))
    free = greedy_generate(model, ids, 6, eos_token_ids=())
    stop = free.tokens[2]
    got = greedy_generate(model, ids, 6, eos_token_ids=[stop])
    assert got.tokens == free.tokens[: free.tokens.index(stop)]


def test_eos_ids_collects_config_and_tokenizer(tokenizer, builders):
    model = builders["llama"](len(tokenizer))
    assert eos_ids(model, tokenizer) == [2]


def test_chunks_below_dense_len_do_not_change_a_sala_prefill():
    """A 128-token chunk on a model with dense_len 512 would route the first positions through dense attention;
    the prefill and the perplexity window raise it to dense_len, so both equal the prompt in one piece."""
    from sala.engine.generation import branch_safe_chunk
    from sala.eval.perplexity import window_nll, window_nll_unchunked
    from sala.testing import make_model, random_ids, small_config

    sparse = dict(kernel_size=32, kernel_stride=16, init_blocks=1, block_size=64, window_size=64, topk=2, dense_len=512)
    model = make_model(small_config(sparse_config=sparse, prefill_chunk_tokens=None)).double()
    ids = random_ids(model.config, 1, 700)  # 11 blocks, 5 selected: sparse differs from dense
    assert branch_safe_chunk(model, 128) == 512 and branch_safe_chunk(model, 1024) == 1024
    assert branch_safe_chunk(model, None) is None
    last, _ = prefill(model, ids, chunk_size=128)  # 1.9e-4 off without the rule
    ref = model(input_ids=ids, use_cache=False).logits[:, -1]
    torch.testing.assert_close(last, ref, rtol=1e-10, atol=1e-10)
    got, n = window_nll(model, ids, score_tokens=200, chunk_size=128)  # 7.7e-4 off without the rule
    want, m = window_nll_unchunked(model, ids, score_tokens=200)
    assert n == m == 200
    assert abs(got - want) < 1e-10 * abs(want)
