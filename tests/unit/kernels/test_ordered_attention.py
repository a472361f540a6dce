"""Position-ordered attention (kernels/ordered_attention.py): the definition against a brute-force
per-row softmax in float64, the Triton kernel (CPU interpreter) against the definition, and the property
it exists for: a token's output is bit-identical whether its ancestors are tree keys of a verification
block or committed prefix keys of an AR step, in float32 and bf16, for the kernel and the fallback."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the kernels' @triton.jit definitions

import importlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

for _mod in ("longspec_lab.kernels.tree_attention", "longspec_lab.kernels.ordered_attention"):
    if _mod in sys.modules and not sys.modules[_mod]._INTERPRET:
        importlib.reload(sys.modules[_mod])  # imported earlier without the interpreter: redefine kernels
import longspec_lab.kernels.ordered_attention as oa  # noqa: E402
from longspec_lab.spec.tree import tree_mask  # noqa: E402


def _tree_mask(parents):
    """[T, T] bool: row i sees itself and its ancestors (the mask is an input here, not under test)."""
    return tree_mask(torch.tensor(parents))


def _case(P, parents, Hq=4, Hkv=2, D=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    T = len(parents)
    q = torch.randn(1, Hq, T, D, generator=g).to(dtype)
    k = torch.randn(1, Hkv, P + T + 3, D, generator=g).to(dtype)  # 3 spare slots past the block
    v = torch.randn(1, Hkv, P + T + 3, D, generator=g).to(dtype)
    return q, k, v, _tree_mask(parents)


PARENTS = [-1, 0, 1, 1, 0, 4, 2, 6, 3]  # a pending chain root, then a small tree


@pytest.mark.parametrize("P", [0, 5, 37])
def test_reference_equals_brute_force(P):
    q, k, v, mask = _case(P, PARENTS)
    got = oa.ordered_attention_reference(q, k, v, P, mask)
    Hq, Hkv, T, D = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    for h in range(Hq):
        for i in range(T):
            keys = list(range(P)) + [P + j for j in range(T) if mask[i, j]]
            kk, vv = k[0, h // (Hq // Hkv), keys].double(), v[0, h // (Hq // Hkv), keys].double()
            w = torch.softmax(kk @ q[0, h, i].double() * D**-0.5, 0)
            torch.testing.assert_close(got[0, h, i], w @ vv, rtol=0, atol=1e-12)


@pytest.mark.parametrize("P", [0, 5, 37])
def test_triton_kernel_matches_reference(P):
    q, k, v, mask = _case(P, PARENTS, seed=P)
    want = oa.ordered_attention_reference(q, k, v, P, mask)
    got = oa.ordered_attention(q, k, v, torch.tensor([P]), mask, kernel=True)
    assert got.dtype == q.dtype
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["triton", "fallback"])
def test_a_token_sees_the_same_sums_in_a_tree_and_in_an_ar_step(dtype, impl):
    P = 21
    q, k, v, mask = _case(P, PARENTS, seed=3, dtype=dtype)

    def fn(q, k, v, P, m):
        if impl == "triton":
            return oa.ordered_attention(q, k, v, P, m, kernel=True)
        return oa.ordered_attention_reference(q, k, v, P, m, dtype=torch.float32).to(q.dtype)

    tree_out = fn(q, k, v, torch.tensor([P]), mask)
    for i in range(len(PARENTS)):
        q2, k2, v2, P2, eye = oa.as_ar_step(q, k, v, P, mask, i)
        ar_out = fn(q2, k2, v2, torch.tensor([P2]), eye)
        assert torch.equal(ar_out[:, :, 0], tree_out[:, :, i]), f"row {i}"


def test_bad_head_dim_names_the_problem():
    q = torch.zeros(1, 2, 3, 12)
    with pytest.raises(ValueError, match="power-of-two head dim"):
        oa.ordered_attention(q, torch.zeros(1, 2, 5, 12), torch.zeros(1, 2, 5, 12), 2, torch.eye(3, dtype=torch.bool))


@pytest.mark.parametrize("impl", ["triton", "fallback"])
def test_padding_rows_cost_nothing_and_leave_real_rows_alone(impl):
    """Rows with an all-False mask row give 0, and the real rows' outputs are the same bits as without
    padding rows beside them."""
    P = 13
    q, k, v, mask = _case(P, PARENTS, seed=5)
    T = mask.shape[0]
    padded = torch.zeros(T + 4, T + 4, dtype=torch.bool)
    padded[:T, :T] = mask
    q2 = torch.cat([q, torch.randn(1, q.shape[1], 4, q.shape[3], generator=torch.Generator().manual_seed(9))], 2)
    k2 = torch.cat([k[:, :, : P + T], torch.randn(1, k.shape[1], 4, k.shape[3])], 2)
    v2 = torch.cat([v[:, :, : P + T], torch.randn(1, v.shape[1], 4, v.shape[3])], 2)
    kw = {"kernel": True} if impl == "triton" else {"kernel": False}
    alone = oa.ordered_attention(q, k, v, torch.tensor([P]), mask, **kw)
    both = oa.ordered_attention(q2, k2, v2, torch.tensor([P]), padded, **kw)
    assert torch.equal(both[:, :, :T], alone)
    assert torch.equal(both[:, :, T:], torch.zeros_like(both[:, :, T:]))
