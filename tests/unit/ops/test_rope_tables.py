"""ops.rope: the readable RoPE tables and the one-launch kernel behind LONGSPEC_ROPE_TABLES give the same tables
and slots; which path a call takes; and, through Inductor's CPU code generation, that a compiled static-shape
step of a model whose layers fuse q/k/v, RoPE and the cache write makes its tables once, by the one op, instead
of once per layer (the readable path's compiled code computes cos and sin itself)."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # the kernels run in Triton's interpreter on the CPU

import pytest  # noqa: E402
import torch  # noqa: E402

from longspec_lab.models.config import ModelConfig  # noqa: E402
from longspec_lab.models.layers import Rotary, rope_inv_freq  # noqa: E402
from longspec_lab.models.target import Target  # noqa: E402
from longspec_lab.ops import linear, rope  # noqa: E402


def _pos(T, base=1000, seed=0):
    return base + torch.randint(0, 6, (1, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_paths_give_the_same_tables_and_slots(monkeypatch, dtype):
    cfg = ModelConfig(vocab_size=32, hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=32,
                      intermediate_size=64, max_position_embeddings=4096)  # fmt: skip
    inv, pos, start = rope_inv_freq(cfg), _pos(12), torch.tensor([990])
    got = {}
    for value in ("off", "on"):
        monkeypatch.setattr(rope, "ROPE_TABLES", value)
        got[value] = rope.rope_tables(pos, inv, dtype, start)
    (c0, s0, p0), (c1, s1, p1) = got["off"], got["on"]
    assert c1.shape == c0.shape == (1, 1, 12, 32) and torch.equal(p0, p1) and torch.equal(p1, 990 + torch.arange(12))
    ulp = 2e-6 if dtype == torch.float32 else 2**-8  # numpy's float32 cos (interpreter) against torch's
    torch.testing.assert_close(c1.float(), c0.float(), atol=ulp, rtol=0)
    torch.testing.assert_close(s1.float(), s0.float(), atol=ulp, rtol=0)
    cos, sin = Rotary(cfg)(pos, dtype)  # the module keeps the readable path: no start, no kernel
    assert torch.equal(cos, c0) and torch.equal(sin, s0)


def test_which_path_a_call_takes(monkeypatch):
    """ "auto" (the default): the kernel on CUDA only, and only with a device start (a static-shape step); "on"
    also under the interpreter; "off" never; float64 frequencies or int32 positions keep the PyTorch ops."""
    inv, pos, start = torch.ones(16), torch.zeros(1, 3, dtype=torch.long), torch.tensor([0])
    assert rope.ROPE_TABLES == "auto" or os.environ.get("LONGSPEC_ROPE_TABLES")
    for value, want in {"auto": False, "on": rope.HAS_TRITON, "off": False}.items():
        monkeypatch.setattr(rope, "ROPE_TABLES", value)
        assert rope._kernel_path(pos, inv, torch.bfloat16, start) == want, value
        assert not rope._kernel_path(pos, inv, torch.bfloat16, None)  # no start: Rotary's readable tables
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    monkeypatch.setattr(rope, "ROPE_TABLES", "auto")
    assert rope._kernel_path(pos, inv, torch.bfloat16, start) == rope.HAS_TRITON
    assert not rope._kernel_path(pos, inv.double(), torch.float64, start)
    assert not rope._kernel_path(pos.int(), inv, torch.bfloat16, start)
    assert not rope._kernel_path(pos, inv, torch.bfloat16, 5)  # an int start: the prompt pass
    monkeypatch.setattr(rope, "ROPE_TABLES", "sometimes")
    with pytest.raises(ValueError, match="LONGSPEC_ROPE_TABLES='sometimes' is not one of auto, off, on"):
        rope._kernel_path(pos, inv, torch.bfloat16, start)


def test_compiled_static_step_makes_the_tables_once(monkeypatch):
    """A 3-layer model with fused q/k/v (head dim 32, so qkv_rope_cache serves), one decode row at a device start,
    compiled with Inductor. Off, the generated code computes cos and sin and hands every layer's op its own copy
    of the tables (3 layers, 3 buffers: on the GPU, one kernel each); on, one call of the tables op makes them,
    every layer reads the same buffers and no generated kernel computes a cosine. The logits are equal."""
    import re

    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(3)
    cfg = ModelConfig(vocab_size=48, hidden_size=64, num_layers=3, num_heads=2, num_kv_heads=1, head_dim=32,
                      intermediate_size=96, max_position_embeddings=512)  # fmt: skip
    model = Target(cfg).eval().fuse()
    monkeypatch.setattr(linear, "QKV_ROPE", "on")
    ids, P = torch.tensor([[5]]), torch.tensor([40])

    def step(cache):
        return model(ids, positions=P, cache=cache, start=P, last_only=True)

    out = {}
    for value in ("off", "on"):
        monkeypatch.setattr(rope, "ROPE_TABLES", value)
        torch._dynamo.reset()
        with torch.no_grad():
            logits, codes = run_and_get_code(torch.compile(step, fullgraph=True, dynamic=False), model.new_cache(64))
        code = "\n".join(codes)
        calls = re.findall(r"torch\.ops\.longspec\.qkv_rope_cache\.default\(([^)]*)\)", code)
        tables = {tuple(c.split(", ")[4:6]) for c in calls}  # the cos, sin buffers each layer's op reads
        out[value] = logits, len(calls), len(tables), code.count("rope_tables.default("), ".cos()" in code
    torch._dynamo.reset()
    assert out["off"][1:] == (3, 3, 0, True)  # 3 layers, 3 copies of the tables, computed in generated code
    assert out["on"][1:] == (3, 1, 1, False)  # 3 layers, 1 pair of tables, made by the op
    torch.testing.assert_close(out["on"][0], out["off"][0], atol=1e-5, rtol=1e-5)
