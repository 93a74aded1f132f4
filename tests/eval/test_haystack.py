import pytest

from sala.eval.haystack import Haystack, insert_needles, sentence_boundaries


def test_needles_land_at_sentence_boundaries_near_their_depth():
    text = " ".join(f"Sentence number {i} is here." for i in range(200))
    out = insert_needles(text, [(0.25, "NEEDLE-A."), (0.75, "NEEDLE-B."), (0.0, "FIRST."), (1.0, "LAST.")])
    assert out.startswith("FIRST. Sentence number 0")
    assert out.endswith("here. LAST.")
    for name, depth in (("NEEDLE-A.", 0.25), ("NEEDLE-B.", 0.75)):
        pos = out.index(name)
        assert out[pos - 2 : pos] == ". ", "needle must start a sentence"
        assert abs(pos / len(out) - depth) < 0.02
    # removing the needles gives back the haystack unchanged
    stripped = out
    for n in ("NEEDLE-A. ", "NEEDLE-B. ", "FIRST. ", " LAST."):
        stripped = stripped.replace(n, "")
    assert stripped == text


def test_bad_depth_raises():
    with pytest.raises(ValueError):
        insert_needles("a. b.", [(1.5, "x")])


def test_sentence_boundaries_include_line_breaks():
    b = sentence_boundaries("One. Two!\nThree")
    assert b[0] == 0 and b[-1] == len("One. Two!\nThree")
    assert 5 in b and 10 in b


def test_take_gives_exact_token_count_of_real_text(corpus_text, tokenizer):
    hay = Haystack(corpus_text, tokenizer)
    for n in (1, 50, 777, 3000):
        start = hay.paragraph_start(0.37)
        piece = hay.take(n, start)
        assert len(tokenizer(piece, add_special_tokens=False)["input_ids"]) == n
    # a slice longer than the corpus wraps around and is still corpus text
    n_corpus = len(tokenizer(corpus_text, add_special_tokens=False)["input_ids"])
    long = hay.take(int(n_corpus * 1.5), 0)
    assert long.startswith(corpus_text.strip()[:1000])
    assert len(tokenizer(long, add_special_tokens=False)["input_ids"]) == int(n_corpus * 1.5)


def test_vocabulary_is_real_lowercase_words(corpus_text, tokenizer):
    vocab = Haystack(corpus_text, tokenizer).vocabulary()
    assert len(vocab) > 300
    assert all(w.isalpha() and w.islower() and 4 <= len(w) <= 10 for w in vocab)
    assert all(f" {w}" in corpus_text or f"\n{w}" in corpus_text for w in vocab[:50])
