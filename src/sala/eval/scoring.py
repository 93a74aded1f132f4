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


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval (95% by default) of a success rate from ``n`` samples: the spread a retrieval
    accuracy from 16 samples carries (one sample moves it 6 points). ``successes`` may be fractional (a mean
    of per-sample scores times n)."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}")
    p = successes / n
    z2 = z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * ((p * (1 - p) / n + z2 / (4 * n * n)) ** 0.5) / (1 + z2 / n)
    return max(0.0, center - half), min(1.0, center + half)
