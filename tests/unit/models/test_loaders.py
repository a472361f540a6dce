"""Loaders never drop or mix weights silently. Each checkpoint here is written by transformers:
o_proj biases are used (logits equal transformers'), foreign tensors are named in an error,
generation_config.json gives the EOS ids and sampling defaults, linear RoPE scaling gives the usable
context, unsupported variants (MoE, sliding windows in use, yarn/dynamic/longrope, head dims the
kernel does not take) are refused with the fix, and a draft is matched by exact name after one prefix."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MixtralConfig,
    Qwen2Config,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
)

from longspec_lab.models.config import PRESETS, ModelConfig
from longspec_lab.models.draft_io import load_draft, save_draft
from longspec_lab.models.glide import DraftConfig, Glide
from longspec_lab.models.loaders import check_head_dim, load_target, read_config, save_hf
from longspec_lab.models.target import Target

SMALL = dict(
    vocab_size=80,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def _shake(model, seed):
    """Random weights of a useful size (transformers' init leaves biases at zero and norms at one)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.3 * noise)
    return model.eval()


def _logits_gap(hf, path):
    ours = load_target(path, device="cpu", dtype="float32")
    x = torch.randint(0, SMALL["vocab_size"], (2, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (hf(x).logits - ours(x)).abs().max().item()


def test_llama_attention_bias_uses_the_o_proj_bias(tmp_path):
    hf = _shake(LlamaForCausalLM(LlamaConfig(**SMALL, attention_bias=True, mlp_bias=True)), 1)
    assert hf.model.layers[0].self_attn.o_proj.bias.abs().sum() > 0
    hf.save_pretrained(tmp_path)
    assert _logits_gap(hf, tmp_path) < 1e-4
    cfg = read_config(tmp_path)
    assert cfg.attention_bias and cfg.o_proj_bias and cfg.mlp_bias


def test_foreign_tensors_are_named_never_dropped(tmp_path):
    hf = _shake(Qwen3ForCausalLM(Qwen3Config(**SMALL, head_dim=8)), 2)
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama")  # a Qwen3 relabelled as Llama
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"does not use.*q_norm.*Qwen3ForCausalLM"):
        load_target(tmp_path, device="cpu")
    cfg.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    state = load_file(str(tmp_path / "model.safetensors"))
    save_file({**state, "model.layers.0.mlp.extra.weight": torch.zeros(3)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.extra\.weight"):
        load_target(tmp_path, device="cpu")


def test_tied_lm_head_must_equal_the_embedding(tmp_path):
    hf = _shake(LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=True)), 3)
    hf.save_pretrained(tmp_path)
    assert _logits_gap(hf, tmp_path) < 1e-4
    state = load_file(str(tmp_path / "model.safetensors"))
    emb = state["model.embed_tokens.weight"]
    save_file({**state, "lm_head.weight": emb.clone()}, str(tmp_path / "model.safetensors"))
    load_target(tmp_path, device="cpu")  # a stored copy that equals the embedding is fine
    save_file({**state, "lm_head.weight": emb + 1}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="tie_word_embeddings=true but lm_head.weight differs"):
        load_target(tmp_path, device="cpu")


def test_generation_config_sets_eos_ids_and_sampling_defaults(tmp_path):
    hf = LlamaForCausalLM(LlamaConfig(**SMALL, eos_token_id=2))
    hf.generation_config = GenerationConfig(eos_token_id=[2, 7, 9], do_sample=True, temperature=0.6, top_p=0.95)
    hf.save_pretrained(tmp_path)
    t = load_target(tmp_path, device="cpu")
    ref = GenerationConfig.from_pretrained(tmp_path)
    assert t.config.eos_ids == (2, 7, 9) == tuple(ref.eos_token_id)
    g = t.generation
    assert (g.do_sample, g.temperature, g.top_p) == (True, ref.temperature, ref.top_p)
    assert g.top_k == 50  # transformers' default when the file does not say
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.7}))
    g = load_target(tmp_path, device="cpu").generation
    assert (g.do_sample, g.temperature, g.top_k, g.top_p) == (False, 0.0, None, None)  # greedy, as transformers
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "repetition_penalty": 1.3}))
    with pytest.warns(UserWarning, match="repetition_penalty"):
        load_target(tmp_path, device="cpu")
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_target(tmp_path, device="cpu")


