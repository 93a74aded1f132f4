import pytest
import torch

from sala import SALAConfig, SALAForCausalLM
from sala.data.packing import IGNORE, pack_documents, repack, unpack_segments


def _docs(seed=0, n=5, vocab=50):
    g = torch.Generator().manual_seed(seed)
    lens = [3, 17, 9, 30, 6][:n]
    return [torch.randint(3, vocab, (L,), generator=g).tolist() for L in lens]


def test_pack_layout_positions_labels():
    docs = _docs()
    p = pack_documents(docs, seq_len=16, eos_id=2)
    flat = [t for d in docs for t in d + [2]]
    got = p.input_ids[p.segment_ids >= 0].tolist()
    assert got == flat  # every token once, in order (no 1-token tails here)
    for r in range(len(p)):
        seg, pos = p.segment_ids[r], p.position_ids[r]
        for s in seg[seg >= 0].unique().tolist():
            cols = (seg == s).nonzero().flatten()
            assert torch.equal(pos[cols], torch.arange(len(cols)))  # positions restart per segment
            assert p.labels[r, cols[0]] == IGNORE  # no prediction across a boundary
            assert torch.equal(p.labels[r, cols[1:]], p.input_ids[r, cols[1:]])
        assert (p.labels[r][seg < 0] == IGNORE).all()
    cu = p.cu_seqlens(0)
    assert cu[0] == 0 and cu[-1] == int((p.segment_ids[0] >= 0).sum())


def test_split_document_and_drop_last():
    p = pack_documents([list(range(3, 40))], seq_len=16, drop_last=True)
    assert len(p) == 2 and (p.segment_ids >= 0).all()
    assert p.position_ids[1, 0] == 0  # the continuation is its own segment
    p2 = pack_documents([list(range(3, 40))], seq_len=16)
    assert len(p2) == 3 and int((p2.segment_ids[2] >= 0).sum()) == 5


def _tiny_sala(seed=0):
    torch.manual_seed(seed)
    cfg = SALAConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, lightning_nkv=4,
                     mixer_types=["lightning", "minicpm4"], scale_emb=1, scale_depth=1.4, dim_model_base=32,
                     initializer_range=0.3, max_position_embeddings=512, pad_token_id=None)
    return SALAForCausalLM(cfg).eval()


def test_unpacked_forward_equals_each_document_alone():
    model = _tiny_sala()
    docs = _docs()
    p = pack_documents(docs, seq_len=24, eos_id=2)
    u = unpack_segments(p)
    with torch.no_grad():
        out = model(u.input_ids, attention_mask=u.attention_mask, use_cache=False).logits
        packed_logits = repack(out, u, tuple(p.input_ids.shape))
        naive = model(p.input_ids, use_cache=False).logits  # no boundaries: state crosses documents
        crossed = False
        for r in range(len(p)):
            for s in p.segment_ids[r][p.segment_ids[r] >= 0].unique().tolist():
                cols = (p.segment_ids[r] == s).nonzero().flatten()
                alone = model(p.input_ids[r, cols][None], use_cache=False).logits[0]
                torch.testing.assert_close(packed_logits[r, cols], alone, atol=1e-5, rtol=1e-5)
                crossed |= not torch.allclose(naive[r, cols], alone, atol=1e-3)
    assert crossed  # the boundary handling matters: without it later documents see earlier ones


def test_marks_travel_with_their_tokens_through_packing_concat_and_unpacking():
    from sala.data.packing import concat_packed, pack_documents, unpack_segments

    docs = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]
    marks = [[False, True, False, False, True], [True, False, False], [False, False, True, True]]
    p = pack_documents(docs, seq_len=6, eos_id=2, marks=marks)
    for r in range(len(p)):
        for c in range(6):
            tok = int(p.input_ids[r, c])
            want = any(t == tok and m for d, ms in zip(docs, marks) for t, m in zip(d, ms))
            assert bool(p.marks[r, c]) == want, (r, c, tok)  # eos, padding and unmarked tokens: False
    plain = pack_documents(docs, seq_len=6, eos_id=2)
    assert plain.marks is None
    both = concat_packed([p, plain])
    assert both.marks.shape == both.input_ids.shape and not both.marks[len(p):].any()
    assert torch.equal(both.marks[: len(p)], p.marks) and both[0:1].marks.shape == (1, 6)
    u = unpack_segments(p)
    for j in range(len(u.lengths)):
        n = int(u.lengths[j])
        r, c = int(u.src_row[j]), int(u.src_start[j])
        assert torch.equal(u.marks[j, :n], p.marks[r, c: c + n]) and not u.marks[j, n:].any()
    assert unpack_segments(plain).marks is None
    with pytest.raises(ValueError, match="marks"):
        pack_documents(docs, seq_len=6, marks=[[True]] * 3)
