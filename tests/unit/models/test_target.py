"""The compact target against transformers' own Llama/Qwen2 on the same weights."""

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from longspec_lab.models.config import PRESETS, ModelConfig
from longspec_lab.models.loaders import load_target, save_hf
from longspec_lab.models.target import Target
from longspec_lab.spec.tree import DraftTree

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def _hf_llama(tmp_path, **kw):
    torch.manual_seed(1)
    cfg = LlamaConfig(
        vocab_size=120,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_scaling=LLAMA3_SCALING,
        rope_theta=50000.0,
        tie_word_embeddings=False,
        **kw,
    )
    m = LlamaForCausalLM(cfg).eval()
    m.save_pretrained(tmp_path)
    return m


def _hf_qwen(tmp_path):
    torch.manual_seed(2)
    cfg = Qwen2Config(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    m = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # random init leaves biases at zero: make them matter
        for layer in m.model.layers:
            for p in (layer.self_attn.q_proj.bias, layer.self_attn.k_proj.bias, layer.self_attn.v_proj.bias):
                p.normal_(0, 0.5)
    m.save_pretrained(tmp_path)
    return m


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_logits_match_transformers(tmp_path, kind):
    hf = _hf_llama(tmp_path) if kind == "llama" else _hf_qwen(tmp_path)
    ours = load_target(tmp_path, device="cpu", dtype="float32")
    assert ours.config.attention_bias == (kind == "qwen2")
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, ours.config.vocab_size, (2, 300), generator=g)  # past 64: llama3 scaling active
    with torch.no_grad():
        ref = hf(x).logits
        got = ours(x)
    assert (ref - got).abs().max().item() <= 1e-4


def test_sharded_checkpoint_loads(tmp_path):
    hf = _hf_llama(tmp_path / "a")
    hf.save_pretrained(tmp_path / "b", max_shard_size="100KB")
    assert (tmp_path / "b" / "model.safetensors.index.json").is_file()
    a = load_target(tmp_path / "a", device="cpu")
    b = load_target(tmp_path / "b", device="cpu")
    x = torch.arange(40)[None] % 120
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def _tiny(seed=0):
    torch.manual_seed(seed)
    m = Target(PRESETS["tiny"]).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
def test_prefill_then_decode_equals_full_forward(backend):
    m = _tiny()
    x = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(64)
        parts = [m(x[:, :25], cache=cache, start=0, backend=backend)]
        for i in range(25, 40):
            parts.append(m(x[:, i : i + 1], cache=cache, start=i, backend=backend))
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("backend", ["torch", "sdpa"])
def test_tree_block_equals_path_forwards(seed, backend):
    """A block of tree nodes under the tree mask gives, at each node, the logits of a plain forward
    over prefix + root-to-node path."""
    m = _tiny(seed)
    g = torch.Generator().manual_seed(seed)
    n = 12
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)]
    depth = [0] * n
    for i in range(1, n):
        depth[i] = depth[parents[i]] + 1
    order = sorted(range(n), key=lambda i: (depth[i], i))  # number level by level
    remap = {old: new for new, old in enumerate(order)}
    parents = [-1 if parents[o] < 0 else remap[parents[o]] for o in order]
    tree = DraftTree.from_parents(torch.randint(0, 64, (n,), generator=g), parents)
    prefix = torch.randint(0, 64, (1, 17), generator=g)
    P = prefix.shape[1]
    with torch.no_grad():
        cache = m.new_cache(64)
        m(prefix, cache=cache, start=0, backend=backend)
        got = m(tree.tokens[None], positions=tree.positions(P), cache=cache, start=P, mask=tree.mask, backend=backend)[
            0
        ]
        for i in range(n):
            path = torch.tensor(tree.path_tokens(i))[None]
            ref = m(torch.cat([prefix, path], 1))[0, -1]
            assert (got[i] - ref).abs().max().item() < 1e-5


def test_config_roundtrip_and_presets():
    for name, cfg in PRESETS.items():
        assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg, name
    assert abs(PRESETS["embedded"].num_parameters() - 7.3e6) < 0.2e6


def test_save_hf_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    m = _tiny(5)
    save_hf(m, tmp_path, dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    x = torch.randint(0, 64, (1, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (hf(x).logits - m(x)).abs().max().item() < 1e-4


# ---------------------------------------------------------------------- bad input


def test_gpt2_refused(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'.*LlamaForCausalLM"):
        load_target(tmp_path)


def test_pickle_only_refused(tmp_path):
    _hf_llama(tmp_path)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="safetensors only.*save_pretrained"):
        load_target(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_target(tmp_path / "nope")
    tmp_path.mkdir(exist_ok=True)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_target(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["tiny"].to_hf_dict()))
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_target(tmp_path)


def test_shape_mismatch_refused(tmp_path):
    _hf_llama(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not belong together"):
        load_target(tmp_path)
