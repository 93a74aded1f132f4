"""The sparse layers' hook for the selection alignment loss (sala.layers.sparse.selection_alignment)."""

import pytest
import torch

from sala.layers.sparse import SparseAttention, selection_alignment
from sala.ops.selection_loss import selection_alignment_loss
from sala.testing import make_model, random_ids, small_config


def _model():
    cfg = small_config(sparse_config=dict(kernel_size=8, kernel_stride=4, init_blocks=1, block_size=16, window_size=16,
                                          topk=2, dense_len=64))
    return cfg, make_model(cfg)


def test_terms_per_sequence_and_layer_and_the_forward_unchanged():
    cfg, model = _model()
    ids = random_ids(cfg, 2, 96)
    am = torch.ones_like(ids)
    am[1, 80:] = 0  # the second row has 80 real tokens
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=am).logits
    with selection_alignment(model, rows=24) as terms:
        got = model(input_ids=ids, attention_mask=am).logits
    assert torch.equal(got, want)
    assert len(terms) == 2 * 2  # 2 sparse layers x 2 rows
    # the first layer's first row, recomputed from its q and k
    layer = model.model.layers[1].self_attn
    assert isinstance(layer, SparseAttention)
    seen = {}
    h = layer.k_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("k", o))
    hq = layer.q_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("q", o))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=am)
    h.remove(), hq.remove()
    q = seen["q"][0].view(96, layer.num_heads, layer.head_dim)
    k = seen["k"][0].view(96, layer.num_kv_heads, layer.head_dim)
    ref = selection_alignment_loss(q, k, layer.params, layer.scale, 24)
    assert torch.allclose(terms[0][0], ref[0], rtol=1e-5) and torch.allclose(terms[0][1], ref[1])
    assert terms[0][0].requires_grad
    assert all(m.selection_terms is None for m in model.modules() if isinstance(m, SparseAttention))


def test_equal_length_batch_gives_one_term_per_layer_equal_to_the_rows_sum():
    """Unpadded rows go through the loss in one call per layer (the batch folded into the heads)."""
    cfg, model = _model()
    ids = random_ids(cfg, 3, 96)
    with selection_alignment(model, rows=24) as terms:
        model(input_ids=ids)
    assert len(terms) == 2  # 2 sparse layers, all 3 rows at once
    layer = model.model.layers[1].self_attn
    seen = {}
    h = layer.k_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("k", o))
    hq = layer.q_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("q", o))
    with torch.no_grad():
        model(input_ids=ids)
    h.remove(), hq.remove()
    per_row = [selection_alignment_loss(seen["q"][b].view(96, layer.num_heads, layer.head_dim),
                                        seen["k"][b].view(96, layer.num_kv_heads, layer.head_dim),
                                        layer.params, layer.scale, 24) for b in range(3)]
    assert float(per_row[0][1]) > 0
    assert torch.allclose(terms[0][0], sum(t[0] for t in per_row), rtol=1e-5)
    assert torch.allclose(terms[0][1], sum(t[1] for t in per_row), rtol=1e-5)


def test_no_terms_without_gradient_and_rows_checked():
    cfg, model = _model()
    with selection_alignment(model, rows=8) as terms, torch.no_grad():
        model(input_ids=random_ids(cfg, 1, 96))
    assert terms == []
    with pytest.raises(ValueError, match="rows"):
        with selection_alignment(model, rows=0):
            pass


def test_packed_documents_give_one_term_each():
    cfg, model = _model()
    ids = random_ids(cfg, 1, 150)
    cu = torch.tensor([0, 70, 150])
    pos = torch.cat([torch.arange(70), torch.arange(80)])[None]
    with selection_alignment(model, rows=8) as terms:
        model.model.layers[1].self_attn(model.model.embed_tokens(ids), pos, cu_seqlens=cu)
    assert len(terms) == 2


def test_gradient_reaches_only_the_sparse_layers_q_and_k():
    cfg, model = _model()
    with selection_alignment(model, rows=24) as terms:
        model(input_ids=random_ids(cfg, 1, 96))
    sum(t[0] for t in terms).backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)}
    assert got == {f"model.layers.{i}.self_attn.{w}_proj.weight" for i in (1, 3) for w in ("q", "k")}
