"""sala.ops.dispatch settings that are not a kernel choice."""

import pytest

from sala.ops import dispatch


def test_sparse_union_lanes_is_set_inside_the_block_and_restored():
    from sala.ops import infllmv2_triton_attn as attn

    before = attn.UNION_LANES
    with dispatch.sparse_union_lanes(16):
        assert attn.UNION_LANES == 16
        with dispatch.sparse_union_lanes(0):  # 0 leaves the setting alone
            assert attn.UNION_LANES == 16
    assert attn.UNION_LANES == before
    with pytest.raises(RuntimeError), dispatch.sparse_union_lanes(8):
        raise RuntimeError("restored on errors too")
    assert attn.UNION_LANES == before


def test_sparse_union_lanes_rejects_a_negative_count():
    with pytest.raises(ValueError, match="union lanes"), dispatch.sparse_union_lanes(-1):
        pass
