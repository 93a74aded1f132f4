"""The chained lightning kernel's hand-off protocol (``_segment_chained_kernel``), step by step, on the real
segment tables: programs take tickets in order, at most R are resident at once, and any resident program may
take its next step. The interpreter runs each program to its end, so it never sees a slot overwritten between
one program's flag check and its read, nor a wait on a program that never got resident; this model does.
Keep its steps in line with the kernel (slot and lane flags, who waits for what, when a lane is released).
"""

from __future__ import annotations

import random

import pytest

from sala.ops import lightning_triton as lt


def run_protocol(lens, seg, H, NV, resident, seed, lanes, lane_wait=True, shared_slots=False) -> str:
    """'ok', 'deadlock' or 'overwritten' for one random schedule."""
    seg_seq, _, _, _, seg0, lane, lane_prev = (t.tolist() for t in lt._build_segment_table(lens, seg, "cpu"))
    n_items, chains = len(seg_seq) * H * NV, H * NV
    slot_flag, lane_flag, ring = {}, {}, {}
    rng = random.Random(seed)
    next_ticket, active, done = 0, [], 0

    def where(item):
        s = item // chains
        n = seg_seq[s]
        return s, n, item % chains, s == seg0[n], s + 1 == seg0[n + 1]

    def slot(s, n, back):
        return (s - back) % 2 if shared_slots else 2 * lane[n] + (s - seg0[n] - back) % 2

    def can_step(p):
        item, phase = p
        s, n, c, first, last = where(item)
        if phase == 1 and not first:  # waits for the predecessor's state
            return slot_flag.get((slot(s, n, 1), c)) == item - chains + 1
        if phase == 2 and not last and first and lane_prev[n] >= 0 and lane_wait:  # waits for its lane
            return lane_flag.get((lane[n], c)) == lane_prev[n] * chains + c + 1
        return True

    while done < n_items:
        if next_ticket < n_items and len(active) < resident and (not active or rng.random() < 0.3):
            active.append([next_ticket, 0])
            next_ticket += 1
            continue
        ready = [p for p in active if can_step(p)]
        if not ready:
            if next_ticket < n_items and len(active) < resident:
                active.append([next_ticket, 0])
                next_ticket += 1
                continue
            return "deadlock"
        p = rng.choice(ready)
        item, phase = p
        s, n, c, first, last = where(item)
        if phase == 1 and not first and ring.get((slot(s, n, 1), c)) != item - chains:
            return "overwritten"
        if phase == 2:
            if not last:
                ring[(slot(s, n, 0), c)] = item
                slot_flag[(slot(s, n, 0), c)] = item + 1
            elif not first:
                lane_flag[(lane[n], c)] = item + 1
        p[1] += 1
        if p[1] == 3:
            active.remove(p)
            done += 1
    return "ok"


CASES = [([150, 70, 200, 1, 130, 0, 300], 64), ([64, 65, 0, 300, 128, 1, 129, 129], 64), ([129] * 6, 64)]


def outcomes(lanes, **kw) -> set[str]:
    return {run_protocol(lens, seg, H, NV, resident, seed, lanes, **kw)
            for lens, seg in CASES for H, NV in ((1, 1), (2, 2)) for resident in (1, 2, 5, 40) for seed in range(12)}


@pytest.mark.parametrize("lanes", [1, 2, 32])
def test_protocol_neither_deadlocks_nor_overwrites(lanes, monkeypatch):
    monkeypatch.setattr(lt, "CHAIN_LANES", lanes)
    assert outcomes(lanes) == {"ok"}


def test_protocol_model_fails_without_the_lane_wait_or_with_shared_slots(monkeypatch):
    """The model can fail: a first segment that writes its lane without waiting, and the slots shared
    across sequences of the kernel that hung on the H200, are both caught (a reader then waits for a flag
    that was overwritten: the hang)."""
    monkeypatch.setattr(lt, "CHAIN_LANES", 1)
    assert outcomes(1, lane_wait=False) & {"overwritten", "deadlock"}
    monkeypatch.setattr(lt, "CHAIN_LANES", 32)
    assert outcomes(32, shared_slots=True) & {"overwritten", "deadlock"}
