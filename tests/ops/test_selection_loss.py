"""The selection alignment loss against a plain per-row computation from the reference's own stage 1."""

import pytest
import torch

from sala.ops import infllmv2_reference as ref
from sala.ops.selection_loss import (candidate_mask, first_candidate_row, selection_alignment_loss,
                                    selection_alignment_loss_batch)

P = ref.SparseParams(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, window_size=32, topk=3)


def _naive(q, k, params, scale, rows):
    """Row by row in float64: dense attention mass per block (group mean) and the reference's stage-1
    block scores, both renormalised over the blocks top-k chooses among; each term weighted by the largest
    candidate block's mass."""
    T, Hq, D = q.shape
    Hk = k.shape[1]
    G = Hq // Hk
    bs = params.block_size
    nb = -(-T // bs)
    k1 = ref.compress_keys(k.double(), params.kernel_size, params.kernel_stride)
    k2 = ref.compress_keys(k.double(), params.kernel_size2, params.kernel_stride2)
    total, weight = 0.0, 0.0
    for t in range(max(0, T - rows), T):
        qb = t // bs
        cand = [b for b in range(nb) if params.init_blocks <= b < qb - params.local_blocks]
        if not cand:
            continue
        row = torch.tensor([t])
        s1 = ref.stage1_scores(q[t:t + 1].double(), k1, k2, scale,
                               ref.visible_counts(row, T, k1.shape[0], params.kernel_stride),
                               ref.visible_counts(row, T, k2.shape[0], params.kernel_stride2))
        bscore = ref.block_scores(s1, row // bs, nb, params)[:, 0]  # [Hk, nb]
        for g in range(Hk):
            mass = torch.zeros(nb, dtype=torch.float64)
            for h in range(g * G, (g + 1) * G):
                p = torch.softmax((k[: t + 1, g].double() @ q[t, h].double()) * scale, dim=0)
                for j in range(t + 1):
                    mass[j // bs] += p[j] / G
            far = sum(float(mass[b]) for b in cand)
            peak = max(float(mass[b]) for b in cand)
            tgt = torch.tensor([float(mass[b]) / far for b in cand], dtype=torch.float64)
            pred = bscore[g, cand] / bscore[g, cand].sum()
            total += peak * float((tgt * (tgt.log() - pred.log())).sum())
            weight += peak
    return total, weight


@pytest.mark.parametrize("T,Hq,Hk,rows", [(160, 4, 2, 40), (131, 6, 2, 200), (97, 2, 1, 8)])
def test_matches_naive(T, Hq, Hk, rows):
    torch.manual_seed(T)
    q = torch.randn(T, Hq, 16)
    k = torch.randn(T, Hk, 16)
    loss, w = selection_alignment_loss(q, k, P, 0.25, rows=rows)
    want, want_w = _naive(q, k, P, 0.25, rows)
    assert want_w > 0
    assert float(w) == pytest.approx(want_w, rel=1e-5)
    assert float(loss) == pytest.approx(want, rel=1e-4)


def test_candidates_are_what_topk_chooses_among():
    """Candidates: neither forced to +inf by block_scores nor after the query's block."""
    nb = 12
    q_blocks = torch.arange(nb)
    forced = ref.block_scores(torch.zeros(1, nb, 4 * nb), q_blocks, nb, P)[0].isinf()
    after = torch.arange(nb)[None, :] > q_blocks[:, None]
    assert torch.equal(candidate_mask(q_blocks, nb, P), ~forced & ~after)


@pytest.mark.parametrize("init,window,block", [(1, 32, 16), (0, 16, 16), (2, 128, 32), (1, 0, 16)])
def test_first_candidate_row_is_where_candidates_start(init, window, block):
    """The host-side start of the rows (no device test per sequence) is the first non-empty candidate row."""
    params = ref.SparseParams(kernel_size=8, kernel_stride=4, block_size=block, init_blocks=init,
                              window_size=window, topk=3)
    T = 12 * block
    has = candidate_mask(torch.arange(T) // block, 12, params).any(dim=-1)
    assert int(has.float().argmax()) == first_candidate_row(params)
    assert bool(has[first_candidate_row(params):].all()) and not bool(has[:first_candidate_row(params)].any())


def test_short_sequence_gives_zero_with_gradient():
    q = torch.randn(40, 2, 16, requires_grad=True)  # 3 blocks: init + local cover everything
    loss, w = selection_alignment_loss(q, torch.randn(40, 1, 16), P, 0.25)
    assert float(loss.detach()) == 0.0 and float(w) == 0.0
    loss.backward()
    assert q.grad is not None


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="prefill"):
        selection_alignment_loss(torch.randn(4, 2, 16), torch.randn(8, 1, 16), P, 0.25)
    with pytest.raises(ValueError, match="rows"):
        selection_alignment_loss(torch.randn(8, 2, 16), torch.randn(8, 1, 16), P, 0.25, rows=0)


def test_row_chunks_do_not_change_the_loss():
    torch.manual_seed(0)
    q, k = torch.randn(200, 4, 16), torch.randn(200, 2, 16)
    a = selection_alignment_loss(q, k, P, 0.25, rows=64)
    b = selection_alignment_loss(q, k, P, 0.25, rows=64, chunk_elems=4 * 200 * 3)  # 3 rows a chunk
    assert torch.allclose(a[0], b[0], rtol=1e-5) and torch.allclose(a[1], b[1])


def test_training_on_it_lifts_the_block_attention_wants():
    """A needle the queries attend to but stage 1 ranks low: minimising the loss over the keys raises the
    needle block's stage-1 rank to the top (what the sparse layers of a converted model lack)."""
    torch.manual_seed(1)
    T, D = 256, 16
    q = torch.randn(T, 2, D) * 0.3
    k = torch.randn(T, 1, D) * 0.3
    direction = torch.randn(D)
    q[-8:, :, :] += 3.0 * direction / direction.norm()  # the last rows look for `direction`
    needle = 3 * 16 + 5  # one token in block 3: a strong token-level match, diluted by mean pooling
    k[needle, 0] = 4.0 * direction / direction.norm()
    k[3 * 16 + 7: 3 * 16 + 16, 0] -= 1.5 * direction / direction.norm()  # its neighbours pull the pool down
    k = k.clone().requires_grad_(True)
    rows = torch.arange(T - 8, T)

    def needle_rank():
        with torch.no_grad():
            k1 = ref.compress_keys(k, P.kernel_size, P.kernel_stride)
            k2 = ref.compress_keys(k, P.kernel_size2, P.kernel_stride2)
            s1 = ref.stage1_scores(q[rows], k1, k2, 0.25, ref.visible_counts(rows, T, k1.shape[0], 4),
                                   ref.visible_counts(rows, T, k2.shape[0], 16))
            bscore = ref.block_scores(s1, rows // 16, T // 16, P)[0, -1]
            cand = candidate_mask(rows[-1:] // 16, T // 16, P)[0]
            order = torch.argsort(bscore.masked_fill(~cand, float("-inf")), descending=True)
            return int((order == 3).nonzero()) + 1

    before = needle_rank()
    opt = torch.optim.Adam([k], lr=0.02)
    for _ in range(60):
        opt.zero_grad()
        loss, w = selection_alignment_loss(q, k, P, 0.25, rows=8)
        (loss / w).backward()
        opt.step()
    after = needle_rank()
    assert before > 1 and after == 1, (before, after)


def test_batch_fold_equals_the_sum_over_sequences():
    """Folding the batch into the heads keeps sequences and KV groups apart (sequence-major fold)."""
    torch.manual_seed(3)
    q, k = torch.randn(3, 130, 6, 16), torch.randn(3, 130, 2, 16)
    got = selection_alignment_loss_batch(q, k, P, 0.25, rows=50)
    want = [selection_alignment_loss(q[b], k[b], P, 0.25, rows=50) for b in range(3)]
    assert float(want[1][1]) > 0
    assert torch.allclose(got[0], sum(w[0] for w in want), rtol=1e-5)
    assert torch.allclose(got[1], sum(w[1] for w in want), rtol=1e-5)
    with pytest.raises(ValueError, match="expected q"):
        selection_alignment_loss_batch(q[0], k[0], P, 0.25)
