"""The fused projection kernel inside a whole decoder (ops.linear's switch on, Triton interpreter): a tree
generation gives the tokens and accepted lengths of the readable path (not in the fast tier).

The decoding tests launch the kernel with large tiles (`big_tiles`): the interpreter runs one numpy pass per
program, and the GPU's tiles (16 x 16 for the LM head: 256 programs a row tile) made one generation take 50 s on 2
cores, against 5 s. The tiles the GPU uses are each checked against the float64 definition in
tests/unit/kernels/test_norm_linear.py; here the question is the decoder's tokens with the kernel in every layer.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from longspec_lab.ops import linear  # noqa: E402


@pytest.fixture
def big_tiles(monkeypatch):
    """Every launch of the projection kernel with 64 rows x 256 columns x 256 inputs (down_proj's 768 inputs still
    take three K steps, the loop path; the 256-input projections one, the weight-first path)."""
    import longspec_lab.kernels.norm_linear as nl

    monkeypatch.setattr(nl, "TILES_OVERRIDE", (64, 256, 256))


@pytest.fixture
def switch(monkeypatch):
    def set_to(value):
        monkeypatch.setattr(linear, "NORM_LINEAR", value)

    return set_to


def _same_tokens_with_the_switch(embedded_pair, monkeypatch, switch: str, module, fn: str) -> None:
    """A tree generation with ops.linear's `switch` "off" and then "on": the same tokens and accepted lengths,
    and `module.fn` (the fused kernel's entry, counted) ran exactly when the switch was on."""
    from longspec_lab.decoding.eager import SpecDecoder

    calls, real = [], getattr(module, fn)
    monkeypatch.setattr(module, fn, lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    target, draft, tok = embedded_pair
    ids = tok.encode("The history of the city begins with a small harbour where fishermen")[:48]
    runs = []
    for value in ("off", "on"):
        monkeypatch.setattr(linear, switch, value)
        res = SpecDecoder(target, draft).generate(ids, method="tree", tree_shape=[2, 2], max_new_tokens=6)
        runs.append((res.new_tokens, res.accepted_lengths))
        assert bool(calls) is (value == "on")  # the kernel ran exactly when switched on
    assert runs[0] == runs[1] and len(runs[0][0]) >= 6


def test_tree_decoding_gives_the_same_tokens_with_qkv_rope_cache(embedded_pair, monkeypatch, big_tiles):
    """LONGSPEC_QKV_ROPE=on: every target layer's norm, q/k/v, RoPE and cache write run as one kernel (the
    interpreter here); a tree generation gives the tokens and accepted lengths of the readable path."""
    from longspec_lab.models import layers

    _same_tokens_with_the_switch(embedded_pair, monkeypatch, "QKV_ROPE", layers, "qkv_rope_cache")


def test_tree_decoding_gives_the_same_tokens_with_the_kernel(embedded_pair, switch, big_tiles):
    """The embedded pair, float32, a short tree generation: the same tokens and accepted lengths either way."""
    from longspec_lab.decoding.eager import SpecDecoder

    target, draft, tok = embedded_pair
    ids = tok.encode("The history of the city begins with a small harbour where fishermen")[:48]
    runs = []
    for path in ("off", "on"):
        switch(path)
        res = SpecDecoder(target, draft).generate(ids, method="tree", tree_shape=[2, 2], max_new_tokens=6)
        runs.append((res.new_tokens, res.accepted_lengths))
    assert runs[0] == runs[1] and len(runs[0][0]) >= 6


def test_compiled_model_with_the_kernel_equals_eager(tmp_path, switch):
    """torch.compile (Inductor, fullgraph) of a whole 2-layer Llama with the switch on: the registered op stays
    in the graph and the compiled logits equal the eager ones (and transformers')."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from longspec_lab.models.loaders import load_target

    torch.manual_seed(7)
    cfg = LlamaConfig(vocab_size=80, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    ours = load_target(tmp_path, device="cpu", dtype="float32")
    x = torch.randint(0, 80, (1, 24), generator=torch.Generator().manual_seed(8))
    switch("on")
    with torch.no_grad():
        eager = ours(x)
        compiled = torch.compile(ours, fullgraph=True, dynamic=False)(x)
        ref = hf(x).logits
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert (eager - ref).abs().max().item() <= 1e-4


def test_compiled_qkv_rope_cache_writes_the_cache_in_place(monkeypatch):
    """Inductor (fullgraph) of a fused model's forward with LONGSPEC_QKV_ROPE=on: the registered op writes
    the cache tensors themselves (no copy of the cache in the generated code, which would cost a whole
    cache per layer on a GPU), and the logits and the written slots equal the eager ones."""
    import dataclasses

    import torch
    from torch._inductor.utils import run_and_get_code

    from longspec_lab.models.config import PRESETS
    from longspec_lab.models.target import Target

    monkeypatch.setattr(linear, "QKV_ROPE", "on")
    torch.manual_seed(0)
    target = Target(dataclasses.replace(PRESETS["tiny"], head_dim=32)).eval().fuse()
    eager_cache, compiled_cache = target.new_cache(64), target.new_cache(64)
    ids = torch.randint(0, target.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(1))
    start, pos = torch.tensor([10]), torch.arange(10, 15)

    def forward(ids, cache):
        return target(ids, positions=pos, cache=cache, start=start)

    with torch.no_grad():
        want = forward(ids, eager_cache)
        got, code = run_and_get_code(torch.compile(forward, fullgraph=True, dynamic=False), ids, compiled_cache)
    src = "\n".join(code)
    assert src.count("torch.ops.longspec.qkv_rope_cache.default(") == target.config.num_layers
    assert ".copy_(" not in src
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in ((compiled_cache.k, eager_cache.k), (compiled_cache.v, eager_cache.v)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        assert a[:, :, :, 10:15].abs().sum() > 0 and a[:, :, :, :10].abs().sum() == 0 == a[:, :, :, 15:].abs().sum()


def test_tree_decoding_gives_the_same_tokens_with_the_residual_fused(embedded_pair, monkeypatch, big_tiles):
    """LONGSPEC_FUSE_RESIDUAL=on: each layer's o_proj + residual and its norm + gate/up run as one kernel (the
    interpreter here), in the target and the draft; a tree generation gives the tokens and accepted lengths of
    the readable path."""
    import longspec_lab.kernels.norm_linear as nl

    _same_tokens_with_the_switch(embedded_pair, monkeypatch, "FUSE_RESIDUAL", nl, "residual_norm_linear")


def test_compiled_model_with_the_residual_fused_matches_transformers(tmp_path, monkeypatch):
    """A whole 2-layer Llama written by transformers, loaded by us, with LONGSPEC_FUSE_RESIDUAL=on, compiled
    with Inductor (fullgraph): one fused op per layer in the graph, logits equal to eager and to transformers."""
    import torch
    from torch._inductor.utils import run_and_get_code
    from transformers import LlamaConfig, LlamaForCausalLM

    from longspec_lab.models.loaders import load_target

    monkeypatch.setattr(linear, "FUSE_RESIDUAL", "on")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    ours = load_target(tmp_path, dtype="float32").eval()
    x = torch.randint(0, 96, (1, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        eager = ours(x)
        compiled, code = run_and_get_code(torch.compile(ours, fullgraph=True, dynamic=False), x)
        ref = hf(x).logits
    assert "\n".join(code).count("torch.ops.longspec.residual_norm_linear.default(") == cfg.num_hidden_layers
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert (eager - ref).abs().max().item() <= 1e-4


def test_graph_decoder_with_the_fused_projection_and_rope_tables(embedded_pair, monkeypatch):
    """The static-shape decoder (GraphDecoder, no capture on the CPU) with LONGSPEC_QKV_ROPE and
    LONGSPEC_ROPE_TABLES on: every target pass takes its RoPE tables and cache slots from one kernel launch and
    each layer's norm, q/k/v, RoPE and cache write from another (both interpreted here); a tree generation gives
    the tokens and accepted lengths of the readable path, and both kernels ran only when switched on."""
    from longspec_lab.decoding.graphs import GraphDecoder
    from longspec_lab.kernels import rope as rope_kernel
    from longspec_lab.models import layers
    from longspec_lab.ops import rope

    calls = {"tables": 0, "qkv": 0}
    real_tables, real_qkv = rope_kernel.rope_tables, layers.qkv_rope_cache

    def count(name, fn):
        def counted(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return counted

    monkeypatch.setattr(rope_kernel, "rope_tables", count("tables", real_tables))
    monkeypatch.setattr(layers, "qkv_rope_cache", count("qkv", real_qkv))
    target, draft, tok = embedded_pair
    ids = tok.encode("The history of the city begins with a small harbour where fishermen")[:48]
    runs = []
    for value in ("off", "on"):
        monkeypatch.setattr(linear, "QKV_ROPE", value)
        monkeypatch.setattr(rope, "ROPE_TABLES", value)
        res = GraphDecoder(target, draft, capacity=160).generate(ids, tree_shape=[2, 2], max_new_tokens=6)
        runs.append((res.new_tokens, res.accepted_lengths))
        assert (calls["tables"] > 0, calls["qkv"] > 0) == (value == "on",) * 2, calls
    assert runs[0] == runs[1] and len(runs[0][0]) >= 6
