"""Sampling through SpecDecoder.generate on the embedded pair: temperature 0 is greedy, seeds reproduce,
bad settings raise clear errors (and leave the decoder usable), results and the CLI record the rule."""

import json
import math

import pytest
import torch

from longspec_lab.cli import main as cli_main
from longspec_lab.decoding.eager import SpecDecoder
from longspec_lab.ops.sampling import make_generator
from longspec_lab.paths import load_prompts

N_NEW = 16
RULES = [
    ("tree", "target-sample"),
    ("tree", "rrs"),
    ("chain", "chain"),
    ("tree", "naive-topk"),
    ("ar", "target-sample"),
    ("chain", "target-sample"),
]


@pytest.fixture(scope="module")
def setup(embedded_pair):
    target, draft, tok = embedded_pair
    ids = tok.encode(load_prompts(min_tokens=1000)[0]["text"])[:200]
    return SpecDecoder(target, draft, backend="torch"), ids


def gen(dec, ids, method, verify, **kw):
    kw = {"max_new_tokens": N_NEW, "stop_at_eos": False, "tree_shape": [4, 4, 4], "gamma": 3, **kw}
    return dec.generate(ids, method=method, verify=verify, **kw)


def test_temperature_zero_is_greedy_for_every_rule(setup):
    dec, ids = setup
    ar = gen(dec, ids, "ar", "greedy")
    greedy = gen(dec, ids, "tree", "greedy")
    assert greedy.new_tokens == ar.new_tokens
    ts = gen(dec, ids, "tree", "target-sample", temperature=0.0, seed=5)
    assert ts.new_tokens == greedy.new_tokens and ts.accepted_lengths == greedy.accepted_lengths
    for method, verify in RULES:
        assert gen(dec, ids, method, verify, temperature=0, seed=5).new_tokens == ar.new_tokens, verify


def test_same_seed_reproduces_token_for_token(setup):
    dec, ids = setup
    differ = 0
    for method, verify in RULES:
        a = gen(dec, ids, method, verify, temperature=1.0, top_p=0.95, seed=11)
        b = gen(dec, ids, method, verify, temperature=1.0, top_p=0.95, seed=11)
        g = gen(dec, ids, method, verify, temperature=1.0, top_p=0.95, generator=make_generator(11))
        assert a.new_tokens == b.new_tokens == g.new_tokens and a.accepted_lengths == b.accepted_lengths
        assert a.seed == 11
        differ += gen(dec, ids, method, verify, temperature=1.0, top_p=0.95, seed=12).new_tokens != a.new_tokens
    assert differ >= len(RULES) - 1  # another seed gives another sample
    torch.manual_seed(3)  # without a seed, the global RNG picks one (and the result records it)
    a = gen(dec, ids, "tree", "rrs", temperature=1.0)
    torch.manual_seed(3)
    b = gen(dec, ids, "tree", "rrs", temperature=1.0)
    assert a.new_tokens == b.new_tokens and a.seed == b.seed is not None


BAD = [
    (dict(verify="rrs", temperature=-0.5), ["temperature", "negative"]),
    (dict(verify="rrs", temperature=float("nan")), ["temperature", "finite"]),
    (dict(verify="target-sample", temperature=float("inf")), ["temperature", "finite"]),
    (dict(verify="rrs", temperature=1.0, top_p=0.0), ["top_p", "(0, 1]"]),
    (dict(verify="rrs", temperature=1.0, top_p=1.2), ["top_p", "(0, 1]"]),
    (dict(verify="rrs", temperature=1.0, top_k=0), ["top_k", ">= 1"]),
    (dict(method="chain", verify="rrs", temperature=1.0), ["rrs", "chain", "method='tree'"]),
    (dict(verify="greedy", temperature=0.8), ["greedy", "temperature 0", "'rrs'"]),
    (dict(verify="top-k", temperature=1.0), ["unknown", "'naive-topk'"]),
    (dict(verify="chain", temperature=1.0), ["chain", "method='chain'"]),
    (dict(method="ar", verify="rrs", temperature=1.0), ["ar", "target-sample"]),
    (dict(verify="rrs", temperature=1.0, seed=1.5), ["seed", "integer"]),
]


@pytest.mark.parametrize("kw,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_raises_and_decoder_still_works(setup, kw, words):
    dec, ids = setup
    before = gen(dec, ids, "tree", "rrs", temperature=1.0, seed=4, max_new_tokens=8)
    kw = {"method": "tree", **kw}
    with pytest.raises(ValueError) as e:
        gen(dec, ids, kw.pop("method"), kw.pop("verify"), max_new_tokens=8, **kw)
    for w in words:
        assert w in str(e.value)
    assert gen(dec, ids, "tree", "rrs", temperature=1.0, seed=4, max_new_tokens=8).new_tokens == before.new_tokens


def test_result_records_rule_and_acceptance_rates(setup):
    dec, ids = setup
    res = gen(dec, ids, "tree", "rrs", temperature=0.7, top_k=50, seed=1, max_new_tokens=40)
    s = res.summary()
    assert (s["verify"], s["temperature"], s["top_k"], s["top_p"], s["seed"]) == ("rrs", 0.7, 50, None, 1)
    steps = len(res.accepted_lengths)
    assert res.depth_tried[0] == steps  # the root always has children
    assert len(res.acceptance_by_depth) == 3
    assert all(a is None or 0 <= a <= 1 for a in res.acceptance_by_depth + res.acceptance_by_rank)
    # accepted draft tokens, counted by depth and by rank, agree with the accepted lengths (no cuts here)
    before_last = sum(n - 1 for n in res.accepted_lengths[:-1])  # the last step may be cut at 40 tokens
    assert before_last + res.accepted_lengths[-1] - 1 <= sum(res.depth_accepted) <= before_last + 3
    assert sum(res.rank_accepted) == sum(res.depth_accepted)
    assert math.isclose(res.tau, len(res.new_tokens) / res.target_calls)


def test_cli_sampling_flags(capsys):
    rc = cli_main(
        [
            "generate",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--prompt",
            "def main(argv):\n",
            "--max-new-tokens",
            "6",
            "--tree-shape",
            "4",
            "4",
            "--verify",
            "rrs",
            "--temperature",
            "0.8",
            "--top-k",
            "40",
            "--top-p",
            "0.9",
            "--seed",
            "2",
            "--json",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["verify"], out["temperature"], out["top_k"], out["top_p"], out["seed"]) == ("rrs", 0.8, 40, 0.9, 2)
    assert len(out["new_tokens"]) == 6
    rc = cli_main(["generate", "--device", "cpu", "--prompt", "x", "--max-new-tokens", "2", "--temperature", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "target-sample" in err and "greedy" in err
