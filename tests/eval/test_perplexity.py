"""Chunked (cached) perplexity equals one unchunked forward, for a dense Llama and a SALA hybrid."""

import math

import pytest
import torch

from sala.eval.perplexity import perplexity_at_lengths, window_nll, window_nll_unchunked, window_starts


@pytest.fixture(scope="module", params=["llama", "sala"])
def model(request, builders):
    return builders[request.param](211, seed=3).double()


def _ids(n, seed=0):
    return torch.randint(3, 211, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("chunk", [None, 37, 128])
def test_chunked_equals_unchunked(model, chunk):
    ids = _ids(400)  # past the SALA model's dense_len (256): the sparse path is exercised
    ref, n_ref = window_nll_unchunked(model, ids, 150)
    got, n = window_nll(model, ids, 150, chunk)
    assert n == n_ref == 150
    # SALA returns float32 logits by design, Llama keeps float64: compare at float32 precision
    assert got == pytest.approx(ref, rel=2e-6, abs=1e-6)


def test_context_matters_so_the_check_can_fail(model):
    """Scoring the same tokens with a cut context gives another value (the cache really carries context)."""
    ids = _ids(300, seed=1)
    full, _ = window_nll(model, ids, 50, 64)
    cut, _ = window_nll(model, ids[:, -60:], 50, 64)
    assert abs(full - cut) > 1e-3


def test_score_tokens_capped_at_window(builders):
    m = builders["llama"](211).double()
    ids = _ids(20)
    got, n = window_nll(m, ids, 500, 7)
    ref, n_ref = window_nll_unchunked(m, ids, 500)
    assert n == n_ref == 19 and got == pytest.approx(ref, rel=1e-10)


def test_window_starts():
    assert window_starts(100, 200, 4) == []
    assert window_starts(100, 100, 4) == [0]
    assert window_starts(1000, 100, 4) == [0, 300, 600, 900]
    assert window_starts(1000, 100, 1) == [0]


def test_perplexity_at_lengths_aggregates_windows(builders):
    m = builders["llama"](211).double()
    stream = _ids(600, seed=2)[0]
    res = perplexity_at_lengths(m, stream, [64, 256, 1000], n_windows=3, score_tokens=32, chunk_size=50)
    assert [r.length for r in res] == [64, 256]  # 1000 > stream: skipped, never repeated text
    r = res[1]
    starts = window_starts(600, 256, 3)
    total = sum(window_nll_unchunked(m, stream[s : s + 256].view(1, -1), 32)[0] for s in starts)
    assert r.scored_tokens == 32 * len(starts) and r.windows == len(starts)
    assert r.ppl == pytest.approx(math.exp(total / r.scored_tokens), rel=1e-9)
