"""Corpus splits, the shipped tokenizer, the shipped prompts and the token dataset."""

import hashlib
import json
import random
import sys

import numpy as np
import pytest
import torch

from longspec_lab.models.tokenizer import TOKENIZER_FILES, load_hf_tokenizer, load_tokenizer
from longspec_lab.paths import PROMPTS_DIR, TOKENIZER_DIR, load_prompts
from longspec_lab.train import corpus
from longspec_lab.train.corpus import (
    ENDOFTEXT,
    HELD_OUT_MODULES,
    TokenDataset,
    corpus_files,
    encode_documents,
    resolve_module,
    write_tokens,
)
from longspec_lab.train.tokenizer import train_tokenizer

ODD_TEXTS = [
    "",
    "def f(x):\n\treturn x  # tab indent\n",
    "class A:\r\n    pass\r\n\r\n",
    "  leading and trailing spaces   ",
    "\x0c\x0b\x00 control \x1b[0m chars\n",
    "non-breaking\u00a0space, zero\u200bwidth, bidi \u202e tricky \u202c",
    "caf\u00e9 na\u0131ve \u00df \u4e2d\u6587 \U0001f40d emoji \U0001f468\u200d\U0001f469\u200d\U0001f467",
    "\n\n\n        \n    \t \n",
    "f(a , b) . c ; it 's do n't ?  !\n",  # would be altered by clean_up_tokenization_spaces
    "x = '''\\u1234 \\N{GREEK SMALL LETTER ALPHA}'''",
]


