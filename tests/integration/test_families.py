"""Every supported family against transformers on random checkpoints the test writes: logits in
float32 within 1e-4 (GQA layouts, the family's own options switched on), then greedy ar and tree
decoding token for token equal to transformers' `generate`. A tree needs a draft: a random GliDe
draft does, since losslessness holds for any draft. Also end to end: generation stops at the EOS ids
of generation_config.json, and a prompt longer than max_position_embeddings runs under linear RoPE
scaling (Vicuna-16k's layout), as in transformers."""

import pytest
import torch
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from longspec_lab.decoding.eager import SpecDecoder
from longspec_lab.models.glide import DraftConfig, Glide
from longspec_lab.models.loaders import load_target

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=512)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
FAMILIES = {
    # Llama 3.2-style: tied embeddings, llama3 RoPE scaling, 8 query heads over 2 KV heads
    "llama-tied": lambda: LlamaForCausalLM(
        LlamaConfig(
            **BASE,
            num_attention_heads=8,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_scaling={**LLAMA3, "original_max_position_embeddings": 32},
        )
    ),
    "llama-bias": lambda: LlamaForCausalLM(
        LlamaConfig(**BASE, num_attention_heads=4, num_key_value_heads=1, attention_bias=True, mlp_bias=True)
    ),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**BASE, num_attention_heads=4, num_key_value_heads=2)),
    # Qwen3's layout: heads * head_dim != hidden (4 x 32 = 128 vs 64), q/k RMSNorm
    "qwen3": lambda: Qwen3ForCausalLM(
        Qwen3Config(**BASE, num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)
    ),
    "qwen3-bias": lambda: Qwen3ForCausalLM(
        Qwen3Config(**BASE, num_attention_heads=8, num_key_value_heads=4, head_dim=16, attention_bias=True)
    ),
    "mistral": lambda: MistralForCausalLM(
        MistralConfig(**BASE, num_attention_heads=8, num_key_value_heads=2, sliding_window=None)
    ),
}
N_NEW = 16


def _random_weights(model, seed):
    """Weights large enough for confident, tie-free argmaxes; biases and norms away from 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.3 * noise)
    return model.eval()


def _write(tmp_path, family, seed):
    torch.manual_seed(seed)
    hf = _random_weights(FAMILIES[family](), seed)
    hf.save_pretrained(tmp_path)
    return hf


def _hf_greedy(hf, ids, n, **kw):
    with torch.no_grad():
        x = torch.tensor([ids])  # an explicit mask: token 0 may occur, and it is not padding here
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
    return out[0, len(ids) :].tolist()


def _random_draft(target, seed):
    torch.manual_seed(seed)
    draft = Glide(DraftConfig.from_target(target.config), target).eval()
    with torch.no_grad():
        for p in draft.parameters():
            p.normal_(0, 0.3)
    return draft


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_transformers(tmp_path, family):
    seed = list(FAMILIES).index(family)
    hf = _write(tmp_path, family, seed)
    ours = load_target(tmp_path, device="cpu", dtype="float32")
    assert ours.config.architecture == type(hf).__name__
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, BASE["vocab_size"], (2, 120), generator=g)  # past 32: llama3 scaling active
    with torch.no_grad():
        gap = (hf(x).logits - ours(x)).abs().max().item()
    assert gap <= 1e-4, gap

    ids = torch.randint(0, BASE["vocab_size"], (40,), generator=g).tolist()
    ref = _hf_greedy(hf, ids, N_NEW, eos_token_id=None)
    dec = SpecDecoder(ours, _random_draft(ours, seed), backend="torch")
    ar = dec.generate(ids, method="ar", max_new_tokens=N_NEW, stop_at_eos=False)
    assert ar.new_tokens == ref
    for shape in ([2, 2, 2], [4, 3]):
        tree = dec.generate(ids, method="tree", tree_shape=shape, max_new_tokens=N_NEW, stop_at_eos=False)
        assert tree.new_tokens == ref, shape


def test_generation_config_eos_stops_where_transformers_stops(tmp_path):
    hf = _write(tmp_path, "llama-bias", 7)
    ids = torch.randint(0, BASE["vocab_size"], (30,), generator=torch.Generator().manual_seed(7)).tolist()
    free = _hf_greedy(hf, ids, N_NEW, eos_token_id=None)
    stop = free[5]  # an end-of-turn id listed only in generation_config.json, as instruct releases do
    assert stop not in free[:5] and hf.config.eos_token_id != stop
    hf.generation_config = GenerationConfig(eos_token_id=[hf.config.eos_token_id, stop], pad_token_id=0)
    hf.save_pretrained(tmp_path)
    hf = type(hf).from_pretrained(tmp_path, dtype=torch.float32).eval()
    ref = _hf_greedy(hf, ids, N_NEW)  # transformers reads generation_config.json
    assert ref == free[:6]
    ours = load_target(tmp_path, device="cpu", dtype="float32")
    dec = SpecDecoder(ours, _random_draft(ours, 7), backend="torch")
    for method in ("ar", "tree"):
        res = dec.generate(ids, method=method, tree_shape=[2, 2], max_new_tokens=N_NEW)
        assert res.new_tokens == ref and res.stopped_at_eos, method


def test_linear_rope_scaling_extends_the_context(tmp_path):
    """Vicuna-7B-v1.5-16k: max_position_embeddings 4096 and linear x4 scaling; here 64 and x4."""
    torch.manual_seed(8)
    cfg = LlamaConfig(
        **{**BASE, "max_position_embeddings": 64},
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
    )
    hf = _random_weights(LlamaForCausalLM(cfg), 8)
    hf.save_pretrained(tmp_path)
    ours = load_target(tmp_path, device="cpu", dtype="float32")
    assert ours.config.context_length == 256
    ids = torch.randint(0, BASE["vocab_size"], (150,), generator=torch.Generator().manual_seed(8)).tolist()
    ref = _hf_greedy(hf, ids, N_NEW, eos_token_id=None)
    dec = SpecDecoder(ours, _random_draft(ours, 8), backend="torch")
    for method in ("ar", "tree"):
        res = dec.generate(ids, method=method, tree_shape=[2, 2], max_new_tokens=N_NEW, stop_at_eos=False)
        assert res.new_tokens == ref, method
    with pytest.raises(ValueError, match="256"):
        dec.generate(ids * 2, method="ar", max_new_tokens=N_NEW)
