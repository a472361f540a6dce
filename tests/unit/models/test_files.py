"""A damaged checkpoint is named with its fix by the Python loaders, as by the command line: each file here starts as
a good one written by transformers or save_draft and is then damaged the way copies go wrong (cut short, edited by
hand, a field missing or of the wrong kind). A draft is saved without overwriting, never into a model's folder, and
a too-wide draft window is bounded by the target's context."""

import json
import os
import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from longspec_lab.models.config import PRESETS
from longspec_lab.models.draft_io import load_draft, save_draft
from longspec_lab.models.files import check_safetensors, read_json
from longspec_lab.models.glide import DraftConfig, Glide
from longspec_lab.models.loaders import load_target
from longspec_lab.models.target import Target

# a one-layer Llama, as small as transformers builds it
SMALL = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
SMALL.update(num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A tiny Llama checkpoint folder written by transformers."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("good")
    LlamaForCausalLM(LlamaConfig(**SMALL)).save_pretrained(path)
    return path


def _copy(good, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(good, out)
    return out


def _pair(window=16):
    torch.manual_seed(1)
    target = Target(PRESETS["tiny"]).eval()
    return target, Glide(DraftConfig.from_target(target.config, window=window), target).eval()


def test_the_good_checkpoint_loads(good):
    assert load_target(good, device="cpu", dtype="float32").config.hidden_size == SMALL["hidden_size"]


@pytest.mark.parametrize(
    "text, match",
    [
        ("{'hidden_size': 32}", r"config.json is not valid JSON"),
        ("[]", r"config.json holds a JSON list, not an object"),
        (None, r"config.json lacks the field 'hidden_size'.*copy config.json again"),
    ],
    ids=["not-json", "a-list", "a-field-missing"],
)
def test_a_damaged_config_is_named(good, tmp_path, text, match):
    path = _copy(good, tmp_path)
    if text is None:
        cfg = json.loads((path / "config.json").read_text())
        del cfg["hidden_size"]
        text = json.dumps(cfg)
    (path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=match):
        load_target(path, device="cpu")


def test_truncated_weights_are_named_before_anything_is_read(good, tmp_path):
    path = _copy(good, tmp_path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors is truncated: .*copy it again"):
        load_target(path, device="cpu")
    weights.write_bytes(data[:5])
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file"):
        load_target(path, device="cpu")
    check_safetensors(good / "model.safetensors")  # the intact file passes


def test_a_shard_index_naming_a_pickle_file_is_refused(good, tmp_path):
    path = _copy(good, tmp_path)
    (path / "model.safetensors").rename(path / "model-00001.safetensors")
    index = {"weight_map": {"model.embed_tokens.weight": "pytorch_model-00001.bin"}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"pytorch_model-00001.bin.*safetensors only"):
        load_target(path, device="cpu")
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match="no weight_map"):
        load_target(path, device="cpu")


def test_a_generation_config_of_the_wrong_kind_is_named(good, tmp_path):
    path = _copy(good, tmp_path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": "</s>"}))
    with pytest.raises(ValueError, match=r"generation_config.json has a value of the wrong kind.*eos_token_id"):
        load_target(path, device="cpu")


def test_read_json_names_the_file(tmp_path):
    f = tmp_path / "x.json"
    f.write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match=r"x.json is not valid JSON"):
        read_json(f)
    f.write_text('{"a": 1}')
    assert read_json(f) == {"a": 1}


def test_a_damaged_draft_is_named(tmp_path):
    target, draft = _pair()
    save_draft(draft, tmp_path / "d")
    (tmp_path / "d" / "draft_config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"draft_config.json is not valid JSON"):
        load_draft(tmp_path / "d", target)
    (tmp_path / "d" / "draft_config.json").write_text(json.dumps({"window": "wide"}))
    with pytest.raises(ValueError, match=r"draft_config.json: draft config field window='wide'"):
        load_draft(tmp_path / "d", target)
    save_draft(draft, tmp_path / "d", overwrite=True)
    weights = tmp_path / "d" / "draft.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"draft.safetensors is truncated"):
        load_draft(tmp_path / "d", target)


def test_save_draft_never_overwrites_unasked_and_keeps_out_of_a_model_folder(tmp_path, good):
    target, draft = _pair()
    out = save_draft(draft, tmp_path / "d")
    before = (out / "draft.safetensors").read_bytes()
    with torch.no_grad():
        draft.mlp.down_proj.weight.add_(1.0)
    with pytest.raises(FileExistsError, match="already holds draft.safetensors, draft_config.json; pass overwrite"):
        save_draft(draft, out)
    assert (out / "draft.safetensors").read_bytes() == before  # untouched
    save_draft(draft, out, overwrite=True)
    assert (out / "draft.safetensors").read_bytes() != before
    assert sorted(p.name for p in out.iterdir()) == ["draft.safetensors", "draft_config.json"]  # no partial files
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)  # readable as any file the user makes, not 0600
    model = _copy(good, tmp_path)
    with pytest.raises(ValueError, match="holds a model checkpoint.*a folder of its own"):
        save_draft(draft, model)
    assert not (model / "draft.safetensors").exists()
    with pytest.raises(TypeError, match="saves a GliDe draft.*got Target"):
        save_draft(target, tmp_path / "t")


def test_a_draft_file_in_the_model_folder_is_named_when_the_model_loads(good, tmp_path):
    path = _copy(good, tmp_path)
    torch.manual_seed(2)
    target = load_target(path, device="cpu", dtype="float32")
    d = save_draft(Glide(DraftConfig.from_target(target.config, window=8), target), tmp_path / "d")
    shutil.copy(d / "draft.safetensors", path / "draft.safetensors")
    with pytest.raises(ValueError, match="a draft.safetensors is in the model folder"):
        load_target(path, device="cpu")


def test_a_draft_window_wider_than_the_context_is_bounded_by_it(tmp_path):
    """Past the context a window sees every position, as one of the context's own length: same logits, and a ring
    the size of the context, not of the number written in the file."""
    target, draft = _pair(window=8)
    save_draft(draft, tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "draft_config.json").read_text())
    ctx = target.config.context_length
    for window, want in ((2**40, ctx), (ctx, ctx), (8, 8)):
        cfg["window"] = window
        (tmp_path / "d" / "draft_config.json").write_text(json.dumps(cfg))
        assert load_draft(tmp_path / "d", target).config.window == want
