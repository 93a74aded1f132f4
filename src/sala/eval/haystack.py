"""Real-text haystacks of an exact token budget under a given tokenizer, and needle insertion at depths.

A haystack is a contiguous (cyclic) slice of corpus text that starts at a paragraph and is cut at the
token boundary that makes it exactly ``n_tokens`` long. Only the slice needed is tokenized, so a 1M-token
haystack costs one pass over about 1M tokens of text.
"""

from __future__ import annotations

import bisect
import re
from collections import Counter

_SENTENCE_END = re.compile(r"(?<=[.!?;:\"'\]])\s+|\n+")
_WORD = re.compile(r"\b[a-z]{4,10}\b")


class Haystack:
    """Cyclic corpus text + a tokenizer -> haystack slices of an exact token count."""

    def __init__(self, text: str, tokenizer, sample_chars: int = 200_000):
        text = text.strip()
        if len(text) < 1000:
            raise ValueError(f"haystack corpus too small ({len(text)} characters); need at least 1000")
        self.text = text + "\n\n"
        self.tokenizer = tokenizer
        self._paragraphs = [m.end() for m in re.finditer(r"\n\n+", self.text)] or [0]
        sample = self.text[:sample_chars]
        n = len(self._encode(sample)[0])
        self.chars_per_token = max(len(sample) / max(n, 1), 0.5)
        self._vocab: list[str] | None = None

    def _encode(self, text: str):
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return enc["input_ids"], enc["offset_mapping"]

    def _cyclic(self, start: int, n_chars: int) -> str:
        reps = (start + n_chars) // len(self.text) + 2
        if reps <= 2:
            return (self.text + self.text)[start : start + n_chars]
        return (self.text * reps)[start : start + n_chars]

    def paragraph_start(self, fraction: float) -> int:
        """The first paragraph start at or after ``fraction`` of the corpus (cyclic)."""
        pos = int(fraction % 1.0 * len(self.text))
        i = bisect.bisect_left(self._paragraphs, pos)
        return self._paragraphs[i] if i < len(self._paragraphs) else 0

    def take(self, n_tokens: int, start: int = 0) -> str:
        """Corpus text from char ``start`` holding exactly ``n_tokens`` tokens when tokenized alone."""
        return self.take_with_offsets(n_tokens, start)[0]

    def take_with_offsets(self, n_tokens: int, start: int = 0) -> tuple[str, list[int]]:
        """``take`` plus the start character of each of its tokens (to place needles by token depth)."""
        if n_tokens <= 0:
            return "", []
        n_chars = int(n_tokens * self.chars_per_token * 1.15) + 64
        for _ in range(8):
            window = self._cyclic(start, n_chars)
            ids, offsets = self._encode(window)
            # the last token of the window may be cut short; require one spare token
            if len(ids) > n_tokens:
                text = window[: offsets[n_tokens - 1][1]]
                return text, [o[0] for o in offsets[:n_tokens]]
            n_chars = int(n_chars * 1.5) + 64
        raise RuntimeError(f"could not build a haystack of {n_tokens} tokens")

    def vocabulary(self, min_count: int = 2, max_chars: int = 3_000_000) -> list[str]:
        """Words of 4-10 letters written in lower case at least ``min_count`` times, sorted: real, common words."""
        if self._vocab is None:
            counts = Counter(_WORD.findall(self.text[:max_chars]))
            self._vocab = sorted(w for w, c in counts.items() if c >= min_count)
        return self._vocab


def sentence_boundaries(text: str) -> list[int]:
    """Character positions where a sentence (or line) ends and a new one starts, plus 0 and len(text)."""
    cuts = {0, len(text)}
    cuts.update(m.end() for m in _SENTENCE_END.finditer(text))
    return sorted(cuts)


def insert_needles(text: str, needles: list[tuple[float, str]], token_starts: list[int] | None = None) -> str:
    """Insert each ``(depth, sentence)`` at the sentence boundary nearest its depth.

    Depths are fractions of the haystack in [0, 1]: of its tokens when ``token_starts`` (the start
    character of each token) is given, else of its characters. Needles keep their list order when they
    land at the same boundary; each is followed by a space so it stays one sentence.
    """
    bounds = sentence_boundaries(text)
    placed = []
    for order, (depth, needle) in enumerate(needles):
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"needle depth must be in [0, 1], got {depth}")
        if token_starts:
            k = round(depth * len(token_starts))
            target = token_starts[k] if k < len(token_starts) else len(text)
        else:
            target = depth * len(text)
        i = bisect.bisect_left(bounds, target)
        cands = [bounds[j] for j in (i - 1, i) if 0 <= j < len(bounds)]
        placed.append((min(cands, key=lambda b: (abs(b - target), b)), order, needle))
    out, prev = [], 0
    for pos, _, needle in sorted(placed):
        out.append(text[prev:pos])
        sep_before = "" if pos == 0 or text[pos - 1].isspace() else " "
        sep_after = "" if pos < len(text) and text[pos].isspace() else " "
        out.append(f"{sep_before}{needle}{sep_after}" if pos < len(text) else f"{sep_before}{needle}")
        prev = pos
    out.append(text[prev:])
    return "".join(out)
