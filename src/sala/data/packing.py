"""Pack tokenized documents into fixed-length rows without letting anything cross a document boundary.

``pack_documents`` concatenates documents (each ended by EOS when given) into rows of ``seq_len`` tokens.
A document longer than the room left is split; every piece is its own segment (positions restart at 0,
no state carries over). Per token it records the segment id, the in-segment position and the label
(-100 where the token starts a segment, so no row predicts across a boundary, and on padding).

The SALA model has no packed-varlen (cu_seqlens) input, but it does isolate the rows of a right-padded
batch exactly (lightning state per row, sparse attention per row). ``unpack_segments`` therefore turns a
packed batch into one padded row per segment, and ``repack`` puts per-token outputs back in packed order,
so a packed step computes exactly what running each document alone computes. The price is the padding
(at most one row per segment); a native ``cu_seqlens`` path in the model would remove it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

IGNORE = -100


@dataclass
class Packed:
    """Rows of packed tokens; all tensors ``[N, seq_len]``."""

    input_ids: torch.Tensor  # int64, pad_id on padding
    segment_ids: torch.Tensor  # int64, segment number within the row (0, 1, ...), -1 on padding
    position_ids: torch.Tensor  # int64, position inside the segment
    labels: torch.Tensor  # int64, = input_ids except IGNORE at segment starts and on padding
    marks: torch.Tensor | None = None  # bool, tokens a loss may weight (the answers of retrieval documents)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, idx) -> "Packed":
        return Packed(self.input_ids[idx], self.segment_ids[idx], self.position_ids[idx], self.labels[idx],
                      None if self.marks is None else self.marks[idx])

    def cu_seqlens(self, row: int) -> torch.Tensor:
        """Segment boundaries of one row in varlen form ``[0, len_0, len_0 + len_1, ...]`` (padding excluded)."""
        seg = self.segment_ids[row]
        lens = torch.bincount(seg[seg >= 0])
        return torch.cat([lens.new_zeros(1), lens.cumsum(0)])


def concat_packed(parts: list[Packed]) -> Packed:
    """Rows of several packed batches (same ``seq_len``) stacked in order (marks: none where a part has none)."""
    fields = [torch.cat([getattr(p, f) for p in parts]) for f in ("input_ids", "segment_ids", "position_ids", "labels")]
    marks = None
    if any(p.marks is not None for p in parts):
        marks = torch.cat([p.marks if p.marks is not None else torch.zeros_like(p.input_ids, dtype=torch.bool)
                           for p in parts])
    return Packed(*fields, marks)


def pack_documents(docs: Iterable[list[int]], seq_len: int, eos_id: int | None = None, bos_id: int | None = None,
                   pad_id: int = 0, drop_last: bool = False, min_segment: int = 2,
                   marks: Iterable[list[bool]] | None = None) -> Packed:
    """Greedy sequential packing: documents fill rows in order, split at row ends.

    ``bos_id``/``eos_id`` (when given) are added around every document. Segments shorter than
    ``min_segment`` tokens (nothing to predict) are not started; the row is padded instead. The last,
    partly filled row is padded, or dropped with ``drop_last``. ``marks`` (one bool per token of each
    document) travel with their tokens into ``Packed.marks``.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    rows: list[tuple[list[int], list[int], list[int], list[bool]]] = []
    ids: list[int] = []
    seg: list[int] = []
    pos: list[int] = []
    mk: list[bool] = []

    def flush():
        nonlocal ids, seg, pos, mk
        if ids:
            rows.append((ids, seg, pos, mk))
        ids, seg, pos, mk = [], [], [], []

    mark_iter = iter(marks) if marks is not None else None
    for doc in docs:
        doc = list(doc)
        dm = list(next(mark_iter)) if mark_iter is not None else [False] * len(doc)
        if len(dm) != len(doc):
            raise ValueError(f"marks of a document have {len(dm)} entries for {len(doc)} tokens")
        toks = ([bos_id] if bos_id is not None else []) + doc + ([eos_id] if eos_id is not None else [])
        tmk = ([False] if bos_id is not None else []) + dm + ([False] if eos_id is not None else [])
        while toks:
            room = seq_len - len(ids)
            if room < min_segment:
                flush()
                room = seq_len
            piece, toks = toks[:room], toks[room:]
            piece_mk, tmk = tmk[:room], tmk[room:]
            if len(piece) < min_segment:
                break  # a 1-token tail of a split document predicts nothing
            s = (seg[-1] + 1) if seg else 0
            ids += piece
            seg += [s] * len(piece)
            pos += list(range(len(piece)))
            mk += piece_mk
            if len(ids) == seq_len:
                flush()
    if ids and not drop_last:
        flush()
    n = len(rows)
    out_ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    out_seg = torch.full((n, seq_len), -1, dtype=torch.long)
    out_pos = torch.zeros((n, seq_len), dtype=torch.long)
    out_mk = torch.zeros((n, seq_len), dtype=torch.bool)
    for r, (i, s, p, m) in enumerate(rows):
        out_ids[r, : len(i)] = torch.tensor(i)
        out_seg[r, : len(s)] = torch.tensor(s)
        out_pos[r, : len(p)] = torch.tensor(p)
        out_mk[r, : len(m)] = torch.tensor(m, dtype=torch.bool)
    labels = out_ids.masked_fill((out_pos == 0) | (out_seg < 0), IGNORE)
    return Packed(out_ids, out_seg, out_pos, labels, out_mk if marks is not None else None)


