"""Long cached forwards run in chunks of ``prefill_chunk_tokens`` (at least ``dense_len``) and equal one piece."""

from __future__ import annotations

import pytest
import torch

from sala import ConfigError
from sala.cache import SparseLayerCache
from sala.modeling import CACHE_FIELD
from sala.testing import make_model, random_ids, small_config

SPARSE = dict(kernel_size=32, kernel_stride=16, init_blocks=1, block_size=64, window_size=64, topk=2, dense_len=128)


def _models(chunk):
    """The same weights with chunking off and with ``chunk``."""
    one = make_model(small_config(sparse_config=SPARSE, prefill_chunk_tokens=None))
    chunked = make_model(small_config(sparse_config=SPARSE, prefill_chunk_tokens=chunk))
    chunked.load_state_dict(one.state_dict())
    return one, chunked


def _calls(model):
    """Count the decoder's forwards (one per chunk)."""
    seen = []
    model.model.register_forward_hook(lambda m, a, k, out: seen.append(1), with_kwargs=True)
    return seen


@pytest.mark.parametrize("keep", [0, 1, 150])
def test_chunked_forward_equals_one_piece(keep):
    one, chunked = _models(chunk=128)
    calls = _calls(chunked)
    ids = random_ids(one.config, 1, 400)
    nxt = random_ids(one.config, 1, 3, seed=9)
    with torch.no_grad():
        ref = one(ids, use_cache=True, logits_to_keep=keep)
        got = chunked(ids, use_cache=True, logits_to_keep=keep)
        assert len(calls) == 4  # 128 + 128 + 128 + 16
        assert got.logits.shape == ref.logits.shape == (1, keep or 400, one.config.vocab_size)
        torch.testing.assert_close(got.logits, ref.logits, atol=2e-5, rtol=1e-4)
        sparse = [layer for layer in getattr(got, CACHE_FIELD).layers if isinstance(layer, SparseLayerCache)]
        assert sparse and all(layer.keys[0].data.shape[0] == 400 for layer in sparse)  # reserved once, exactly
        # the caches continue alike
        cont_ref = one(nxt, past_key_values=getattr(ref, CACHE_FIELD), use_cache=True).logits
        cont_got = chunked(nxt, past_key_values=getattr(got, CACHE_FIELD), use_cache=True).logits
    torch.testing.assert_close(cont_got, cont_ref, atol=2e-5, rtol=1e-4)


def test_chunks_are_at_least_dense_len():
    """Chunks shorter than dense_len would send the first positions down the dense branch while one piece
    takes the sparse branch for all of them: the chunk is raised to dense_len, and the outputs agree."""
    sparse = {**SPARSE, "dense_len": 512}
    one = make_model(small_config(sparse_config=sparse, prefill_chunk_tokens=None)).double()
    chunked = make_model(small_config(sparse_config=sparse, prefill_chunk_tokens=128)).double()
    chunked.load_state_dict(one.state_dict())
    calls = _calls(chunked)
    ids = random_ids(one.config, 1, 700)  # 11 blocks, at most 5 selected: sparse differs from dense
    with torch.no_grad():
        ref = one(ids, use_cache=True).logits
        got = chunked(ids, use_cache=True).logits
    assert len(calls) == 2  # 512 + 188, not 128-token chunks
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)


def test_generate_with_chunked_prefill_and_left_padding():
    one, chunked = _models(chunk=128)
    cfg = one.config
    a, b = random_ids(cfg, 1, 260, seed=3), random_ids(cfg, 1, 300, seed=4)
    ids = torch.full((2, 300), cfg.pad_token_id)
    ids[0, 40:], ids[1] = a[0], b[0]
    mask = torch.ones(2, 300, dtype=torch.long)
    mask[0, :40] = 0
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=cfg.pad_token_id)
    with torch.no_grad():
        ref = one.generate(ids, **kw)
        got = chunked.generate(ids, **kw)
    assert torch.equal(got, ref)


def test_no_chunking_for_training_labels_or_short_inputs():
    _, chunked = _models(chunk=128)
    calls = _calls(chunked)
    ids = random_ids(chunked.config, 1, 300)
    with torch.no_grad():
        chunked(ids, labels=ids, use_cache=True)
        chunked(ids, use_cache=False)
        chunked(ids[:, :128], use_cache=True)
    assert len(calls) == 3


def test_bad_chunk_size_is_a_config_error():
    with pytest.raises(ConfigError, match="prefill_chunk_tokens"):
        small_config(prefill_chunk_tokens=0)


def test_transformers_prefill_chunk_size_becomes_sala_chunking():
    """generate(prefill_chunk_size=...) (transformers' knob) runs sala's chunked prefill and changes nothing."""
    one, _ = _models(chunk=128)
    calls = _calls(one)
    ids = random_ids(one.config, 1, 300)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = one.generate(ids, **kw)
        n_plain = len(calls)
        got = one.generate(ids, prefill_chunk_size=128, **kw)
    assert len(calls) - n_plain == n_plain + 2  # the 300-token prefill ran as 3 chunks instead of 1
    assert torch.equal(got, ref)
    assert one.config.prefill_chunk_tokens is None  # restored after the call
