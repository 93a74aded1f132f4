"""Synthetic long-context tasks in the style of RULER, built with the evaluated model's own tokenizer.

Every sample is exactly as long as asked (to within a few tokens, never longer) under that tokenizer,
is fully determined by ``(seed, task, length, index)`` (keys, values and haystack offsets are the same
for every model; only the tokenization differs), and hides its needles in real corpus text.

Tasks (RULER names in brackets):

* ``passkey``: one pass key in the text.
* ``niah_single`` [niah_single_2]: one "special magic number" for a key.
* ``niah_multikey`` [niah_multikey_1]: four keys, one asked; the other three are distractors.
* ``niah_multivalue`` [niah_multivalue]: four numbers for the same key; all must be returned.
* ``niah_multiquery`` [niah_multiquery]: four keys, all asked.
* ``vt`` [vt]: variable tracking, chains of ``VAR X = VAR Y`` assignments (1 chain, 4 hops).
* ``cwe`` [cwe]: the 10 most common words of a numbered word list (30 vs 3 occurrences at long lengths).
* ``fwe`` [fwe]: the 3 most frequent words of Zipf-distributed (alpha 2) text.

Needle depths: the primary needle of sample ``i`` of ``n`` sits at ``depths[i % len(depths)]`` when depths
are given, else at ``i / (n - 1)`` (evenly from the start to the end); extra needles sit at seeded random
depths. A depth is a fraction of the haystack, snapped to the nearest sentence boundary.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .haystack import Haystack, insert_needles


@dataclass
class Sample:
    task: str
    length: int
    index: int
    prompt: str
    input_ids: list[int]
    answers: list[str]
    max_new_tokens: int
    depths: list[float] = field(default_factory=list)
    needles: list[str] = field(default_factory=list)
    context_span: tuple[int, int] = (0, 0)  # characters of ``prompt`` holding the haystack (with needles)

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    def summary(self) -> dict:
        """What the report keeps of a sample (not the prompt: it may be a million tokens)."""
        return {"index": self.index, "n_tokens": self.n_tokens, "answers": self.answers,
                "depths": [round(d, 4) for d in self.depths], "needles": self.needles}


# ------------------------------------------------------------------------------------------ helpers
def _rng(seed: int, *parts) -> random.Random:
    return random.Random(":".join(str(p) for p in (seed, *parts)))


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _distinct(rng: random.Random, make: Callable[[], str], n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        v = make()
        if v not in out:
            out.append(v)
    return out


def _key(rng: random.Random, vocab: list[str]) -> str:
    return f"{rng.choice(vocab)}-{rng.choice(vocab)}"


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]


def length_tolerance(target: int) -> int:
    """How many tokens short of ``target`` a sample may be (never longer): list items are several tokens."""
    return max(8, target // 256)


def fit_to_length(build: Callable[[int], tuple[str, dict]], tokenizer, target: int, tries: int = 16):
    """Find the filler budget for which ``build(budget)`` tokenizes to ``target`` tokens or a few less.

    ``build`` returns ``(prompt, meta)`` and grows with its budget; token merges at the seams make the
    count differ a little from the sum of the parts. A secant step on the overshoot, kept inside the
    bracket of budgets known to be too short / too long, converges in a few tokenizations. Returns
    ``(prompt, input_ids, meta)`` of the longest build that fits.
    """
    tol = length_tolerance(target)
    prompt, meta = build(0)
    ids = _encode(tokenizer, prompt)
    if len(ids) > target:
        raise ValueError(f"target length {target} is shorter than the task's template and needles ({len(ids)} tokens)")
    best, lo, hi = (prompt, ids, meta), 0, None  # lo fits, hi does not
    budget = target - len(ids)
    for _ in range(tries):
        if budget <= lo or (hi is not None and budget >= hi):
            if hi is None:
                budget = 2 * lo + 1
            elif hi - lo <= 1:
                break
            else:
                budget = (lo + hi) // 2
        prompt, meta = build(budget)
        ids = _encode(tokenizer, prompt)
        over = len(ids) - target
        if over <= 0:
            lo = budget
            if len(ids) > len(best[1]):
                best = (prompt, ids, meta)
            if over >= -tol:
                break
        else:
            hi = budget
        budget -= over
    return best


# --------------------------------------------------------------------------------- needle tasks
PASSKEY_TEMPLATE = (
    "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize "
    "it. I will quiz you about the important information there.\n\n{context}\n\nWhat is the pass key? "
    "The pass key is"
)
NIAH_TEMPLATE = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize them. I will quiz "
    "you about the numbers afterwards.\n\n{context}\n\n{question}"
)
NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n\n"
    "Question: Find all variables that are assigned the value {value} in the text above. Answer: According to "
    "the chain(s) of variable assignment in the text above, {n} variables are assigned the value {value}, "
    "they are:"
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
    "that appear most often.\n{context}\nQuestion: What are the {n} most common words in the above list? "
    "Answer: The top {n} words that appear most often in the list are:"
)
FWE_TEMPLATE = (
    "Read the following text and track the frequency of each word. Find the three most frequently appearing "
    "words.\n{context}\nQuestion: What are the three most frequently appearing words in the above text? "
    "Answer: According to the text above, the three most frequently appearing words are:"
)


def _needle_sample(task, hay, tokenizer, length, index, rng, template_fn, needles, answers, max_new):
    """Shared path of the needle tasks: haystack slice from a seeded paragraph, ``(depth, text)`` needles."""
    start = hay.paragraph_start(rng.random())

    def build(budget: int) -> tuple[str, dict]:
        text, token_starts = hay.take_with_offsets(budget, start)
        context = insert_needles(text, needles, token_starts)
        prompt = template_fn(context)
        at = prompt.index(context)
        return prompt, {"span": (at, at + len(context))}

    prompt, ids, meta = fit_to_length(build, tokenizer, length)
    return Sample(task, length, index, prompt, ids, answers, max_new, depths=[d for d, _ in needles],
                  needles=[t for _, t in needles], context_span=meta["span"])


def _extra_depths(rng: random.Random, n: int) -> list[float]:
    return [round(rng.random(), 4) for _ in range(n)]


def passkey(hay, tokenizer, length, index, depth, seed):
    rng = _rng(seed, "passkey", length, index)
    key = _number(rng, 5)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    return _needle_sample("passkey", hay, tokenizer, length, index, rng,
                          lambda c: PASSKEY_TEMPLATE.format(context=c), [(depth, needle)], [key], 16)


def _niah_question(keys: list[str], several_values: bool) -> str:
    if len(keys) == 1 and not several_values:
        k = keys[0]
        return (f"What is the special magic number for {k} mentioned in the provided text? "
                f"The special magic number for {k} mentioned in the provided text is")
    ks = keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]
    return (f"What are all the special magic numbers for {ks} mentioned in the provided text? "
            f"The special magic numbers for {ks} mentioned in the provided text are")


def niah(task: str, n_keys: int, n_values: int, n_queries: int, max_new: int):
    """A needle-in-a-haystack generator with ``n_keys`` keys of ``n_values`` numbers, ``n_queries`` asked."""

    def generate(hay, tokenizer, length, index, depth, seed):
        rng = _rng(seed, task, length, index)
        vocab = hay.vocabulary()
        keys = _distinct(rng, lambda: _key(rng, vocab), n_keys)
        values = {k: _distinct(rng, lambda: _number(rng, 7), n_values) for k in keys}
        needles = [NIAH_NEEDLE.format(key=k, value=v) for k in keys for v in values[k]]
        depths = [depth] + _extra_depths(rng, len(needles) - 1)
        pairs = list(zip(depths, needles))  # the first (asked) needle at the controlled depth
        asked = keys[:n_queries]
        answers = [v for k in asked for v in values[k]]
        q = _niah_question(asked, n_values > 1)
        return _needle_sample(task, hay, tokenizer, length, index, rng,
                              lambda c: NIAH_TEMPLATE.format(context=c, question=q), pairs, answers, max_new)

    return generate


def variable_tracking(n_chains: int = 1, n_hops: int = 4, max_new: int = 32):
    """Chains ``VAR A = 12345. VAR B = VAR A. ...``; the answer is every variable of the asked chain."""

    def generate(hay, tokenizer, length, index, depth, seed):
        rng = _rng(seed, "vt", length, index)
        letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        names = _distinct(rng, lambda: "".join(rng.choice(letters) for _ in range(5)), n_chains * (n_hops + 1))
        values = _distinct(rng, lambda: _number(rng, 5), n_chains)
        needles = []
        for c in range(n_chains):
            chain = names[c * (n_hops + 1) : (c + 1) * (n_hops + 1)]
            stmts = [f"VAR {chain[0]} = {values[c]}."] + [f"VAR {chain[i]} = VAR {chain[i - 1]}." for i in range(1, len(chain))]
            # the first statement at the controlled depth of chain 0, the rest after it in order
            first = depth if c == 0 else rng.random()
            ds = sorted([first] + [first + (1 - first) * rng.random() for _ in stmts[1:]])
            needles += list(zip([round(d, 4) for d in ds], stmts))
        answers = names[: n_hops + 1]
        tmpl = lambda ctx: VT_TEMPLATE.format(context=ctx, value=values[0], n=n_hops + 1)  # noqa: E731
        return _needle_sample("vt", hay, tokenizer, length, index, rng, tmpl, needles, answers, max_new)

    return generate


# ------------------------------------------------------------------------------ aggregation tasks
def _tokens_per_item(tokenizer, items: list[str]) -> float:
    return max(len(tokenizer(" ".join(items), add_special_tokens=False)["input_ids"]) / max(len(items), 1), 0.5)


def common_words(n_common: int = 10, max_freq_common: int = 30, base_freq_uncommon: int = 3, max_new: int = 96):
    """RULER's cwe on real words: ``n_common`` words repeated more often than any other word of the list."""

    def generate(hay, tokenizer, length, index, depth, seed):
        vocab = hay.vocabulary()
        probe = [f"{i + 1}. {w}" for i, w in enumerate(vocab[:200])]
        per_item = _tokens_per_item(tokenizer, probe) * 1.02

        def build(budget: int) -> tuple[str, dict]:
            rng = _rng(seed, "cwe", length, index)
            pool = rng.sample(vocab, len(vocab))
            common, rest = pool[:n_common], pool[n_common:]
            total = max(int(budget / per_item), 0)
            freq_c = max(2, min(max_freq_common, total // (4 * n_common)))
            n_unc = max(total - n_common * freq_c, 0)
            freq_u = max(1, min(base_freq_uncommon, freq_c - 1), math.ceil(n_unc / max(len(rest), 1)))
            freq_c = max(freq_c, freq_u + 1)
            uncommon = [w for w in rest[: math.ceil(n_unc / freq_u)] for _ in range(freq_u)][:n_unc]
            words = [w for w in common for _ in range(freq_c)] + uncommon
            rng.shuffle(words)
            context = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
            prompt = CWE_TEMPLATE.format(context=context, n=n_common)
            at = prompt.index(context) if context else 0
            return prompt, {"answers": common, "span": (at, at + len(context))}

        prompt, ids, meta = fit_to_length(build, tokenizer, length)
        return Sample("cwe", length, index, prompt, ids, list(meta["answers"]), max_new, context_span=meta["span"])

    return generate


def frequent_words(alpha: float = 2.0, pool_size: int = 1000, top: int = 3, max_new: int = 48):
    """RULER's fwe on real words: text drawn from a Zipf(alpha) law over a word pool; answer the top 3."""

    def generate(hay, tokenizer, length, index, depth, seed):
        vocab = hay.vocabulary()
        per_item = _tokens_per_item(tokenizer, vocab[:300]) * 1.02

        def build(budget: int) -> tuple[str, dict]:
            rng = _rng(seed, "fwe", length, index)
            pool = rng.sample(vocab, min(pool_size, len(vocab)))
            n = max(int(budget / per_item), 0)
            p = 1.0 / np.arange(1, len(pool) + 1) ** alpha
            gen = np.random.default_rng(rng.getrandbits(63))
            for _ in range(50):  # redraw on a tie at rank `top` so the answer is unambiguous
                idx = gen.choice(len(pool), size=n, p=p / p.sum())
                counts = np.bincount(idx, minlength=len(pool))
                order = np.argsort(-counts, kind="stable")
                margin = int(counts[order[top - 1]] - counts[order[top]])
                if margin > 0 or n == 0:
                    break
            context = " ".join(pool[i] for i in idx)
            prompt = FWE_TEMPLATE.format(context=context)
            at = prompt.index(context) if context else 0
            meta = {"answers": [pool[i] for i in order[:top]], "margin": margin if n else 1, "span": (at, at + len(context))}
            return prompt, meta

        prompt, ids, meta = fit_to_length(build, tokenizer, length)
        if meta["margin"] <= 0:
            raise ValueError(f"fwe at length {length}: the top-{top} words are tied; use a longer length")
        return Sample("fwe", length, index, prompt, ids, list(meta["answers"]), max_new, context_span=meta["span"])

    return generate


@dataclass(frozen=True)
class TaskSpec:
    name: str
    generate: Callable
    uses_depth: bool
    description: str


TASKS: dict[str, TaskSpec] = {
    "passkey": TaskSpec("passkey", passkey, True, "one 5-digit pass key"),
    "niah_single": TaskSpec("niah_single", niah("niah_single", 1, 1, 1, 32), True, "one key, one 7-digit number"),
    "niah_multikey": TaskSpec("niah_multikey", niah("niah_multikey", 4, 1, 1, 32), True, "4 keys, 1 asked"),
    "niah_multivalue": TaskSpec("niah_multivalue", niah("niah_multivalue", 1, 4, 1, 64), True, "1 key, 4 numbers"),
    "niah_multiquery": TaskSpec("niah_multiquery", niah("niah_multiquery", 4, 1, 4, 64), True, "4 keys, all asked"),
    "vt": TaskSpec("vt", variable_tracking(), True, "variable tracking, 1 chain x 4 hops"),
    "cwe": TaskSpec("cwe", common_words(), False, "10 most common words of a list"),
    "fwe": TaskSpec("fwe", frequent_words(), False, "3 most frequent words, Zipf alpha 2"),
}


def sample_depth(index: int, n_samples: int, depths: list[float] | None = None) -> float:
    if depths:
        return float(depths[index % len(depths)])
    return index / (n_samples - 1) if n_samples > 1 else 0.5


def generate_samples(task: str, tokenizer, haystack: Haystack, length: int, n_samples: int, seed: int = 42,
                     depths: list[float] | None = None, max_new_tokens: int | None = None) -> list[Sample]:
    """``n_samples`` samples of ``task`` at ``length`` tokens under ``tokenizer``."""
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; available: {', '.join(TASKS)}")
    spec = TASKS[task]
    out = []
    for i in range(n_samples):
        s = spec.generate(haystack, tokenizer, length, i, sample_depth(i, n_samples, depths), seed)
        if max_new_tokens is not None:
            s.max_new_tokens = max_new_tokens
        out.append(s)
    return out