@dataclass
class Unpacked:
    """One right-padded row per segment, and where its tokens live in the packed batch."""

    input_ids: torch.Tensor  # [S, L]
    attention_mask: torch.Tensor  # [S, L] 1 on real tokens
    labels: torch.Tensor  # [S, L]
    marks: torch.Tensor | None  # [S, L] bool, or None when the packed batch has none
    src_row: torch.Tensor  # [S] packed row of each segment
    src_start: torch.Tensor  # [S] first column of each segment in its row
    lengths: torch.Tensor  # [S]


def unpack_segments(p: Packed, pad_id: int = 0) -> Unpacked:
    """Packed rows -> one padded row per segment (right padding, so positions are 0..len-1)."""
    starts = (p.position_ids == 0) & (p.segment_ids >= 0)
    src_row, src_start = starts.nonzero(as_tuple=True)
    lengths = torch.zeros_like(src_row)
    for j, (r, c) in enumerate(zip(src_row.tolist(), src_start.tolist())):
        lengths[j] = int((p.segment_ids[r] == p.segment_ids[r, c]).sum())
    L = int(lengths.max()) if len(lengths) else 0
    S = len(lengths)
    ids = torch.full((S, L), pad_id, dtype=torch.long)
    mask = torch.zeros((S, L), dtype=torch.long)
    labels = torch.full((S, L), IGNORE, dtype=torch.long)
    marks = torch.zeros((S, L), dtype=torch.bool) if p.marks is not None else None
    for j, (r, c, n) in enumerate(zip(src_row.tolist(), src_start.tolist(), lengths.tolist())):
        ids[j, :n] = p.input_ids[r, c: c + n]
        labels[j, :n] = p.labels[r, c: c + n]
        mask[j, :n] = 1
        if marks is not None:
            marks[j, :n] = p.marks[r, c: c + n]
    return Unpacked(ids, mask, labels, marks, src_row, src_start, lengths)


def repack(values: torch.Tensor, u: Unpacked, shape: tuple[int, int]) -> torch.Tensor:
    """Per-token outputs ``[S, L, ...]`` of the unpacked rows back to packed order ``[N, T, ...]`` (0 on padding)."""
    out = values.new_zeros(shape + tuple(values.shape[2:]))
    for j, (r, c, n) in enumerate(zip(u.src_row.tolist(), u.src_start.tolist(), u.lengths.tolist())):
        out[r, c: c + n] = values[j, :n]
    return out