def test_usable_context_follows_linear_rope_scaling(tmp_path):
    LlamaConfig(**SMALL).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    for scaling, ctx in (
        (None, 256),
        ({"type": "linear", "factor": 4.0}, 1024),  # the transformers 4 spelling
        ({"rope_type": "linear", "factor": 2.0, "original_max_position_embeddings": 200}, 400),
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}, 256),
    ):  # fmt: skip
        raw.pop("rope_parameters", None)
        assert ModelConfig.from_hf_dict(dict(raw, rope_scaling=scaling)).context_length == ctx
    # Vicuna-7B-v1.5-16k's layout: 4096 positions in config.json, linear x4 scaling
    vicuna = dict(raw, max_position_embeddings=4096, rope_scaling={"rope_type": "linear", "factor": 4.0})
    assert ModelConfig.from_hf_dict(vicuna).context_length == 16384


@pytest.mark.parametrize("kind", ["yarn", "dynamic", "longrope"])
def test_unsupported_rope_scaling_refused_clearly(tmp_path, kind):
    extra = {"original_max_position_embeddings": 64}
    if kind == "longrope":
        extra.update(short_factor=[1.0] * 4, long_factor=[2.0] * 4)
    LlamaConfig(**SMALL, rope_scaling={"rope_type": kind, "factor": 4.0, **extra}).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"RoPE scaling type '{kind}' is not supported.*remove the rope_scaling"):
        read_config(tmp_path)


@pytest.mark.parametrize(
    "config, match",
    [
        (Qwen3MoeConfig(**SMALL, num_experts=4), "mixture-of-experts.*4 experts"),
        (MixtralConfig(**SMALL, num_local_experts=8), "mixture-of-experts.*8 experts"),
        (MistralConfig(**SMALL, sliding_window=64), "sliding-window attention here \\(window 64 < context 256"),
        (
            Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=32, max_window_layers=1),
            "sliding-window attention.*window 32",
        ),
    ],
    ids=["qwen3-moe", "mixtral", "mistral-window", "qwen2-window"],
)
def test_unservable_models_refused(tmp_path, config, match):
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=match):
        read_config(tmp_path)


def test_inert_sliding_window_accepted(tmp_path):
    MistralConfig(**SMALL, sliding_window=4096).save_pretrained(tmp_path)  # longer than the context: no effect
    assert read_config(tmp_path).architecture == "MistralForCausalLM"
    Qwen2Config(**SMALL, use_sliding_window=False, sliding_window=32).save_pretrained(tmp_path)
    assert read_config(tmp_path).attention_bias


def test_head_dim_the_kernel_does_not_take_refused():
    cfg = PRESETS["tiny"]  # head_dim 16
    with pytest.raises(ValueError, match="head_dim 16 is not taken by the Triton.*--attention-backend sdpa"):
        check_head_dim(cfg, "cpu", "triton")
    assert check_head_dim(cfg, "cpu", "sdpa") == "sdpa" and check_head_dim(PRESETS["embedded"], "cpu", "triton")
    with pytest.raises(ValueError, match="odd"):
        PRESETS["tiny"].replace(head_dim=15)


# ---------------------------------------------------------------------- drafts: one prefix rule


def _pair(seed):
    torch.manual_seed(seed)
    target = Target(PRESETS["tiny"]).eval()
    draft = Glide(DraftConfig.from_target(target.config, window=16), target).eval()
    with torch.no_grad():
        for p in draft.parameters():
            p.normal_(0, 0.3)
    return target, draft


