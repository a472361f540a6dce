"""The fused projection kernel inside a whole decoder (ops.linear's switch on, Triton interpreter): a tree
generation gives the tokens and accepted lengths of the readable path (18 s on 2 cores, so not in the fast tier)."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from longspec_lab.ops import linear  # noqa: E402


@pytest.fixture
def switch(monkeypatch):
    def set_to(value):
        monkeypatch.setattr(linear, "NORM_LINEAR", value)

    return set_to


def test_tree_decoding_gives_the_same_tokens_with_the_kernel(embedded_pair, switch):
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
