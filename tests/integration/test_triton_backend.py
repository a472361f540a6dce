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
