"""TreeBuffers, the static buffers a step drafts into: the tree mask grown level by level (from the parents'
pointers) equals the brute-force ancestor walk, for beam and sampled levels; and the beam's scores, decoded
from the top-k keys' bits, are the float32 scores themselves, bit for bit, special values included."""

import pytest
import torch

from longspec_lab.spec.draft import TreeBuffers, _from_order_key, _order_key, grow_beam_level, grow_sampled_level
from longspec_lab.spec.tree import tree_mask


@pytest.mark.parametrize("widths", [[1], [3, 1, 2], [4, 16, 16, 16, 16], [1, 2, 4, 4, 4, 4, 4], [2, 5, 1, 7]])
@pytest.mark.parametrize("rule", ["beam", "sampled"])
def test_mask_rows_equal_the_ancestor_walk(widths, rule):
    g = torch.Generator().manual_seed(len(widths) * 7 + sum(widths))
    V = 37
    buf = TreeBuffers(widths, "cpu")
    buf.start(torch.tensor([5]))
    for l in range(1, len(widths) + 1):
        lo, hi = buf.levels[l - 1]
        logits = torch.randn(hi - lo, V, generator=g)
        if rule == "beam":
            grow_beam_level(buf, l, torch.log_softmax(logits, -1))
        else:
            grow_sampled_level(buf, l, torch.softmax(logits, -1), g)
        n = buf.levels[l][1]
        assert torch.equal(buf.anc[:n, :n], tree_mask(buf.parents[:n]))  # brute force: pointer chasing
        assert not buf.anc[:n, n:].any() and not buf.anc[n:].any()  # nothing beyond the levels grown so far


def test_scores_decode_from_the_key_bits():
    special = [0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), 1e-45, -1e-45, 3.4028235e38, -3.4028235e38]
    x = torch.cat([torch.tensor(special), torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 30])
    keys = _order_key(x)
    back = _from_order_key(keys)
    assert torch.equal(back.view(torch.int32), x.view(torch.int32))  # bit for bit (the sign of -0.0 included)
    assert torch.equal(_from_order_key((keys << 32) + 12345 >> 32).view(torch.int32), x.view(torch.int32))
    order = torch.argsort(keys)
    assert torch.all(x[order][1:] >= x[order][:-1])  # and the keys sort as the values do