def _random_texts(n=30, seed=0):
    rng = random.Random(seed)
    pool = (
        [chr(c) for c in range(0x20, 0x7F)]
        + list(" \t\n\r\x0c")
        + [chr(rng.randrange(0xA0, 0xD7FF)) for _ in range(50)]
        + [chr(rng.randrange(0x10000, 0x10FFFF)) for _ in range(10)]
    )
    return ["".join(rng.choice(pool) for _ in range(rng.randrange(1, 200))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def hf_tok():
    return load_hf_tokenizer()


def test_shipped_tokenizer_shape(tok):
    assert tok.get_vocab_size() == 4096
    assert tok.token_to_id(ENDOFTEXT) == 0
    assert all((TOKENIZER_DIR / f).is_file() for f in TOKENIZER_FILES)


@pytest.mark.parametrize("text", ODD_TEXTS + _random_texts())
def test_round_trip_fast_and_transformers(tok, hf_tok, text):
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert hf_tok.encode(text, add_special_tokens=False) == ids
    assert hf_tok.decode(ids) == text  # defaults from tokenizer_config.json (no space clean-up)


def test_transformers_special_tokens(hf_tok):
    assert hf_tok.eos_token == hf_tok.bos_token == hf_tok.pad_token == ENDOFTEXT
    assert hf_tok.eos_token_id == 0
    assert hf_tok(["ab"])["input_ids"][0] == hf_tok.encode("ab")  # no special tokens added by default


def test_round_trip_real_source(tok):
    for p in corpus_files("heldout"):
        text = p.read_text("utf-8")
        assert tok.decode(tok.encode(text).ids) == text


def test_train_tokenizer_small_corpus():
    texts = ["def foo(bar):\n    return bar + 1\n"] * 20 + ["print('hello world')\n"] * 20
    t = train_tokenizer(texts, vocab_size=300)
    assert t.token_to_id(ENDOFTEXT) == 0 and t.get_vocab_size() <= 300
    for s in texts[:1] + ODD_TEXTS:  # bytes never seen in training still round-trip
        assert t.decode(t.encode(s).ids) == s
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(texts, vocab_size=100)


def test_splits_disjoint_and_deterministic():
    train, held = corpus_files("train"), corpus_files("heldout")
    assert len(held) == len(HELD_OUT_MODULES) == len(set(held))
    assert not set(train) & set(held)
    assert train == sorted(train) and corpus_files("train") == train
    root = corpus.stdlib_root()
    assert not any("site-packages" in p.relative_to(root).parts for p in train)
    names = {p.relative_to(root).as_posix() for p in train}
    assert "test/test_argparse.py" in names or not (root / "test/test_argparse.py").exists()  # tests stay in train
    assert resolve_module("json.decoder").relative_to(root).as_posix() == "json/decoder.py"
    with pytest.raises(ValueError, match="split"):
        corpus_files("validation")
    with pytest.raises(ValueError, match="HELD_OUT_MODULES"):
        resolve_module("no_such_module_xyz")


def test_encode_documents_convention(tok):
    texts = ["a = 1\n", "b = 2\n"]
    ids = encode_documents(tok, texts).tolist()
    a, b = (tok.encode(t).ids for t in texts)
    assert ids == [0] + a + [0] + b + [0]
    with pytest.raises(ValueError, match=ENDOFTEXT.replace("|", r"\|")):
        encode_documents(tok, ["x" + ENDOFTEXT])


def test_prompts_index_consistent(tok):
    index = json.loads((PROMPTS_DIR / "index.json").read_text())
    entries = index["prompts"]
    assert len(entries) >= 10
    counts = []
    for e in entries:
        text = (PROMPTS_DIR / e["file"]).read_bytes().decode("utf-8")
        n = len(tok.encode(text).ids)
        assert n == e["n_tokens"], e["file"]
        assert hashlib.sha256(text.encode()).hexdigest() == e["sha256"]
        assert e["module"] in HELD_OUT_MODULES and text.endswith("\n")
        assert e["line_end"] - e["line_start"] + 1 == len(text.splitlines())
        counts.append(n)
        if index["python_version"] == sys.version.split()[0]:  # same stdlib: the chunk is verbatim
            lines = resolve_module(e["module"]).read_text("utf-8").splitlines(keepends=True)
            assert "".join(lines[e["line_start"] - 1 : e["line_end"]]) == text
    assert sum(c >= 1000 for c in counts) >= 10 and sum(c >= 2000 for c in counts) >= 5
    assert max(counts) + 256 + 1 <= 4096 and min(counts) >= 400
    assert sum((PROMPTS_DIR / e["file"]).stat().st_size for e in entries) < 400_000


def test_load_prompts_filters():
    allp = load_prompts()
    assert [p["n_tokens"] for p in allp] == sorted(p["n_tokens"] for p in allp)
    long = load_prompts(min_tokens=2000)
    assert long and all(p["n_tokens"] >= 2000 for p in long)
    assert {p["name"] for p in long} < {p["name"] for p in allp}
    mid = load_prompts(min_tokens=1000, max_tokens=3000)
    assert all(1000 <= p["n_tokens"] <= 3000 for p in mid)


def test_token_dataset_deterministic(tmp_path, tok):
    n = write_tokens(tok, [p.read_text("utf-8") for p in corpus_files("heldout")[:3]], tmp_path / "t.u16")
    arr = np.fromfile(tmp_path / "t.u16", dtype=np.uint16)
    assert len(arr) == n and arr[0] == 0 and arr[-1] == 0
    a, b, c = (TokenDataset(tmp_path / "t.u16", 64, seed=s) for s in (7, 7, 8))
    xa, xb, xc = a.batch(5), b.batch(5), c.batch(5)
    assert xa.shape == (5, 65) and xa.dtype == torch.int64
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)
    assert not torch.equal(a.batch(5), xa)  # the stream moves on
    for row in xa:  # every window is a contiguous slice of the file
        starts = np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(arr, 65) == row.numpy(), axis=1))
        assert len(starts) >= 1
    w = a.eval_windows()
    assert w.shape == ((n - 1) // 64, 65)
    assert torch.equal(w[1], torch.from_numpy(arr[64:129].astype(np.int64)))
    with pytest.raises(ValueError, match="seq_len"):
        TokenDataset(tmp_path / "t.u16", n + 5)
    with pytest.raises(ValueError, match="--tokenize"):
        TokenDataset(tmp_path / "missing.u16", 8)
