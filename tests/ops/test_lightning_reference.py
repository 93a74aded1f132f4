"""The pure-PyTorch lightning reference against itself and a float64 recurrence (SPEC section 3)."""

from __future__ import annotations

import pytest
import torch

from sala.ops.lightning_reference import (
    alibi_slopes,
    lightning_attn_chunked,
    lightning_attn_recurrent,
    lightning_decay,
    lightning_decode_step,
)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def rand(*shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen)


def explicit_oracle(q, k, v, g, scale, h0):
    """S_t = exp(g) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t, written out in float64 for one sequence."""
    T, H, K = q.shape
    out = torch.empty(T, H, v.shape[-1], dtype=torch.float64)
    S = h0.double().clone()
    for t in range(T):
        for h in range(H):
            S[h] = torch.exp(g[h].double()) * S[h] + torch.outer(k[t, h].double(), v[t, h].double())
            out[t, h] = scale * (q[t, h].double() @ S[h])
    return out, S


def test_slopes_of_32_heads_match_spec():
    assert torch.allclose(alibi_slopes(32), torch.tensor([2 ** (-(h + 1) / 4) for h in range(32)]), rtol=1e-6)
    assert torch.equal(lightning_decay(9), -alibi_slopes(9))


@pytest.mark.parametrize("T", [1, 63, 64, 130, 1100])
def test_chunked_and_recurrent_match_float64(T):
    H, K, V = 3, 16, 32
    q, k, v = rand(2, T, H, K, seed=1), rand(2, T, H, K, seed=2), rand(2, T, H, V, seed=3)
    g = lightning_decay(H)
    h0 = rand(2, H, K, V, seed=4)
    ref_o, ref_s = lightning_attn_recurrent(q, k, v, g, initial_state=h0, dtype=torch.float64)
    # explicit loop on one sequence pins the recurrence itself (scale K^-0.5, current token included)
    o1, s1 = explicit_oracle(q[1], k[1], v[1], g, K**-0.5, h0[1])
    assert rel(ref_o[1], o1) < 1e-12 and rel(ref_s[1], s1) < 1e-12
    for o, s in (
        lightning_attn_chunked(q, k, v, g, initial_state=h0),
        lightning_attn_chunked(q, k, v, g, initial_state=h0, segment_chunks=2),
        lightning_attn_recurrent(q, k, v, g, initial_state=h0),
    ):
        assert o.dtype == torch.float32 and s.dtype == torch.float32
        assert rel(o, ref_o) < 1e-5 and rel(s, ref_s) < 1e-5


def test_varlen_with_empty_sequence_and_partial_chunks():
    H, K = 2, 16
    lens = [70, 0, 1, 129, 64]
    cu = torch.tensor([0] + lens).cumsum(0)
    T = sum(lens)
    q, k, v = (rand(1, T, H, K, seed=s) for s in (5, 6, 7))
    g = lightning_decay(H)
    h0 = rand(len(lens), H, K, K, seed=8)
    o, s = lightning_attn_chunked(q, k, v, g, initial_state=h0, cu_seqlens=cu)
    ro, rs = lightning_attn_recurrent(q, k, v, g, initial_state=h0, cu_seqlens=cu, dtype=torch.float64)
    assert rel(o, ro) < 1e-5 and rel(s, rs) < 1e-5
    assert torch.equal(s[1], h0[1])  # empty sequence: state passes through
    for n in range(len(lens)):  # each packed sequence equals that sequence run alone
        a, b = int(cu[n]), int(cu[n + 1])
        if b > a:
            on, sn = lightning_attn_recurrent(q[:, a:b], k[:, a:b], v[:, a:b], g, initial_state=h0[n : n + 1], dtype=torch.float64)
            assert rel(o[:, a:b], on) < 1e-5 and rel(s[n], sn[0]) < 1e-5


def test_decode_steps_continue_a_prefill():
    H, K = 3, 16
    q, k, v = (rand(2, 40, H, K, seed=s) for s in (9, 10, 11))
    g = lightning_decay(H)
    full_o, full_s = lightning_attn_recurrent(q, k, v, g, dtype=torch.float64)
    _, state = lightning_attn_chunked(q[:, :37], k[:, :37], v[:, :37], g)
    for t in range(37, 40):
        o = lightning_decode_step(q[:, t], k[:, t], v[:, t], g, state)
        assert rel(o, full_o[:, t]) < 1e-5
    assert rel(state, full_s) < 1e-5


def test_chunked_reference_is_differentiable():
    H, K = 2, 16
    q, k, v = (rand(1, 70, H, K, seed=s).requires_grad_(True) for s in (12, 13, 14))
    h0 = rand(1, H, K, K, seed=15).requires_grad_(True)
    g = lightning_decay(H)
    o, s = lightning_attn_chunked(q, k, v, g, initial_state=h0)
    (o.square().sum() + s.sum()).backward()
    # compare with autograd through the float64 recurrence
    qd, kd, vd, hd = (x.detach().double().requires_grad_(True) for x in (q, k, v, h0))
    ro, rs = lightning_attn_recurrent(qd, kd, vd, g, initial_state=hd, dtype=torch.float64)
    (ro.square().sum() + rs.sum()).backward()
    for a, b in zip((q, k, v, h0), (qd, kd, vd, hd)):
        assert rel(a.grad, b.grad) < 1e-5
