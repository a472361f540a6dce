"""The shipped embedded model: parity with transformers, greedy generation, bad input."""

import pytest
import torch

from longspec_lab.decoding.eager import SpecDecoder
from longspec_lab.paths import EMBEDDED_TARGET, load_prompts


def test_embedded_logits_match_transformers(embedded_target, hf_embedded):
    target, tok = embedded_target
    ids = torch.tensor([tok.encode(load_prompts(min_tokens=1000)[0]["text"])[:1500]])
    with torch.no_grad():
        diff = (hf_embedded(ids).logits - target(ids)).abs().max().item()
    assert diff <= 1e-4


def test_embedded_config_is_what_the_issue_asks():
    from longspec_lab.models.loaders import read_config

    cfg = read_config(EMBEDDED_TARGET)
    assert cfg.num_layers >= 8 and cfg.num_kv_heads < cfg.num_heads and cfg.head_dim == 64
    assert cfg.max_position_embeddings >= 2048
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(EMBEDDED_TARGET))
    assert hf_tok.decode(hf_tok.encode("def f(x):\n    return x")) == "def f(x):\n    return x"


@pytest.mark.parametrize("idx", [0, 1, 2])
def test_ar_matches_transformers_generate(embedded_target, hf_embedded, idx):
    target, tok = embedded_target
    prompt = load_prompts(min_tokens=1000)[idx]
    ids = tok.encode(prompt["text"])
    assert len(ids) >= 1000
    n = 48
    with torch.no_grad():
        ref = hf_embedded.generate(
            torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(ids) :].tolist()
    res = SpecDecoder(target, None, backend="torch").generate(ids, method="ar", max_new_tokens=n, stop_at_eos=False)
    assert res.new_tokens == ref
    assert res.target_calls == n and res.tau == 1.0


def test_bad_input_then_decoder_still_works(embedded_target):
    target, tok = embedded_target
    dec = SpecDecoder(target, None)
    ids = tok.encode("import os\n")
    good = dec.generate(ids, method="ar", max_new_tokens=8).new_tokens
    ctx = target.config.max_position_embeddings
    with pytest.raises(ValueError, match="exceeds the model's context"):
        dec.generate([1] * (ctx - 10), method="ar", max_new_tokens=20)
    with pytest.raises(ValueError, match="prompt is empty"):
        dec.generate([], method="ar")
    with pytest.raises(ValueError, match="max_new_tokens"):
        dec.generate(ids, method="ar", max_new_tokens=0)
    with pytest.raises(ValueError, match="method"):
        dec.generate(ids, method="beam")
    assert dec.generate(ids, method="ar", max_new_tokens=8).new_tokens == good


def test_cli_generate_json(capsys):
    import json

    from longspec_lab.cli import main

    assert main(["generate", "--prompt", "def add(a, b):\n", "--max-new-tokens", "12", "--json", "--method", "ar"]) == 0
    obj = json.loads(capsys.readouterr().out)
    for key in ("method", "model_path", "new_tokens", "text", "target_calls", "tokens_per_s", "attention_backend"):
        assert key in obj
    assert obj["model_path"] == str(EMBEDDED_TARGET.resolve()) and len(obj["new_tokens"]) <= 12
    assert main(["generate", "--prompt", "", "--method", "ar"]) == 2
    assert "prompt is empty" in capsys.readouterr().err
