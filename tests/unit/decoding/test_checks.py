"""The decoder's arguments are checked where they are given, each with its fix, and a decoder that raised gives the
same tokens as a fresh one: the models (their kinds, their order, a draft built for another target), the integer
arguments in any integer type, gamma's cap named as gamma's, and a warning for each argument a call leaves unused.
A tiny random pair on the CPU, float32."""

import warnings

import numpy as np
import pytest
import torch

from longspec_lab.decoding.eager import SpecDecoder
from longspec_lab.models.config import PRESETS
from longspec_lab.models.glide import DraftConfig, Glide
from longspec_lab.models.loaders import pick_device, pick_dtype
from longspec_lab.models.target import Target
from longspec_lab.spec.tree import MAX_TREE_DEPTH, TreeShape

PROMPT = [5, 9, 11, 3, 7, 2, 8]


def _pair(seed=0, cfg=PRESETS["tiny"]):
    torch.manual_seed(seed)
    target = Target(cfg).eval()
    draft = Glide(DraftConfig.from_target(target.config, window=16), target).eval()
    with torch.no_grad():
        for p in draft.parameters():
            p.normal_(0, 0.3)
    return target, draft


@pytest.fixture(scope="module")
def pair():
    return _pair()


def _tokens(dec, **kw):
    return dec.generate(PROMPT, max_new_tokens=12, stop_at_eos=False, **kw).new_tokens


def test_the_models_kinds_and_order(pair):
    target, draft = pair
    with pytest.raises(TypeError, match=r"must be a longspec_lab Target.*got Glide.*other way round"):
        SpecDecoder(draft, target)
    with pytest.raises(TypeError, match=r"must be a GliDe draft.*got str"):
        SpecDecoder(target, "draft")
    other = Target(PRESETS["tiny"].replace(vocab_size=PRESETS["tiny"].vocab_size + 8))
    with pytest.raises(ValueError, match=r"draft vocabulary size .* does not fit the target's"):
        SpecDecoder(other, draft)


def test_a_draft_built_on_another_target_object_is_warned(pair):
    target, draft = pair
    twin, _ = _pair()  # the same weights in another object
    with pytest.warns(UserWarning, match="built on another Target object"):
        dec = SpecDecoder(twin, draft)
    assert _tokens(dec) == _tokens(SpecDecoder(target, draft))  # same weights: same tokens
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SpecDecoder(target, draft)  # its own target: no warning


@pytest.mark.parametrize("bad", ["512", 0, -5, 2.5, True])
def test_max_cache_len_is_checked_up_front(pair, bad):
    with pytest.raises(ValueError, match=r"max_cache_len=.* must be an integer >= 1"):
        SpecDecoder(*pair, max_cache_len=bad)


def test_integer_arguments_in_any_integer_type(pair):
    dec = SpecDecoder(*pair)
    want = _tokens(dec, method="chain", gamma=3)
    for n in (np.int64(12), torch.tensor(12)):
        assert (
            dec.generate(PROMPT, method="chain", gamma=np.int32(3), max_new_tokens=n, stop_at_eos=False).new_tokens
            == want
        )
    for bad in (12.0, "12", torch.tensor([12, 13]), torch.tensor(12.0), None):
        with pytest.raises(ValueError, match=r"max_new_tokens=.* must be an integer >= 1"):
            dec.generate(PROMPT, max_new_tokens=bad)


def test_gammas_cap_is_named_as_gammas(pair):
    dec = SpecDecoder(*pair)
    with pytest.raises(ValueError, match=rf"gamma={MAX_TREE_DEPTH + 1} is above the cap of {MAX_TREE_DEPTH}"):
        dec.generate(PROMPT, method="chain", gamma=MAX_TREE_DEPTH + 1)
    for bad in (-1, 2.5, "3", True):
        with pytest.raises(ValueError, match="a chain needs an integer gamma >= 0"):
            TreeShape.chain(bad)
    assert TreeShape.chain(np.int64(3)).widths == (1, 1, 1)


def test_unused_arguments_are_warned_and_change_nothing(pair):
    dec = SpecDecoder(*pair)
    chain = _tokens(dec, method="chain", gamma=3)
    with pytest.warns(
        UserWarning, match=r"tree_shape \(used by method='tree'; method='chain' takes gamma\) is ignored"
    ):
        assert _tokens(dec, method="chain", gamma=3, tree_shape=[4, 16]) == chain
    with pytest.warns(UserWarning, match=r"gamma \(used by method='chain'; method='ar'\) is ignored"):
        dec.generate(PROMPT, method="ar", gamma=7, max_new_tokens=4)
    with pytest.warns(UserWarning, match=r"top_k / top_p .* is ignored"):
        dec.generate(PROMPT, method="tree", top_k=5, max_new_tokens=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # what each method uses: no warning
        dec.generate(PROMPT, method="tree", tree_shape=[2, 2], max_new_tokens=4)
        dec.generate(PROMPT, method="chain", gamma=2, max_new_tokens=4)
        dec.generate(PROMPT, method="tree", do_sample=True, temperature=0.8, top_k=5, seed=0, max_new_tokens=4)


def test_a_decoder_that_raised_gives_a_fresh_ones_tokens(pair):
    dec = SpecDecoder(*pair)
    fresh = _tokens(SpecDecoder(*pair), method="tree", tree_shape=[2, 3, 3])
    for bad in ({"method": "chain", "gamma": 999}, {"max_new_tokens": np.float64(3)}, {"tree_shape": [0, 2]}):
        with pytest.raises(ValueError):
            dec.generate(PROMPT, **{"max_new_tokens": 12, **bad})
    assert _tokens(dec, method="tree", tree_shape=[2, 3, 3]) == fresh


@pytest.mark.parametrize(
    "device, match", [("gpu", "is unknown"), ("mps", "runs on 'cpu' or 'cuda'"), ("cuda:x", "unknown")]
)
def test_devices_other_than_cpu_and_cuda_are_named(device, match):
    with pytest.raises(ValueError, match=match):
        pick_device(device)


def test_dtypes_that_are_not_float_types_are_named():
    for bad in (torch.int8, torch.int64, torch.bool):
        with pytest.raises(ValueError, match="not a float type"):
            pick_dtype(bad)
    assert pick_dtype(torch.float64) is torch.float64 and pick_dtype("bf16") is torch.bfloat16
