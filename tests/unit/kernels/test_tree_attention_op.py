"""The registered op `torch.ops.longspec.tree_attention_packed` (kernels/tree_attention.py) under the CPU
interpreter: it matches the float64 reference, its fake version agrees with the real one (opcheck), and
torch.compile(fullgraph=True) traces `tree_attention(..., max_prefix=...)` into one graph holding the op."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the kernel module's @triton.jit definitions

import importlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

_MOD = "longspec_lab.kernels.tree_attention"
if _MOD in sys.modules and not sys.modules[_MOD]._INTERPRET:
    importlib.reload(sys.modules[_MOD])  # imported earlier without the interpreter: redefine kernels
import longspec_lab.kernels.tree_attention as ta  # noqa: E402

OP = torch.ops.longspec.tree_attention_packed


def _tree_mask(T, gen, n_pending):
    """n_pending causal rows, then random parents; mask[i, j] = j is i or one of its ancestors."""
    m = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        if i < n_pending:
            p = i - 1
        else:
            p = int(torch.randint(n_pending - 1, i, (1,), generator=gen))
        if p >= 0:
            m[i] = m[p]
        m[i, i] = True
    return m


def _inputs(seed, B=2, Hq=8, Hkv=2, T=9, D=64, S=200):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, D, generator=gen).transpose(1, 2)  # [B, Hq, T, D] strided like a projection
    k = torch.randn(2, B, Hkv, S, D, generator=gen)[1]  # cache.k[layer]-style view
    v = torch.randn(2, B, Hkv, S, D, generator=gen)[0]
    return q, k, v, _tree_mask(T, gen, n_pending=3)


@pytest.mark.parametrize("lens, causal, scale", [([150, 37], False, None), ([0, 191], True, 0.2), ([64], False, None)])
def test_op_matches_float64_reference(lens, causal, scale):
    q, k, v, mask = _inputs(len(lens) + sum(lens))
    if len(lens) == 1:
        q, k, v = q[:1], k[:1], v[:1]
    block = None if causal else mask
    pref = torch.tensor(lens)
    max_prefix = k.shape[2] - q.shape[2]
    packed = None if causal else ta._pack_bits(mask)
    o, lse = OP(q, k, v, pref, packed, max_prefix, scale)
    assert o.shape == q.shape and o.dtype == q.dtype
    assert o.transpose(1, 2).is_contiguous()  # [B, T, Hq, D] memory: the output projection reads it without a copy
    ro, rlse = ta.tree_attention_reference(q, k, v, pref, block, scale, return_lse=True, out_dtype=torch.float64)
    torch.testing.assert_close(o.double(), ro, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, rlse, atol=1e-4, rtol=1e-4)


def test_op_opcheck_fake_matches_real():
    """torch.library.opcheck: schema, fake (meta) shapes/strides against the real op, AOT dispatch."""
    q, k, v, mask = _inputs(5, B=2, Hq=4, Hkv=2, T=6, D=64, S=80)
    torch.library.opcheck(OP, (q, k, v, torch.tensor([30, 74]), ta._pack_bits(mask[:6, :6]), 74, None))
    torch.library.opcheck(OP, (q, k, v, torch.tensor([12]), None, 74, 0.3))


def test_op_bad_packed_mask_and_lengths():
    q, k, v, mask = _inputs(6)
    with pytest.raises(ValueError, match="packed_mask must be int32"):
        OP(q, k, v, torch.tensor([3, 4]), mask, 100)  # a bool mask where the packed one belongs
    with pytest.raises(ValueError, match="integer tensor with 1 or B"):
        OP(q, k, v, torch.tensor([3, 4, 5]), ta._pack_bits(mask), 100)


@pytest.mark.parametrize("backend, scale", [("eager", None), ("aot_eager", 0.3)])
def test_compile_fullgraph_traces_the_op(backend, scale):
    """fullgraph=True raises on any graph break; the captured graph must call the registered op, and the
    compiled function must equal eager (and the float64 reference)."""
    q, k, v, mask = _inputs(7)
    S, T = k.shape[2], q.shape[2]
    pref = torch.tensor([120, 5])

    def step(q, k, v, pref, mask):
        o, lse = ta.tree_attention(q, k, v, pref, mask, scale, return_lse=True, max_prefix=S - T)
        return o * 2.0, lse  # surrounding tensor code stays in the same graph

    graphs = []

    def spy(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=spy)
    o, lse = compiled(q, k, v, pref, mask)
    assert len(graphs) == 1
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert OP.default in targets or OP in targets, targets
    eo, else_ = step(q, k, v, pref, mask)
    torch.testing.assert_close(o, eo, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, else_, atol=1e-6, rtol=1e-6)
    ro = ta.tree_attention_reference(q, k, v, pref, mask, scale, out_dtype=torch.float64)
    torch.testing.assert_close(o.double(), 2 * ro, atol=2e-4, rtol=1e-4)
    pref.copy_(torch.tensor([3, 191]))  # new lengths in the same tensor: no retrace, new result
    o2, _ = compiled(q, k, v, pref, mask)
    assert len(graphs) == 1
    ro2 = ta.tree_attention_reference(q, k, v, pref, mask, scale, out_dtype=torch.float64)
    torch.testing.assert_close(o2.double(), 2 * ro2, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("lens, D, Hq, Hkv", [([150, 37], 64, 8, 2), ([0, 191], 128, 4, 4), ([64], 64, 4, 1)])
def test_prefix_only_is_the_prefix_alone(lens, D, Hq, Hkv):
    """prefix_only: the rows see [0, P) and never the T slots after it, as under an all-False block mask
    (float64 reference), through the op, `tree_attention(max_prefix=...)` and a host-length call; the T slots
    after the prefix hold NaN here, so reading any of them would show."""
    q, k, v, _ = _inputs(sum(lens) + D, B=len(lens), Hq=Hq, Hkv=Hkv, D=D)
    T, S = q.shape[2], k.shape[2]
    pref = torch.tensor(lens)
    none = torch.zeros(T, T, dtype=torch.bool)
    ro, rlse = ta.tree_attention_reference(q, k, v, pref, none, return_lse=True, out_dtype=torch.float64)
    for b, P in enumerate(lens):  # poison the block slots of each sequence
        k[b, :, P : P + T] = float("nan")
        v[b, :, P : P + T] = float("nan")
    o, lse = OP(q, k, v, pref, None, S - T, None, True)
    torch.testing.assert_close(o.double(), ro, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, rlse, atol=1e-4, rtol=1e-4)
    o2 = ta.tree_attention(q, k, v, pref, None, max_prefix=S - T, prefix_only=True)
    torch.testing.assert_close(o2, o, atol=0, rtol=0)
    o3 = ta.tree_attention(q, k, v, pref, prefix_only=True)
    torch.testing.assert_close(o3.double(), ro, atol=1e-4, rtol=1e-4)
    if lens[0] == 0:
        assert torch.all(o[0] == 0) and torch.all(lse[0] == float("-inf"))  # nothing to see: o = 0, lse = -inf


def test_prefix_only_opcheck_and_bad_mask():
    q, k, v, mask = _inputs(7, B=2, Hq=4, Hkv=2, T=6, D=64, S=80)
    torch.library.opcheck(OP, (q, k, v, torch.tensor([30, 74]), None, 74, None, True))
    with pytest.raises(ValueError, match="pass block_mask=None"):
        ta.tree_attention(q, k, v, torch.tensor([30, 74]), mask[:6, :6], max_prefix=74, prefix_only=True)
    with pytest.raises(ValueError, match="pass block_mask=None"):
        OP(q, k, v, torch.tensor([30, 74]), ta._pack_bits(mask[:6, :6]), 74, None, True)


def test_packed_mask_given_is_used_as_packed_by_the_call():
    """`packed_mask=` (a model packs its mask once per pass): the same result as packing inside the call, with
    host and device lengths and compiled; a mask packed from a different tree changes the result (it is read),
    and the words without the bool mask, or of the wrong width, are refused with the fix."""
    q, k, v, mask = _inputs(11)
    S, T = k.shape[2], q.shape[2]
    pref = torch.tensor([120, 5])
    words = ta.pack_block_mask(mask)
    ref = ta.tree_attention(q, k, v, pref, mask, max_prefix=S - T)
    torch.testing.assert_close(ta.tree_attention(q, k, v, pref, mask, max_prefix=S - T, packed_mask=words), ref,
                               atol=0, rtol=0)  # fmt: skip
    host = ta.tree_attention(q, k, v, torch.tensor([120, 5]), mask)  # host lengths: its own split plan
    torch.testing.assert_close(ta.tree_attention(q, k, v, torch.tensor([120, 5]), mask, packed_mask=words), host,
                               atol=0, rtol=0)  # fmt: skip
    torch._dynamo.reset()
    step = torch.compile(lambda *a: ta.tree_attention(*a, max_prefix=S - T, packed_mask=words), fullgraph=True,
                         backend="aot_eager")  # fmt: skip
    torch.testing.assert_close(step(q, k, v, pref, mask), ref, atol=1e-6, rtol=1e-6)
    other = ta.pack_block_mask(torch.eye(T, dtype=torch.bool))  # each node sees only itself
    assert not torch.allclose(ta.tree_attention(q, k, v, pref, mask, max_prefix=S - T, packed_mask=other), ref)
    with pytest.raises(ValueError, match="pass the bool block_mask with it"):
        ta.tree_attention(q, k, v, pref, None, max_prefix=S - T, packed_mask=words)
    with pytest.raises(ValueError, match="packed_mask must be int32"):
        ta.tree_attention(q, k, v, torch.tensor([120, 5]), mask, packed_mask=words[:, :, :2])
