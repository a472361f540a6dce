"""Your own text -> token files, against the tokenizer applied document by document (the reference)."""

import json

import numpy as np
import pytest

from longspec_lab.paths import EMBEDDED_TARGET
from longspec_lab.train.corpus import TokenDataset, load_tokens, token_file
from longspec_lab.train.text import CHUNK_CHARS, iter_documents, tokenize_text


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(EMBEDDED_TARGET))


def _reference(tok, docs, eos):
    ids = [eos]
    for d in docs:
        ids += tok(d, add_special_tokens=False)["input_ids"] + [eos]
    return ids


def test_folder_stream_equals_per_document_encoding(tmp_path, tok, capsys):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    docs = {"a.py": "def f(x):\n    return x + 1\n" * 40, "sub/b.md": "# notes\n\nsome text, ü ß\n" * 30}
    for name, text in docs.items():
        (src / name).write_text(text, encoding="utf-8")
    (src / "blob.bin").write_bytes(b"\x00\xff\x10" * 50)  # skipped: not text
    (src / ".hidden").write_text("never read")
    out = tokenize_text(src, tok, tmp_path / "tok", 4096, 0, min_tokens=33, heldout_tokens=65, progress=False)
    train, held = load_tokens(token_file(out, "train")), load_tokens(token_file(out, "heldout"))
    want = _reference(tok, [docs["a.py"], docs["sub/b.md"]], 0)  # sorted path order
    assert np.concatenate([train, held]).tolist() == want
    assert len(held) == 65 and train.dtype == np.uint16
    meta = json.loads((out / "meta.json").read_text())
    assert meta["documents"] == 2 and meta["tokens"] == len(want) and meta["skipped"] == [str(src / "blob.bin")]
    assert TokenDataset(token_file(out, "train"), 32).batch(2).shape == (2, 33)
    said = capsys.readouterr()  # the skipped file is reported on stderr, so stdout stays the run's summary
    assert "skipped 1 files" in said.err and "skipped" not in said.out


def test_jsonl_and_long_documents(tmp_path, tok, monkeypatch):
    monkeypatch.setattr("longspec_lab.train.text.CHUNK_CHARS", 200)
    long_doc = "".join(f"value_{i} = {i}\n" for i in range(100))  # split at line ends into <= 200-char pieces
    lines = [json.dumps({"text": "import os\n"}), "", json.dumps("print(1)\n"), json.dumps({"text": long_doc})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    assert list(iter_documents(tmp_path / "d.jsonl")) == ["import os\n", "print(1)\n", long_doc]
    out = tokenize_text(tmp_path / "d.jsonl", tok, tmp_path / "t", 4096, 0, 17, 17, progress=False)
    got = np.concatenate([load_tokens(token_file(out, s)) for s in ("train", "heldout")]).tolist()
    pieces = []
    text = long_doc
    while len(text) > 200:
        cut = text.rfind("\n", 0, 200) + 1
        pieces.append(text[:cut])
        text = text[cut:]
    pieces.append(text)
    want = [0] + tok("import os\n", add_special_tokens=False)["input_ids"] + [0]
    want += tok("print(1)\n", add_special_tokens=False)["input_ids"] + [0]
    for p in pieces:
        want += tok(p, add_special_tokens=False)["input_ids"]
    assert got == want + [0] and CHUNK_CHARS > 200


def test_large_vocab_uses_uint32(tmp_path, tok):
    (tmp_path / "a.txt").write_text("x = 1\n" * 100)
    out = tokenize_text(tmp_path / "a.txt", tok, tmp_path / "t", 200_000, 70_000, 9, 9, progress=False)
    train = load_tokens(token_file(out, "train"))
    assert token_file(out, "train").suffix == ".u32" and train.dtype == np.uint32 and int(train[0]) == 70_000


def test_bad_sources_name_the_problem(tmp_path, tok):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no text key"}\n')
    with pytest.raises(ValueError, match="line 2"):
        list(iter_documents(tmp_path / "bad.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no files"):
        list(iter_documents(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_documents(tmp_path / "missing"))
    (tmp_path / "short.txt").write_text("a = 1\n")
    with pytest.raises(ValueError, match="too few"):
        tokenize_text(tmp_path / "short.txt", tok, tmp_path / "t", 4096, 0, 64, 64, progress=False)
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "a.txt").write_text("zzzz " * 50)
    with pytest.raises(ValueError, match="does not belong"):
        tokenize_text(tmp_path / "big", tok, tmp_path / "t2", 10, 0, 4, 4, progress=False)
