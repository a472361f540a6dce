"""Fused projections (one qkv and one gate_up matmul) against the separate Hugging Face modules, in
float64; the state dict keeps the Hugging Face names through fuse, save, load and unfuse."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from longspec_lab.models.config import PRESETS
from longspec_lab.models.layers import MLP, QKVO, fuse_projections
from longspec_lab.models.loaders import load_target, save_hf
from longspec_lab.models.target import Target

TINY = PRESETS["tiny"]


def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return module


def _qkvo(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(hidden=48, num_heads=6, num_kv_heads=2, head_dim=8, bias=True)
    return _randomize(QKVO(**{**args, **kw}).double(), seed)


@pytest.mark.parametrize("kw", [{}, {"o_bias": True}, {"qk_norm_eps": 1e-6}, {"bias": False}])
def test_qkvo_fused_equals_unfused_float64(kw):
    ref = _qkvo(**kw)
    fused = _qkvo(**kw).fuse()
    assert fused.fused and not hasattr(fused, "q_proj") and fused.qkv_proj.weight.shape == (80, 48)
    x = torch.randn(3, 7, 48, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    q0, k0, v0 = ref.split_q(x), *ref.split_kv(x)
    assert q0.shape == (3, 6, 7, 8) and k0.shape == v0.shape == (3, 2, 7, 8)
    for got in (fused.split_qkv(x), (fused.split_q(x), *fused.split_kv(x)), ref.split_qkv(x)):
        for a, b in zip(got, (q0, k0, v0)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    o = torch.randn(3, 6, 7, 8, dtype=torch.float64)
    torch.testing.assert_close(fused.merge(o), ref.merge(o), rtol=0, atol=1e-12)


def test_qk_norm_is_per_head_before_the_transpose():
    m = _qkvo(qk_norm_eps=1e-6)
    x = torch.randn(2, 5, 48, dtype=torch.float64)
    q = (x @ m.q_proj.weight.T + m.q_proj.bias).view(2, 5, 6, 8)
    q = m.q_norm.weight * q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6)  # RMSNorm over D, by hand
    torch.testing.assert_close(m.split_q(x), q.transpose(1, 2), rtol=0, atol=1e-12)


@pytest.mark.parametrize("bias", [False, True])
def test_mlp_fused_equals_unfused_float64(bias):
    torch.manual_seed(0)
    ref = _randomize(MLP(32, 40, bias=bias).double(), 3)
    fused = _randomize(MLP(32, 40, bias=bias).double(), 3).fuse()
    assert fused.gate_up_proj.weight.shape == (80, 32)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    torch.testing.assert_close(fused(x), ref(x), rtol=0, atol=1e-12)


def test_state_dict_keeps_hf_names_and_round_trips():
    ref = _qkvo(o_bias=True)
    fused = _qkvo(o_bias=True).fuse()
    a, b = ref.state_dict(), fused.state_dict()
    assert set(a) == set(b) and "q_proj.weight" in b and not any("qkv" in k for k in b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    other = _qkvo(seed=9, o_bias=True).fuse()
    other.load_state_dict(a)  # HF names into a fused module: concatenated on load, strict
    assert torch.equal(other.qkv_proj.weight, fused.qkv_proj.weight)
    back = other.unfuse()
    assert not back.fused and torch.equal(back.k_proj.bias, ref.k_proj.bias)
    with pytest.raises(RuntimeError, match="Missing key.*v_proj.weight"):
        _qkvo().fuse().load_state_dict({k: v for k, v in a.items() if k != "v_proj.weight"})


def test_fused_target_equals_unfused_and_saves_hf_names(tmp_path):
    torch.manual_seed(0)
    m = _randomize(Target(TINY.replace(attention_bias=True, o_proj_bias=True, mlp_bias=True)).double(), 4)
    x = torch.randint(0, TINY.vocab_size, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = m(x)
        fuse_projections(m)
        got = m(x)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    save_hf(m, tmp_path, dtype=torch.float64)
    names = set(load_file(str(tmp_path / "model.safetensors")))
    assert "model.layers.1.self_attn.q_proj.weight" in names and not any("qkv" in n or "gate_up" in n for n in names)
    loaded = load_target(tmp_path, device="cpu", dtype=torch.float64)  # fused by default
    assert loaded.model.layers[0].self_attn.fused and loaded.model.layers[0].mlp.fused
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref, rtol=0, atol=1e-10)
    unfused = load_target(tmp_path, device="cpu", dtype=torch.float64, fuse=False)
    assert not unfused.model.layers[0].self_attn.fused
    save_file({"w": torch.ones(1)}, str(tmp_path / "scratch.safetensors"))  # the folder stays loadable only
    with pytest.raises(ValueError, match="does not use.*'w'"):  # ... as long as nothing foreign is in it
        load_target(tmp_path, device="cpu")


def test_fuse_refused_when_kv_reads_another_input():
    with pytest.raises(ValueError, match="different widths"):
        QKVO(32, 4, 2, 8, bias=False, kv_in=16).fuse()


def test_rope_frequencies_stay_float32_in_bf16_as_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    save_hf(Target(TINY), tmp_path, dtype=torch.bfloat16)
    ours = load_target(tmp_path, device="cpu", dtype="bf16")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert ours.rotary.inv_freq.dtype == torch.float32 and ours.dtype == torch.bfloat16
    pos = torch.tensor([[0, 1, 1000, 4000, 20000]])
    cos, sin = ours.rotary(pos, torch.bfloat16)  # [1, 1, T, D]
    ref_cos, ref_sin = hf.model.rotary_emb(torch.zeros(1, 5, 1, dtype=torch.bfloat16), pos)  # [1, T, D]
    torch.testing.assert_close(cos[:, 0], ref_cos, rtol=0, atol=2e-2)  # bf16 rounding of cos itself only
    torch.testing.assert_close(sin[:, 0], ref_sin, rtol=0, atol=2e-2)
