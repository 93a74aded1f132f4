"""RULER-style string-match scoring, with word boundaries so that near-misses do not count.

RULER scores ``string_match_all`` as the fraction of expected answers found (case-insensitive substring)
in the prediction, averaged over samples. Plain substring search would accept ``123456`` for ``12345``,
so here an answer must appear delimited by non-alphanumeric characters; case and runs of whitespace are
ignored.
"""

from __future__ import annotations

import re

_WS = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lower case, every whitespace run -> one space, stripped."""
    return _WS.sub(" ", text).strip().lower()


def contains_answer(prediction: str, answer: str) -> bool:
    """True when ``answer`` occurs in ``prediction`` as a whole token sequence (not inside a longer word/number)."""
    ans = normalize(answer)
    if not ans:
        raise ValueError("empty expected answer")
    pattern = r"(?<![0-9a-z])" + re.escape(ans) + r"(?![0-9a-z])"
    return re.search(pattern, normalize(prediction)) is not None


def sample_score(prediction: str, answers: list[str]) -> float:
    """Fraction of the expected answers present in the prediction (RULER's per-sample string_match_all)."""
    if not answers:
        raise ValueError("a sample needs at least one expected answer")
    return sum(contains_answer(prediction, a) for a in answers) / len(answers)


def string_match_all(predictions: list[str], answers: list[list[str]]) -> float:
    """Mean per-sample fraction of answers found, in percent (RULER's string_match_all)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answer lists")
    if not predictions:
        return float("nan")
    return 100.0 * sum(sample_score(p, a) for p, a in zip(predictions, answers)) / len(predictions)
