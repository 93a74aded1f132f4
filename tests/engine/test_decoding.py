"""Text deltas from tokens (sala.engine.decoding.TextStream) and nucleus sampling (sala.engine.sampling)."""

from __future__ import annotations

import torch

from sala.demo import byte_tokenizer
from sala.engine.decoding import TextStream
from sala.engine.sampling import make_generator, next_token, top_p_filter

TEXT = "héllo wörld — 東京 ok"  # 1-, 2- and 3-byte characters: several split over byte tokens


def stream_all(tok, ids, stop=()):
    s = TextStream(tok, stop)
    deltas = [s.add(i) for i in ids]
    deltas.append(s.finish())
    return [d for d in deltas if d], s


def test_deltas_are_whole_characters_and_join_to_the_text():
    tok = byte_tokenizer()
    ids = tok(TEXT)["input_ids"]
    assert len(ids) > len(TEXT)  # multi-byte characters really are split over tokens
    deltas, s = stream_all(tok, ids)
    assert "".join(deltas) == TEXT and not s.stopped
    assert all("\ufffd" not in d for d in deltas)


def test_a_stop_string_split_over_tokens_is_held_back_then_dropped():
    tok = byte_tokenizer()
    ids = tok(TEXT)["input_ids"]
    deltas, s = stream_all(tok, ids, stop=("東京", "zzz"))
    assert "".join(deltas) == "héllo wörld — " and s.stopped
    deltas, s = stream_all(tok, ids, stop=("wörx",))  # a prefix that never completes is released
    assert "".join(deltas) == TEXT and not s.stopped


def test_top_p_keeps_the_smallest_set_reaching_p():
    p = torch.tensor([0.1, 0.5, 0.15, 0.25])
    torch.testing.assert_close(top_p_filter(p, 0.7), torch.tensor([0.0, 0.5, 0.0, 0.25]))
    torch.testing.assert_close(top_p_filter(p, 0.75), torch.tensor([0.0, 0.5, 0.0, 0.25]))
    torch.testing.assert_close(top_p_filter(p, 0.76), torch.tensor([0.0, 0.5, 0.15, 0.25]))
    torch.testing.assert_close(top_p_filter(p, 0.01), torch.tensor([0.0, 0.5, 0.0, 0.0]))
    assert top_p_filter(p, 1.0) is p


def test_sampling_follows_the_distribution_and_the_seed():
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.15, 0.25]]))
    assert next_token(logits, 0.0, 1.0, None) == 1
    draws = [next_token(logits, 1.0, 0.7, g) for g in [make_generator(torch.device("cpu"), 5)] for _ in range(400)]
    assert set(draws) == {1, 3} and 0.6 < draws.count(1) / len(draws) < 0.82  # 0.5 / 0.75 = 0.667
    a = [next_token(logits, 1.0, 1.0, make_generator(torch.device("cpu"), 9)) for _ in range(5)]
    assert len(set(a)) == 1  # a fresh generator with one seed always draws the same first token
