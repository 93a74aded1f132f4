"""sala.ops.linear_ce: the chunked head + cross-entropy against the eager logits path (float64, float32 and
bf16 autocast), gradients included, and the model's chunked loss against its full-logits loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sala.ops.linear_ce import chunked_linear_cross_entropy


def _inputs(dtype, n=37, hidden=24, vocab=53, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, dtype=dtype) * 2
    w = torch.randn(vocab, hidden, generator=g, dtype=dtype) / 3
    t = torch.randint(0, vocab, (n,), generator=g)
    t[[3, 10, 11]] = -100
    tw = torch.rand(n, generator=g, dtype=dtype) * 5
    return h, w, t, tw


def _eager(h, w, t, tw, divisor):
    per_tok = F.cross_entropy(F.linear(h / divisor, w).float() if h.dtype != torch.float64 else F.linear(h / divisor, w),
                              t, ignore_index=-100, reduction="none")
    return (per_tok * tw.to(per_tok.dtype)).sum()


@pytest.mark.parametrize("chunk", [1, 8, 1000])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_eager_in_float64(chunk, weighted):
    h, w, t, tw = _inputs(torch.float64)
    tw = tw if weighted else torch.ones_like(tw)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = _eager(h1, w1, t, tw, 1.7)
    ref.backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    got = chunked_linear_cross_entropy(h2, w2, t, tw if weighted else None, divisor=1.7, chunk=chunk)
    got.backward()
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-10, atol=1e-12)
    assert h2.grad[[3, 10, 11]].abs().max() == 0  # ignored targets get no gradient


def test_bf16_autocast_matches_the_eager_autocast_path():
    h, w, t, tw = _inputs(torch.float32, n=64)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _eager(h1, w1, t, tw, 1.0)
    ref.backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_linear_cross_entropy(h2, w2, t, tw, chunk=16)
    got.backward()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    for a, b in ((h2.grad, h1.grad), (w2.grad, w1.grad)):
        assert ((a - b).norm() / b.norm()) < 2e-2  # bf16 products on both sides, rounded in different places
        assert a.dtype == torch.float32


def test_bad_shapes_are_named():
    h, w, t, tw = _inputs(torch.float32)
    with pytest.raises(ValueError, match="targets"):
        chunked_linear_cross_entropy(h, w, t[:-1])
    with pytest.raises(ValueError, match="token_weights"):
        chunked_linear_cross_entropy(h, w, t, tw[:-1])


def test_model_chunked_loss_equals_full_logits_loss():
    from sala.testing import make_model, small_config

    cfg = small_config(vocab_size=101, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, lightning_nkv=4, tie_word_embeddings=True)
    model = make_model(cfg, 3).double().train()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 101, (2, 40), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100
    weights = 1 + 9 * (torch.rand(2, 40, generator=g) > 0.8).double()
    grads = []
    for kw in ({}, {"loss_chunk_tokens": 16}):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=labels, loss_weights=weights, use_cache=False, **kw)
        out.loss.backward()
        grads.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        assert (out.logits is None) == bool(kw)
    (l0, g0), (l1, g1) = grads
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-12)
    assert g0.keys() == g1.keys() and "model.embed_tokens.weight" in g0  # tied head: the gradient reaches it
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-9, atol=1e-12, msg=n)
    plain = model(input_ids=ids, labels=labels, use_cache=False)  # unweighted: the usual mean cross-entropy
    ref = F.cross_entropy(plain.logits[:, :-1].reshape(-1, 101), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(plain.loss, ref)


def test_kl_matches_eager_in_float64():
    from sala.ops.linear_ce import chunked_linear_kl

    h, w, _, tw = _inputs(torch.float64)
    teacher = torch.randn(h.shape[0], w.shape[0], generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 3
    mask = tw > 1.5
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    log_s, log_t = F.log_softmax(F.linear(h1 / 1.3, w1), -1), F.log_softmax(teacher, -1)
    ref = ((log_t.exp() * (log_t - log_s)).sum(-1) * mask).sum()
    ref.backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    got = chunked_linear_kl(h2, w2, teacher, mask.double(), divisor=1.3, chunk=7)
    got.backward()
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-10, atol=1e-12)
    assert h2.grad[~mask].abs().max() == 0 and got > 0


def test_model_chunked_kl_equals_full_logits_kl_with_padding():
    from sala.testing import make_model, small_config

    cfg = small_config(vocab_size=101, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, lightning_nkv=4)
    model = make_model(cfg, 4).double().train()
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(3, 101, (2, 30), generator=g)
    am = torch.ones_like(ids)
    am[1, 22:] = 0  # a right-padded row
    teacher = torch.randn(2, 30, 101, generator=g, dtype=torch.float64) * 2
    res = []
    for kw in ({}, {"loss_chunk_tokens": 11}):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=am, teacher_logits=teacher, use_cache=False, **kw)
        out.loss.backward()
        res.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = res
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-12)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-9, atol=1e-12, msg=n)
    with pytest.raises(ValueError, match="not both"):
        model(input_ids=ids, labels=ids, teacher_logits=teacher)


def test_trainer_reference_losses_equal_the_chunked_ones():
    """losses.lm_sum / kl_sum (full logits) and the chunked ops give the same sums on the same rows."""
    from sala.ops.linear_ce import chunked_linear_kl
    from sala.train.losses import kl_sum, lm_sum

    g = torch.Generator().manual_seed(11)
    h, w = torch.randn(2, 30, 16, generator=g), torch.randn(41, 16, generator=g) / 2
    labels = torch.randint(0, 41, (2, 30), generator=g)
    labels[1, 20:] = -100
    weights = 1 + 3 * (torch.rand(2, 30, generator=g) > 0.7).float()
    logits = F.linear(h, w)
    s, c = lm_sum(logits, labels, weights)
    got = chunked_linear_cross_entropy(h[:, :-1].reshape(-1, 16), w, labels[:, 1:].reshape(-1),
                                       weights[:, 1:].reshape(-1), chunk=13)
    torch.testing.assert_close(got, s, rtol=1e-5, atol=1e-4)
    assert c == (labels[:, 1:] != -100).sum()
    teacher = torch.randn(2, 30, 41, generator=g)
    mask = labels != -100
    s_kl, _ = kl_sum(logits, teacher, mask)
    got_kl = chunked_linear_kl(h.reshape(-1, 16), w, teacher.reshape(-1, 41), mask.reshape(-1).float(), chunk=7)
    torch.testing.assert_close(got_kl, s_kl, rtol=1e-5, atol=1e-4)