def test_draft_beside_target_layers_loads_only_the_draft(tmp_path):
    """LongSpec-style state dict: the target's layers (same short names: self_attn, mlp,
    input_layernorm) next to `draft_model.*`. Stripping prefixes would map target layer 1 onto the draft."""
    target, draft = _pair(0)
    state = {f"draft_model.{k}": v.clone() for k, v in draft.state_dict().items()}
    for k, v in target.state_dict().items():
        state[k] = v.clone() + 5  # the target's tensors, different values, written after the draft's
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "draft_config.json").write_text(json.dumps(draft.config.__dict__))
    with pytest.warns(UserWarning, match=r"only the draft's tensors \(prefix 'draft_model.'\); skipped"):
        loaded = load_draft(tmp_path, target, fuse=False)
    for k, v in draft.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_draft_prefix_ambiguities_refused(tmp_path):
    target, draft = _pair(1)
    own = draft.state_dict()
    two = {f"{p}.{k}": v.clone() for k, v in own.items() for p in "ab"}
    save_file(two, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="2 GliDe drafts"):
        load_draft(tmp_path, target)
    save_file({**own, "self_attn.rel_bias": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not GliDe draft tensors.*self_attn.rel_bias"):
        load_draft(tmp_path, target)
    no_anchor = {k: v for k, v in own.items() if not k.startswith("cross_attn.q_proj.w")}
    save_file(no_anchor, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a GliDe draft"):
        load_draft(tmp_path, target)


def test_fused_draft_round_trip(tmp_path):
    target, draft = _pair(2)
    save_draft(draft, tmp_path / "a")
    loaded = load_draft(tmp_path / "a", target)  # fused by default
    assert loaded.self_attn.fused and loaded.mlp.fused
    save_draft(loaded, tmp_path / "b")  # a fused draft saves the same names and values
    a, b = load_file(str(tmp_path / "a" / "draft.safetensors")), load_file(str(tmp_path / "b" / "draft.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "kw",
    [
        dict(architecture="Qwen3ForCausalLM", qk_norm=True),
        dict(architecture="Qwen3ForCausalLM", qk_norm=True, attention_bias=True, o_proj_bias=True),
        dict(architecture="MistralForCausalLM", tie_word_embeddings=False),
        dict(architecture="Qwen2ForCausalLM", attention_bias=True),
        dict(attention_bias=True, o_proj_bias=True, mlp_bias=True),
    ],
    ids=["qwen3", "qwen3-bias", "mistral", "qwen2", "llama-bias"],
)
def test_save_hf_of_each_family_loads_in_transformers(tmp_path, kw):
    from transformers import AutoModelForCausalLM

    cfg = PRESETS["tiny"].replace(**kw)
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    torch.manual_seed(0)
    m = _shake(Target(cfg), 4).fuse()
    save_hf(m, tmp_path, dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == cfg.architecture
    assert sum(p.numel() for p in hf.parameters()) == cfg.num_parameters()
    x = torch.randint(0, cfg.vocab_size, (1, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (hf(x).logits - m(x)).abs().max().item() < 1e-4


def test_family_options_that_transformers_cannot_hold_refused():
    with pytest.raises(ValueError, match="Qwen2ForCausalLM cannot have attention_bias=False"):
        PRESETS["tiny"].replace(architecture="Qwen2ForCausalLM")
    with pytest.raises(ValueError, match="LlamaForCausalLM cannot have o_proj_bias=True"):
        PRESETS["tiny"].replace(o_proj_bias=True)


def test_load_pair_checks_the_head_dim_against_the_backend(tmp_path):
    from longspec_lab.models.pair import load_pair
    from longspec_lab.models.tokenizer import copy_tokenizer_files

    save_hf(Target(PRESETS["tiny"].replace(vocab_size=4096)), tmp_path, dtype=torch.float32)
    copy_tokenizer_files(tmp_path)
    with pytest.raises(ValueError, match="head_dim 16 is not taken by the Triton"):
        load_pair(tmp_path, device="cpu", need_draft=False, attention_backend="triton")
    target, draft, tok = load_pair(tmp_path, device="cpu", need_draft=False, attention_backend="sdpa")
    assert draft is None and target.config.head_dim == 16 and tok.encode("def f():")
