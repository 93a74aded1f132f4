"""Task generation: exact lengths, determinism, answers really present (decoded) at the stated depths."""

import re
from collections import Counter

import pytest

from sala.eval.haystack import Haystack
from sala.eval.tasks import TASKS, fit_to_length, generate_samples, length_tolerance, sample_depth

NEEDLE_TASKS = [t for t, spec in TASKS.items() if spec.uses_depth]


@pytest.fixture(scope="module")
def hay(corpus_text, tokenizer):
    return Haystack(corpus_text, tokenizer)


def _decoded(tokenizer, sample):
    text = tokenizer.decode(sample.input_ids, skip_special_tokens=True)
    assert text == sample.prompt, "the token ids must decode back to the prompt"
    return text


def _n_tok(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("length", [1024, 3000])
def test_length_and_determinism(task, length, hay, tokenizer):
    a = generate_samples(task, tokenizer, hay, length, 3, seed=7)
    b = generate_samples(task, tokenizer, hay, length, 3, seed=7)
    tol = length_tolerance(length)
    for x, y in zip(a, b):
        assert x.input_ids == y.input_ids and x.answers == y.answers
        assert length - tol <= x.n_tokens <= length, (task, x.n_tokens)
        assert x.answers and all(ans.strip() for ans in x.answers)
    c = generate_samples(task, tokenizer, hay, length, 3, seed=8)
    assert [s.answers for s in c] != [s.answers for s in a], "another seed must give other answers"
    assert len({tuple(s.answers) for s in a}) == 3, "samples of one seed must differ"


@pytest.mark.parametrize("task", NEEDLE_TASKS)
def test_needles_are_present_at_their_stated_token_depth(task, hay, tokenizer):
    samples = generate_samples(task, tokenizer, hay, 2048, 5, seed=1)
    assert [s.depths[0] for s in samples] == [0.0, 0.25, 0.5, 0.75, 1.0]
    for s in samples:
        text = _decoded(tokenizer, s)
        c0, c1 = s.context_span
        assert _n_tok(tokenizer, text[c0:c1]) > 0.9 * (2048 - 150)
        context = text[c0:c1]
        bare = context
        for needle in s.needles:
            assert text.count(needle) == 1, needle
            bare = bare.replace(needle + " ", "", 1) if needle + " " in bare else bare.replace(" " + needle, "", 1)
        bare_tokens = _n_tok(tokenizer, bare)
        for depth, needle in zip(s.depths, s.needles):
            before = context[: context.index(needle)]
            for other in s.needles:  # depth is a fraction of the haystack itself, other needles excluded
                before = before.replace(other + " ", "")
            token_depth = _n_tok(tokenizer, before) / bare_tokens
            assert abs(token_depth - depth) < 0.015, (task, depth, token_depth)
        # every expected answer is written in a needle of the decoded text
        for ans in s.answers:
            assert any(re.search(rf"\b{re.escape(ans)}\b", n) for n in s.needles), ans


def test_primary_depths_follow_the_schedule(hay, tokenizer):
    ss = generate_samples("niah_single", tokenizer, hay, 1024, 5)
    assert [s.depths[0] for s in ss] == [0.0, 0.25, 0.5, 0.75, 1.0]
    ss = generate_samples("passkey", tokenizer, hay, 1024, 3, depths=[0.3, 0.6])
    assert [s.depths[0] for s in ss] == [0.3, 0.6, 0.3]
    assert sample_depth(0, 1) == 0.5


def test_niah_queries_are_consistent(hay, tokenizer):
    for task, n_keys, n_answers in (("niah_single", 1, 1), ("niah_multikey", 4, 1), ("niah_multivalue", 1, 4),
                                    ("niah_multiquery", 4, 4)):
        s = generate_samples(task, tokenizer, hay, 1024, 1, seed=3)[0]
        pairs = re.findall(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.", s.prompt)
        assert len(pairs) == max(n_keys, n_answers), task
        question = s.prompt[s.context_span[1]:]
        asked = {k for k, _ in pairs if k in question}
        assert len(s.answers) == n_answers
        assert sorted(s.answers) == sorted(v for k, v in pairs if k in asked), task
        assert len({k for k, _ in pairs}) == n_keys


def test_passkey_answer(hay, tokenizer):
    s = generate_samples("passkey", tokenizer, hay, 1024, 1)[0]
    (key,) = s.answers
    assert re.fullmatch(r"\d{5}", key)
    assert f"The pass key is {key}. Remember it. {key} is the pass key." in s.prompt
    assert s.prompt.rstrip().endswith("The pass key is")


def test_variable_tracking_chain_resolves_to_the_answers(hay, tokenizer):
    s = generate_samples("vt", tokenizer, hay, 2048, 1, seed=5)[0]
    text = _decoded(tokenizer, s)
    stmts = re.findall(r"VAR ([A-Z]{5}) = (?:VAR ([A-Z]{5})|(\d{5}))\.", text[: s.context_span[1]])
    value = re.search(r"assigned the value (\d{5})", text[s.context_span[1]:]).group(1)
    holders: set[str] = set()
    for name, src, val in stmts:  # in text order: a chain is only followable forwards
        if val == value or src in holders:
            holders.add(name)
    assert holders == set(s.answers) and len(holders) == 5


def test_common_words_counts(hay, tokenizer):
    s = generate_samples("cwe", tokenizer, hay, 3000, 1, seed=2)[0]
    items = re.findall(r"(\d+)\. ([a-z]+)", s.prompt[slice(*s.context_span)])
    assert [int(i) for i, _ in items] == list(range(1, len(items) + 1))
    counts = Counter(w for _, w in items)
    top = {w for w, _ in counts.most_common(10)}
    assert top == set(s.answers)
    assert min(counts[w] for w in s.answers) > max(c for w, c in counts.items() if w not in top)


def test_frequent_words_top3(hay, tokenizer):
    s = generate_samples("fwe", tokenizer, hay, 3000, 1, seed=2)[0]
    words = s.prompt[slice(*s.context_span)].split()
    ranked = Counter(words).most_common()
    assert [w for w, _ in ranked[:3]] == s.answers or set(w for w, _ in ranked[:3]) == set(s.answers)
    assert ranked[2][1] > ranked[3][1]


def test_haystack_is_real_corpus_text(hay, tokenizer, corpus_text):
    s = generate_samples("niah_single", tokenizer, hay, 2048, 1)[0]
    ctx = s.prompt[slice(*s.context_span)].replace(s.needles[0] + " ", "")
    # long runs of the context are verbatim corpus text, not filler
    chunks = [c.strip() for c in ctx.split("\n") if len(c.strip()) > 30]
    assert len(chunks) > 20
    assert all(c in corpus_text for c in chunks)
    assert len(set(chunks)) > 0.9 * len(chunks)


def test_long_sample_scales(hay, tokenizer):
    (s,) = generate_samples("niah_single", tokenizer, hay, 65536, 1)
    assert 65536 - 131 <= s.n_tokens <= 65536
    assert s.needles[0] in s.prompt


def test_too_short_length_raises(hay, tokenizer):
    with pytest.raises(ValueError, match="shorter than the task"):
        generate_samples("niah_multiquery", tokenizer, hay, 32, 1)
    with pytest.raises(KeyError):
        generate_samples("nope", tokenizer, hay, 1024, 1)


def test_fit_to_length_lands_just_under_target(tokenizer, corpus_text):
    words = corpus_text.split()
    # a build whose token count is not proportional to its budget (each word is one or several tokens)
    build = lambda n: ("Question: " + " ".join(words[: n // 2]), {"n": n})  # noqa: E731
    for target in (100, 301, 2000):
        prompt, ids, meta = fit_to_length(build, tokenizer, target)
        assert target - length_tolerance(target) <= len(ids) <= target
        assert ids == tokenizer(build(meta["n"])[0])["input_ids"]
