"""ops.linear: the readable norm_linear and the fused kernel behind its switch give the same numbers, alone
and inside a whole model (against transformers' own Llama forward), and a decoder gives the same tokens."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # the kernel runs in Triton's interpreter on the CPU

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from longspec_lab.kernels.norm_linear import norm_linear_reference  # noqa: E402
from longspec_lab.models.loaders import load_target  # noqa: E402
from longspec_lab.ops import linear  # noqa: E402


@pytest.fixture
def switch(monkeypatch):
    def set_to(value):
        monkeypatch.setattr(linear, "NORM_LINEAR", value)

    return set_to


@pytest.mark.parametrize("path", ["off", "on"])
@pytest.mark.parametrize(("norm", "res", "gated"), [(False, False, False), (True, False, True), (True, True, False)])
def test_both_paths_equal_the_float64_definition(switch, path, norm, res, gated):
    switch(path)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 96, generator=g)
    w = torch.randn(2 * 40 if gated else 40, 96, generator=g) / 10
    nw = 1 + 0.1 * torch.randn(96, generator=g)
    r = torch.randn(2, 5, 40, generator=g)
    got = linear.norm_linear(x, w, None, (nw, 1e-5) if norm else None, r if res else None, gated)
    want = norm_linear_reference(x, w, nw if norm else None, 1e-5, r if res else None, gated)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["off", "on"])
def test_a_bias_takes_either_path_and_gives_the_linear(switch, path, monkeypatch):
    """A bias (the draft's q/k/v and cross-attention query, Qwen2-style q/k/v) goes to the kernel with "on" (it adds
    the bias before rounding) and to F.linear with "off"; both equal F.linear with the bias. A bias in another
    dtype keeps the readable path."""
    switch(path)
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(3, 32, generator=g), torch.randn(16, 32, generator=g), torch.randn(16, generator=g)
    calls = []
    import longspec_lab.kernels.norm_linear as nl

    real = nl.norm_linear
    monkeypatch.setattr(nl, "norm_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.testing.assert_close(linear.norm_linear(x, w, b), torch.nn.functional.linear(x, w, b))
    assert len(calls) == (path == "on" and linear.HAS_TRITON)
    assert not linear._kernel_path(x, w, b.double(), None)


def test_auto_sends_only_small_cuda_projections_to_the_kernel(switch, monkeypatch):
    """The default, "auto": the kernel for CUDA weights up to AUTO_MAX_WEIGHT elements, PyTorch for larger ones
    (an 8B model's projections, where cuBLAS wins) and always on the CPU, interpreter or not."""
    switch("auto")
    small, big = torch.empty(64, 96), torch.empty(linear.AUTO_MAX_WEIGHT // 64 + 1, 64)
    assert not linear._kernel_path(torch.empty(2, 96), small, None, None)  # CPU, though TRITON_INTERPRET=1
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    assert linear._kernel_path(torch.empty(2, 96), small, None, None) == linear.HAS_TRITON
    assert not linear._kernel_path(torch.empty(2, 64), big, None, None)
    switch("on")
    assert linear._kernel_path(torch.empty(2, 64), big, None, None) == linear.HAS_TRITON


def test_qkv_rope_auto_is_the_kernel_on_cuda_only(monkeypatch):
    """LONGSPEC_QKV_ROPE's default, "auto": the fused q/k/v + RoPE + cache-write kernel on CUDA, the readable ops
    for weights up to AUTO_MAX_WEIGHT, the readable ops on the CPU even under the interpreter; "on" also takes the
    interpreter and large weights; "off" never; a bias in another dtype never."""
    x, w = torch.empty(2, 3, 64), torch.empty(128, 64)
    assert linear.QKV_ROPE == "auto" or os.environ.get("LONGSPEC_QKV_ROPE")
    want = {"auto": False, "on": linear.HAS_TRITON, "off": False}
    for value, cpu in want.items():
        monkeypatch.setattr(linear, "QKV_ROPE", value)
        assert linear.qkv_rope_path(x, w, None, 32, x.dtype) == cpu, value
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    for value, cuda in {"auto": linear.HAS_TRITON, "on": linear.HAS_TRITON, "off": False}.items():
        monkeypatch.setattr(linear, "QKV_ROPE", value)
        assert linear.qkv_rope_path(x, w, None, 32, x.dtype) == cuda, value
        assert linear.qkv_rope_path(x, w, torch.empty(128), 32, x.dtype) == cuda, value  # the kernel adds biases
        assert not linear.qkv_rope_path(x, w, torch.empty(128, dtype=torch.float64), 32, x.dtype)
    big = torch.empty(linear.AUTO_MAX_WEIGHT // 64 + 1, 64)  # an 8B-sized q/k/v: cuBLAS under "auto"
    for value, used in {"auto": False, "on": linear.HAS_TRITON}.items():
        monkeypatch.setattr(linear, "QKV_ROPE", value)
        assert linear.qkv_rope_path(x, big, None, 32, x.dtype) == used, value


def test_fuse_residual_switch_picks_the_path_and_keeps_the_numbers(monkeypatch):
    """LONGSPEC_FUSE_RESIDUAL: "off" (the default until timed) and "auto" on the CPU take the two norm_linear
    calls; "on" takes the one-launch kernel (the interpreter here), and both give the float64 answer; a bias on
    either projection keeps the readable path."""
    import longspec_lab.kernels.norm_linear as nl

    assert linear.FUSE_RESIDUAL == "off" or os.environ.get("LONGSPEC_FUSE_RESIDUAL")
    g = torch.Generator().manual_seed(7)
    a, wp, r = (
        torch.randn(2, 3, 48, generator=g),
        torch.randn(64, 48, generator=g) / 7,
        torch.randn(2, 3, 64, generator=g),
    )
    w, nw = torch.randn(2 * 24, 64, generator=g) / 8, 1 + 0.1 * torch.randn(64, generator=g)
    x64 = r.double() + a.double() @ wp.double().T
    y64 = norm_linear_reference(x64, w, nw, 1e-5, None, True)
    calls = []
    real = nl.residual_norm_linear
    monkeypatch.setattr(nl, "residual_norm_linear", lambda *args: calls.append(1) or real(*args))
    for value, fused in (("off", False), ("auto", False), ("on", linear.HAS_TRITON)):
        monkeypatch.setattr(linear, "FUSE_RESIDUAL", value)
        calls.clear()
        x, y = linear.residual_norm_linear(a, wp, None, r, w, None, (nw, 1e-5), gated=True)
        assert bool(calls) is fused, value
        torch.testing.assert_close(x.double(), x64, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y.double(), y64, atol=1e-5, rtol=1e-5)
    calls.clear()
    linear.residual_norm_linear(a, wp, torch.zeros(64), r, w, None, (nw, 1e-5), gated=True)
    assert not calls


def test_unknown_switch_value_is_named(switch):
    switch("fast")
    with pytest.raises(ValueError, match="LONGSPEC_NORM_LINEAR='fast'"):
        linear.norm_linear(torch.ones(2, 4), torch.ones(3, 4))


def _random_llama(path, seed: int):
    """A random two-layer Llama written by transformers to `path`: (its config, the transformers model, ours loaded
    from the folder, fused)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)  # fmt: skip
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(path)
    return cfg, hf, load_target(path, device="cpu", dtype="float32")


def test_model_with_the_kernel_matches_transformers(tmp_path, switch):
    """A random Llama written by transformers, loaded fused: with the switch on, every projection of every
    layer goes through the kernel, and the logits still equal transformers' own forward."""
    cfg, hf, ours = _random_llama(tmp_path, seed=5)
    x = torch.randint(0, 100, (1, 40), generator=torch.Generator().manual_seed(6))
    calls = []
    real = linear._kernel_path
    switch("on")
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(linear, "_kernel_path", lambda *a: calls.append(real(*a)) or calls[-1])
        got = ours(x)
        ref = hf(x).logits
    # qkv, o, gate_up, down per layer, and the LM head with the final norm
    assert calls and all(calls) and len(calls) == 4 * cfg.num_hidden_layers + 1
    assert (got - ref).abs().max().item() <= 1e-4


def test_training_keeps_the_differentiable_path(switch):
    """The kernel has no backward: with gradients wanted, "on" runs the PyTorch ops, and the gradient equals
    the float64 definition's."""
    switch("on")
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 32, generator=g, requires_grad=True)
    w = torch.randn(2 * 8, 32, generator=g)
    nw = 1 + 0.1 * torch.randn(32, generator=g)
    linear.norm_linear(x, w, None, (nw, 1e-5), gated=True).sum().backward()
    x64 = x.detach().double().requires_grad_()
    norm_linear_reference(x64, w, nw, 1e-5, gated=True).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head", ["auto", "torch"])
@pytest.mark.parametrize("path", ["off", "on"])
def test_the_lm_head_equals_the_float64_definition_on_either_path(switch, monkeypatch, head, path):
    """The LM head with the final norm (the target) and without (the draft): through norm_linear (the kernel with
    "on") or the norm and F.linear apart (LONGSPEC_LM_HEAD=torch), the same logits as float64; on the readable
    path the very ops of the unfused model (RMSNorm module, then nn.Linear), bit for bit."""
    switch(path)
    monkeypatch.setattr(linear, "LM_HEAD", head)
    g = torch.Generator().manual_seed(11)
    x, w = torch.randn(2, 3, 64, generator=g), torch.randn(200, 64, generator=g) / 8
    nw = 1 + 0.1 * torch.randn(64, generator=g)
    for norm in (None, (nw, 1e-5)):
        got = linear.lm_head(x, w, norm)
        want = norm_linear_reference(x, w, None if norm is None else nw, 1e-5, None, False)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    if path == "off":
        from longspec_lab.models.layers import RMSNorm

        rms = RMSNorm(64, 1e-5)
        rms.weight.data.copy_(nw)
        assert torch.equal(linear.lm_head(x, w, rms.args), torch.nn.functional.linear(rms(x), w))
    monkeypatch.setattr(linear, "LM_HEAD", "fast")
    with pytest.raises(ValueError, match="LONGSPEC_LM_HEAD='fast' is not one of auto, torch"):
        linear.lm_head(x, w)


def test_a_large_head_with_few_rows_takes_the_kernel(switch, monkeypatch):
    """Under LONGSPEC_LM_HEAD=auto a head past the size rule (an 8B model's) goes to the norm_linear kernel for at
    most HEAD_KERNEL_ROWS rows on the GPU, and to cuBLAS for more rows (a verify), on the CPU, with the switch off or
    with a gradient; on that route (here the interpreter) the logits are the float64 definition's."""
    switch("auto")
    rule = linear._large_head_kernel
    K = 8
    big = torch.zeros(linear.AUTO_MAX_WEIGHT // K + 1, K)  # just past the size rule
    small = torch.zeros(linear.AUTO_MAX_WEIGHT // K, K)
    rows = linear.HEAD_KERNEL_ROWS
    assert rule(torch.zeros(rows, K), big, None, on_gpu=True)
    assert rule(torch.zeros(2, rows // 2, K), big, (torch.ones(K), 1e-5), on_gpu=True)  # rows counted over batch
    assert not rule(torch.zeros(rows + 1, K), big, None, on_gpu=True)  # a verify's rows
    assert not rule(torch.zeros(1, K), small, None, on_gpu=True)  # norm_linear's own rule serves it
    assert not rule(torch.zeros(1, K), big, None, on_gpu=False) and not rule(torch.zeros(1, K), big, None)
    assert not rule(torch.zeros(1, K, requires_grad=True), big, None, on_gpu=True)
    assert not rule(torch.zeros(1, K, dtype=torch.float64), big, None, on_gpu=True)  # mixed dtypes
    switch("off")
    assert not rule(torch.zeros(1, K), big, None, on_gpu=True)
    switch("auto")
    routed = []
    monkeypatch.setattr(linear, "_large_head_kernel", lambda x, w, n: routed.append(x.shape) or True)
    monkeypatch.setattr(linear, "norm_linear", lambda *a, **k: pytest.fail("the head took the size rule's path"))
    g = torch.Generator().manual_seed(12)
    x, w = torch.randn(1, 3, 64, generator=g), torch.randn(200, 64, generator=g) / 8
    nw = 1 + 0.1 * torch.randn(64, generator=g)
    for norm in (None, (nw, 1e-5)):
        want = norm_linear_reference(x, w, None if norm is None else nw, 1e-5, None, False)
        torch.testing.assert_close(linear.lm_head(x, w, norm).double(), want, atol=1e-5, rtol=1e-5)
    assert routed == [x.shape, x.shape]


def test_stream_switch_picks_the_split_k_kernel_for_few_rows(monkeypatch):
    """LONGSPEC_STREAM_LINEAR: "on" sends projections of at most STREAM_MAX_ROWS rows without a bias to
    kernels/stream_linear.py (also under the interpreter), and the numbers stay the definition's; more rows or a
    bias keep the other paths; "auto" only CUDA weights above AUTO_MAX_WEIGHT; "off" (the default) never."""
    import longspec_lab.kernels.stream_linear as sl

    calls = []
    real = sl.stream_linear
    monkeypatch.setattr(sl, "stream_linear", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    g = torch.Generator().manual_seed(3)
    w, nw = torch.randn(2 * 24, 80, generator=g) / 9, 1 + 0.1 * torch.randn(80, generator=g)
    r = torch.randn(1, 16, 24, generator=g)
    x = torch.randn(1, 16, 80, generator=g)
    monkeypatch.setattr(linear, "STREAM_LINEAR", "on")
    got = linear.norm_linear(x, w, None, (nw, 1e-5), r, gated=True)
    want = norm_linear_reference(x, w, nw, 1e-5, r, True)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert calls == [x.shape]
    linear.norm_linear(torch.randn(17, 80, generator=g), w)  # 17 rows: not this kernel
    linear.norm_linear(x, w[:24], torch.zeros(24))  # a bias: not this kernel
    assert len(calls) == 1
    monkeypatch.setattr(linear, "STREAM_LINEAR", "auto")
    big = torch.empty(linear.AUTO_MAX_WEIGHT // 64 + 1, 64)
    assert not linear._stream_path(torch.empty(1, 64), big, None, None)  # CPU
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    assert linear._stream_path(torch.empty(1, 64), big, None, None) == linear.HAS_TRITON
    assert not linear._stream_path(torch.empty(1, 80), w, None, None)  # a small weight: norm_linear's
    monkeypatch.setattr(linear, "STREAM_LINEAR", "off")
    assert not linear._stream_path(torch.empty(1, 64), big, None, None)
    monkeypatch.setattr(linear, "STREAM_LINEAR", "fast")
    with pytest.raises(ValueError, match="LONGSPEC_STREAM_LINEAR='fast'"):
        linear.norm_linear(torch.ones(2, 4), torch.ones(3, 4))


def test_stream_switch_in_a_whole_decode_gives_the_same_logits(tmp_path, monkeypatch):
    """A random Llama written by transformers, loaded fused, one prefill and one decode step through the cache:
    with LONGSPEC_STREAM_LINEAR=on every projection of the decode step (and the LM head) goes through the
    split-K kernel, and its logits equal transformers' forward over the whole sequence."""
    import longspec_lab.kernels.stream_linear as sl

    cfg, hf, ours = _random_llama(tmp_path, seed=7)
    x = torch.randint(0, 100, (1, 30), generator=torch.Generator().manual_seed(8))
    cache = ours.new_cache(64)
    calls = []
    real = sl.stream_linear
    monkeypatch.setattr(sl, "stream_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        ours(x[:, :-1], cache=cache, start=0)  # 29 rows: not the streaming kernel
        assert not calls
        monkeypatch.setattr(linear, "STREAM_LINEAR", "on")
        got = ours(x[:, -1:], cache=cache, start=29)[0, -1]
        ref = hf(x).logits[0, -1]
    assert len(calls) == 4 * cfg.num_hidden_layers + 1  # qkv, o, gate_up, down per layer, and the LM head
    assert (got - ref).abs().max().item() <= 1e-4
