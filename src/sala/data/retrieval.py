"""Synthetic retrieval documents for long-context training stages.

The release's last stages mix "synthesized long-context data (retrieval, cross-document)" into real text
(paper section 5, stage 5). A document here is real filler text (token ids of the training split) with a
few key -> value facts inserted at random depths and, at the end, questions about them, each followed by
its answer, so the next-token loss on the answers rewards looking far back.

The phrasings are deliberately not the evaluation suite's (``sala.eval.tasks``: "pass key",
"special magic number"), and callers take the filler from the training split while evaluation reads the
held-out split: training on these does not show the model the test prompts.
"""

from __future__ import annotations

import random

# (fact, question + answer prefix); {k} is a key, {v} the value. None of them is an eval template.
TEMPLATES: list[tuple[str, str]] = [
    ("Note: the access code for {k} is {v}.", "Question: what is the access code for {k}? Answer: the access code for {k} is"),
    ("Remember that the locker of {k} opens with {v}.", "Which number opens the locker of {k}? It opens with"),
    ("The archive lists {v} as the record number of {k}.", "What is the record number of {k}? The record number is"),
    ("Keep this in mind: {k} was assigned the number {v}.", "What number was {k} assigned? {k} was assigned the number"),
    ("Ticket {v} belongs to {k}.", "Which ticket belongs to {k}? The ticket of {k} is"),
]
NAMES = ["amber", "basil", "cedar", "dove", "ember", "fjord", "garnet", "harbor", "iris", "juniper", "kestrel",
         "lantern", "meadow", "nickel", "orchid", "pebble", "quill", "raven", "saffron", "tundra", "umber", "violet",
         "willow", "yarrow", "zephyr", "copper", "falcon", "marble", "onyx", "sparrow"]


def _key(rng: random.Random) -> str:
    return f"{rng.choice(NAMES)}-{rng.choice(NAMES)}"


def _value(rng: random.Random) -> str:
    digits = rng.randint(4, 7)
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def retrieval_document(tokenizer, filler: list[int], length: int, rng: random.Random, n_facts: int = 3,
                       n_questions: int | None = None) -> list[int]:
    """One document of about ``length`` tokens (never more): filler with ``n_facts`` facts at random depths,
    then questions about ``n_questions`` of them (default: all, in random order), each followed by its answer.

    Every fact has its own key and template, so a question is answered only by matching its key. Asking
    several questions multiplies the answer tokens per row, the only tokens whose loss needs the far past."""
    return _document(tokenizer, filler, length, rng, n_facts, n_questions, answers=False)[0]


def _document(tokenizer, filler, length, rng, n_facts, n_questions, answers: bool):
    """(tokens, answer mask or None): the mask marks the tokens of the answers' values (read from the fast
    tokenizer's character offsets, so the tokens are those of the plain call)."""
    keys: list[str] = []
    while len(keys) < n_facts:
        k = _key(rng)
        if k not in keys:
            keys.append(k)
    values = [_value(rng) for _ in keys]
    templates = [TEMPLATES[rng.randrange(len(TEMPLATES))] for _ in keys]
    facts = [tokenizer(" " + fact_t.format(k=k, v=v) + " ", add_special_tokens=False)["input_ids"]
             for (fact_t, _), k, v in zip(templates, keys, values)]
    n_questions = n_facts if n_questions is None else n_questions
    if not 1 <= n_questions <= n_facts:
        raise ValueError(f"n_questions={n_questions} must be in [1, n_facts={n_facts}]")
    asked = rng.sample(range(n_facts), n_questions)
    tail_text, spans = "", []
    for i in asked:
        tail_text += "\n\n" + templates[i][1].format(k=keys[i])
        spans.append((len(tail_text), len(tail_text) + 1 + len(values[i])))  # " " + value
        tail_text += " " + values[i] + "."
    if answers:
        enc = tokenizer(tail_text, add_special_tokens=False, return_offsets_mapping=True)
        tail = enc["input_ids"]
        tail_mask = [any(a < e and s < b for a, b in spans) for s, e in enc["offset_mapping"]]
    else:
        tail = tokenizer(tail_text, add_special_tokens=False)["input_ids"]
    room = length - len(tail) - sum(len(f) for f in facts)
    if room < n_facts:
        raise ValueError(f"length {length} is too short for {n_facts} facts and {n_questions} question(s)")
    start = rng.randrange(max(1, len(filler) - room))
    text = filler[start: start + room]
    if len(text) < room:  # short filler: wrap around
        text = (text + filler * (room // max(1, len(filler)) + 1))[:room]
    cuts = sorted(rng.randrange(room + 1) for _ in facts)
    out: list[int] = []
    prev = 0
    for cut, fact in zip(cuts, facts):
        out += text[prev:cut] + fact
        prev = cut
    out += text[prev:] + tail
    return out, ([False] * (len(out) - len(tail)) + tail_mask if answers else None)


def facts_for_length(length: int, max_facts: int = 4, tokens_per_fact: int = 2048) -> int:
    """The most facts a document of ``length`` tokens gets: ``max_facts``, and one more per
    ``tokens_per_fact`` tokens beyond that, so long rows carry as many answers per token as short ones."""
    return max(max_facts, length // tokens_per_fact)


def retrieval_documents(tokenizer, filler: list[int], n_docs: int, length: int, seed: int = 0,
                        max_facts: int = 4, questions: str = "all") -> list[list[int]]:
    """``n_docs`` seeded documents of at most ``length`` tokens, each with 1 to
    ``facts_for_length(length, max_facts)`` facts; ``questions`` is ``"all"`` (ask about every fact) or
    ``"one"`` (one question per document)."""
    return _documents(tokenizer, filler, n_docs, length, seed, max_facts, questions, answers=False)[0]


def retrieval_documents_with_answers(tokenizer, filler: list[int], n_docs: int, length: int, seed: int = 0,
                                     max_facts: int = 4, questions: str = "all") -> tuple[list[list[int]], list[list[bool]]]:
    """The documents of :func:`retrieval_documents` (same arguments, same tokens) and, per document, a mask of
    the tokens that spell an answer's value: the tokens a loss can weight up (``answer_weight`` in a
    training stage), since only they need the far past. Needs a fast tokenizer (character offsets)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"answer masks need a fast tokenizer (character offsets); got {type(tokenizer).__name__}")
    return _documents(tokenizer, filler, n_docs, length, seed, max_facts, questions, answers=True)


def _documents(tokenizer, filler, n_docs, length, seed, max_facts, questions, answers: bool):
    if not filler:
        raise ValueError("retrieval documents need filler tokens")
    if questions not in ("all", "one"):
        raise ValueError(f"questions must be 'all' or 'one', got {questions!r}")
    rng = random.Random(f"retrieval:{seed}:{length}")
    top = facts_for_length(length, max_facts)
    docs, masks = [], []
    for _ in range(n_docs):
        n = rng.randint(1, top)
        doc, mask = _document(tokenizer, filler, length, rng, n, None if questions == "all" else 1, answers)
        docs.append(doc)
        masks.append(mask)
    return docs, (masks if answers else None)
