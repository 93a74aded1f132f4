"""Turn raw corpus files into plain text and split documents deterministically into train / held-out.

Pure functions on strings, so they are tested on small in-repo text without any download.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_TRAILING_WS = re.compile(r"[ \t]+\n")
_MANY_BLANK = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """Plain text: NFC, ``\\n`` line ends, no control characters or trailing blanks, at most one empty line."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text.replace("\t", " "))
    text = _TRAILING_WS.sub("\n", text)
    text = _MANY_BLANK.sub("\n\n", text)
    return text.strip() + "\n" if text.strip() else ""


_BROWN_PUNCT = re.compile(r" ([,.;:!?')])")


def detag_brown(raw: str) -> str:
    """One Brown-corpus file (NLTK ``word/tag`` format, paragraphs split by blank lines) -> plain prose."""
    paragraphs = []
    for para in re.split(r"\n\s*\n", raw):
        words = [w.rsplit("/", 1)[0] for w in para.split()]
        s = " ".join(words)
        s = _BROWN_PUNCT.sub(r"\1", s)
        s = s.replace("`` ", '"').replace(" ''", '"').replace("``", '"').replace("''", '"')
        s = re.sub(r"\( ", "(", s)
        if s.strip():
            paragraphs.append(s.strip())
    return "\n\n".join(paragraphs)


def _doc_hash(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")


def split_documents(names: list[str], heldout_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """Fixed split by document name: a document is held out when its SHA-256 falls in the lowest fraction.

    Hash-based, so it depends only on each name (adding a document never moves another one); at least
    one document is held out and at least one kept for training when there are two or more.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    names = sorted(set(names))
    threshold = heldout_fraction * 2**64
    held = [n for n in names if _doc_hash(n) < threshold]
    if len(names) >= 2:
        if not held:
            held = [min(names, key=_doc_hash)]
        if len(held) == len(names):
            held.remove(max(held, key=_doc_hash))
    held_set = set(held)
    return [n for n in names if n not in held_set], sorted(held_set)
