"""The Triton kernel inside the real decoder (interpreted on the CPU): greedy tree generation on the
embedded model gives the torch backend's tokens, eager and on the static fast path."""

import importlib
import os
import sys

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"
_MOD = "longspec_lab.kernels.tree_attention"
if _MOD in sys.modules and not sys.modules[_MOD]._INTERPRET:  # imported earlier without the interpreter
    importlib.reload(sys.modules[_MOD])

from longspec_lab.decoding.eager import SpecDecoder  # noqa: E402


@pytest.mark.parametrize(
    "text",
    [
        "import os\nimport sys\n\n\ndef main(argv):\n    ",
        "class Stack:\n    def __init__(self):\n        self.items = []\n",
    ],
)
def test_triton_backend_matches_torch(embedded_pair, text):
    target, draft, tok = embedded_pair
    ids = tok.encode(text)
    ref = SpecDecoder(target, draft, backend="torch").generate(ids, max_new_tokens=12, stop_at_eos=False)
    got = SpecDecoder(target, draft, backend="triton").generate(ids, max_new_tokens=12, stop_at_eos=False)
    assert got.new_tokens == ref.new_tokens and got.target_calls == ref.target_calls


def test_triton_static_attention_matches_torch():
    """The graph-capturable path (device prefix length) against the eager hybrid attention."""
    from longspec_lab.ops.attention import attend

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 9, 64, generator=g)
    k, v = torch.randn(1, 2, 80, 64, generator=g), torch.randn(1, 2, 80, 64, generator=g)
    mask = torch.rand(9, 9, generator=g) < 0.5
    mask |= torch.eye(9, dtype=torch.bool)
    with torch.inference_mode():
        ref = attend(q, k, v, 30, mask, backend="torch")
        for be in ("torch", "sdpa"):
            torch.testing.assert_close(attend(q, k, v, torch.tensor([30]), mask, backend=be), ref, atol=1e-5, rtol=1e-5)


def test_a_verify_pass_packs_its_tree_mask_once(embedded_pair, monkeypatch):
    """The target packs the tree mask once per pass for all its layers (compiled, each layer's packing was a kernel
    of its own), and the pass's logits equal the torch backend's."""
    import longspec_lab.kernels.tree_attention as ta
    from longspec_lab.spec.tree import TreeShape

    target = embedded_pair[0]
    packs = []
    real = ta._pack_bits
    monkeypatch.setattr(ta, "_pack_bits", lambda m: packs.append(m.shape) or real(m))
    shape = TreeShape([2, 2, 2])
    g = torch.Generator().manual_seed(3)
    N, P = shape.num_nodes, 40
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, N)]
    toks = torch.randint(1, 4000, (1, P + N), generator=g)
    out = {}
    with torch.inference_mode():  # as the decoder runs: an inference tensor has no version to cache a pack by
        anc = torch.zeros(N, N, dtype=torch.bool)
        for i, p in enumerate(parents):
            if p >= 0:
                anc[i] = anc[p]
            anc[i, i] = True
        for be in ("torch", "triton"):
            cache = target.new_cache(P + N)
            target(toks[:, :P], cache=cache, start=0, backend="torch")
            pos = (P + anc.sum(1) - 1)[None]
            out[be] = target(toks[:, P:], positions=pos, cache=cache, start=torch.tensor([P]), mask=anc, backend=be)
    assert packs == [(N, N)]  # one pack for the target's layers
    assert target.config.num_layers > 1
    torch.testing.assert_close(out["triton"], out["torch"], atol=2e-4, rtol=1e-4)

    # compiled (fullgraph, as the graph path compiles a verify): the traced pass packs once too, where each layer's
    # own packing had become Inductor kernels, and it computes the same logits
    packs.clear()
    torch._dynamo.reset()
    with torch.inference_mode():
        cache = target.new_cache(P + N)
        target(toks[:, :P], cache=cache, start=0, backend="torch")
        start = torch.tensor([P])
        verify = torch.compile(
            lambda t: target(t, positions=pos, cache=cache, start=start, mask=anc, backend="triton"),
            fullgraph=True, backend="aot_eager",
        )  # fmt: skip
        compiled = verify(toks[:, P:])
    assert packs == [(N, N)]
    torch.testing.assert_close(compiled, out["triton"], atol=1e-5, rtol=1e-5)
