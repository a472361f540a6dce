"""Your own text as draft-training tokens: a folder of text files or a JSONL, in the target's tokenizer.

A GliDe draft (LongSpec, arXiv 2502.17421, §2) learns to predict what its target will say, so it
should see the kind of text the target will be asked about. `tokenize_text` reads that text one
document at a time (a file of the folder, or one JSONL line with a "text" field), encodes it with the
target's own tokenizer through `transformers.AutoTokenizer`, and appends the ids to a token file on
disk, so memory holds one document, never the corpus. Documents are separated by the tokenizer's EOS
id, as in the stdlib corpus (`corpus.py`). The last stretch of the stream becomes the held-out split.

Files: train.u16 / heldout.u16 (uint16) when the vocabulary has at most 65,536 ids, else .u32.

Taught in: notebooks/05_the_glide_draft.ipynb
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

CHUNK_CHARS = 1 << 20  # longer documents are encoded in pieces of about this many characters (at line ends)


def _pieces(text: str) -> Iterator[str]:
    while len(text) > CHUNK_CHARS:
        cut = text.rfind("\n", 0, CHUNK_CHARS) + 1 or CHUNK_CHARS
        yield text[:cut]
        text = text[cut:]
    if text:
        yield text


def iter_documents(source, skipped: list | None = None) -> Iterator[str]:
    """Texts of `source`: every UTF-8 file under a folder (sorted, hidden files skipped), each line of a
    .jsonl file (a JSON object with a "text" string, or a JSON string), or one plain text file."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"--text {source} does not exist; give a folder of text files or a .jsonl file")
    if source.is_dir():
        files = sorted(
            p
            for p in source.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(source).parts)
        )
        if not files:
            raise ValueError(f"--text {source} holds no files; put some text files in it")
        for p in files:
            data = p.read_bytes()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text = None
            if text is None or "\x00" in text:  # binary or another encoding: say so, keep going
                if skipped is not None:
                    skipped.append(str(p))
                continue
            yield text
        return
    if source.suffix == ".jsonl":
        with open(source, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise ValueError(f"--text {source} line {lineno} is not UTF-8; save the file as UTF-8") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(
                        f"--text {source} line {lineno} is not valid JSON ({e.msg}); each line must be an "
                        'object like {"text": "..."}'
                    ) from None
                text = obj.get("text") if isinstance(obj, dict) else obj
                if not isinstance(text, str):
                    raise ValueError(
                        f'--text {source} line {lineno} has no "text" string; each line must be an object '
                        'like {"text": "..."}'
                    )
                yield text
        return
    try:
        yield source.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--text {source} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None


def tokenize_text(
    source,
    tokenizer,
    out_dir,
    vocab_size: int,
    eos_id: int | None,
    min_tokens: int,
    heldout_tokens: int,
    progress: bool = True,
) -> Path:
    """Encode `source` into `out_dir`/train.* and heldout.*; the last `heldout_tokens` of the stream
    (at most a tenth of it, at least `min_tokens`) are held out. Returns `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype, ext = (np.uint16, "u16") if vocab_size <= 65536 else (np.uint32, "u32")
    train_path, held_path = out_dir / f"train.{ext}", out_dir / f"heldout.{ext}"
    tokenizer.model_max_length = 1 << 60  # we only encode; no model window applies here
    skipped: list[str] = []
    n_docs = n_tok = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="tokenize", unit="doc", dynamic_ncols=True)
    sep = [] if eos_id is None else [int(eos_id)]
    with open(train_path, "wb") as fh:
        if sep:
            fh.write(np.asarray(sep, dtype=dtype).tobytes())
            n_tok += 1
        for text in iter_documents(source, skipped):
            for piece in _pieces(text):
                ids = np.asarray(tokenizer(piece, add_special_tokens=False)["input_ids"], dtype=np.int64)
                if ids.size and int(ids.max()) >= vocab_size:
                    raise ValueError(
                        f"the tokenizer gives id {int(ids.max())} but the target has {vocab_size} ids; the "
                        "tokenizer in the model folder does not belong to these weights"
                    )
                fh.write(ids.astype(dtype).tobytes())
                n_tok += ids.size
            fh.write(np.asarray(sep, dtype=dtype).tobytes())
            n_tok += len(sep)
            n_docs += 1
            if bar is not None:
                bar.update()
                bar.set_postfix(tokens=n_tok)
    if bar is not None:
        bar.close()
    if skipped:
        print(f"warning: skipped {len(skipped)} files that are not UTF-8 text, e.g. {skipped[0]}", file=sys.stderr)
    if n_docs == 0:
        raise ValueError(f"--text {source} holds no UTF-8 text; give text files or a JSONL of texts")
    n_held = max(min_tokens, min(heldout_tokens, n_tok // 10))
    if n_tok - n_held < min_tokens:
        raise ValueError(
            f"--text {source} gives {n_tok} tokens, too few to train on ({2 * min_tokens} needed for one "
            "training and one held-out window); give more text or a shorter --seq-len"
        )
    size = np.dtype(dtype).itemsize
    train = np.memmap(train_path, dtype=dtype, mode="r")
    np.asarray(train[n_tok - n_held :]).tofile(held_path)
    del train
    os.truncate(train_path, (n_tok - n_held) * size)
    (out_dir / "meta.json").write_text(
        json.dumps(dict(source=str(source), documents=n_docs, tokens=n_tok, heldout_tokens=n_held, skipped=skipped))
    )
    return out_dir
