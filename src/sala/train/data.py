"""Training documents and a resumable stream of packed batches.

Sources: ``synthetic`` (seeded random documents that repeat a random phrase, so that recall matters;
for tests and CPU smoke runs), ``text:<file>`` (documents separated by blank lines) and
``corpus:<name>[,<name>...]`` (the offline corpora in ``sala.data.corpora``, train split).
The stream's position is two integers (epoch, cursor); the row order of an epoch is a seeded
permutation, so a resumed run reads exactly the rows the uninterrupted run would have read.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.packing import Packed, pack_documents


def synthetic_documents(n_docs: int = 256, vocab_size: int = 256, min_len: int = 16, max_len: int = 96,
                        seed: int = 0, low_id: int = 3) -> list[list[int]]:
    """Documents made of a random phrase repeated with random fillers between the repeats."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n_docs):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        phrase = torch.randint(low_id, vocab_size, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g)
        out: list[int] = []
        while len(out) < length:
            filler = torch.randint(low_id, vocab_size, (int(torch.randint(0, 6, (1,), generator=g)),), generator=g)
            out += filler.tolist() + phrase.tolist()
        docs.append(out[:length])
    return docs


def _split_text(text: str, doc_chars: int = 20000) -> list[str]:
    """Consecutive paragraphs merged into documents of about ``doc_chars`` characters.

    The offline corpora join their documents with the same blank line that separates paragraphs, so
    document ends are not recoverable; contiguous chunks keep long-range structure for training.
    """
    docs, cur, size = [], [], 0
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        cur.append(para)
        size += len(para) + 2
        if size >= doc_chars:
            docs.append("\n\n".join(cur))
            cur, size = [], 0
    if cur:
        docs.append("\n\n".join(cur))
    return docs


# One process tokenizes a text once: the pipeline builds several trainers on the training corpus and reads
# the evaluation text between them, so the two most recent texts are kept.
_TOKENIZED: dict[tuple, list[list[int]]] = {}
_TOKENIZED_KEEP = 2


def load_documents(source: str, tokenizer=None, vocab_size: int = 256, seed: int = 0, **options) -> list[list[int]]:
    """Token-id documents for a data source string (see the module docstring)."""
    if source == "synthetic":
        return synthetic_documents(vocab_size=vocab_size, seed=seed, **options)
    if tokenizer is None:
        raise ValueError(f"data source {source!r} needs a tokenizer (the teacher's)")
    name = getattr(tokenizer, "name_or_path", "")  # only a tokenizer loaded from a folder has a stable key
    if not name:
        return _tokenized_documents(source, tokenizer, **options)
    mtime = Path(source[5:]).stat().st_mtime_ns if source.startswith("text:") else 0
    key = (source, mtime, json.dumps(options, sort_keys=True), name, len(tokenizer))
    docs = _TOKENIZED.pop(key, None)
    if docs is None:
        docs = _tokenized_documents(source, tokenizer, **options)
    _TOKENIZED[key] = docs  # most recently used last
    while len(_TOKENIZED) > _TOKENIZED_KEEP:
        del _TOKENIZED[next(iter(_TOKENIZED))]
    return [list(d) for d in docs]


def _tokenized_documents(source: str, tokenizer, **options) -> list[list[int]]:
    max_docs = options.get("max_docs")
    doc_chars = int(options.get("doc_chars", 20000))
    if source.startswith("text:"):
        docs = _split_text(Path(source[5:]).read_text(encoding="utf-8", errors="replace"), doc_chars)
    elif source.startswith("corpus:"):
        from ..data import corpora  # the evaluation engineer's module; imported only when used

        names, _, split = source[7:].partition(":")
        docs = []
        for name in names.split(","):  # 'corpus:shakespeare,brown' -> documents of both, in order
            docs += _split_text(corpora.load_text(name.strip(), split=split or "train"), doc_chars)
    else:
        raise ValueError(f"unknown data source {source!r}; use 'synthetic', 'text:<file>' or 'corpus:<name>'")
    if max_docs:
        docs = docs[: int(max_docs)]
    return [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]


@dataclass
class StreamState:
    epoch: int = 0
    cursor: int = 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}


class PackedStream:
    """Endless, seeded, resumable batches of packed rows at one sequence length."""

    def __init__(self, docs: list[list[int]], seq_len: int, eos_id: int | None, pad_id: int, seed: int,
                 state: StreamState | None = None, marks: list[list[bool]] | None = None):
        self.rows: Packed = pack_documents(docs, seq_len, eos_id=eos_id, pad_id=pad_id, drop_last=len(docs) > 1,
                                           marks=marks)
        if len(self.rows) == 0:
            raise ValueError(f"no full row of {seq_len} tokens in the data")
        self.seed = seed
        self.state = state or StreamState()
        self._order = self._perm(self.state.epoch)

    def _perm(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))

    def next_batch(self, batch_size: int) -> Packed:
        idx = []
        while len(idx) < batch_size:
            if self.state.cursor >= len(self._order):
                self.state = StreamState(self.state.epoch + 1, 0)
                self._order = self._perm(self.state.epoch)
            take = min(batch_size - len(idx), len(self._order) - self.state.cursor)
            idx += self._order[self.state.cursor: self.state.cursor + take].tolist()
            self.state.cursor += take
        return self.rows[torch.tensor(idx)]
