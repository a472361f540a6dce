"""Byte-level BPE tokenizer for the embedded model (vocab 4096), trained on the stdlib train split.

Byte-level BPE (GPT-2 style: bytes mapped to printable characters, regex pre-split, greedy merges) round-trips
any UTF-8 text exactly, which a code model needs for indentation, tabs, form feeds and odd unicode.
``<|endoftext|>`` has id 0 and serves as BOS, EOS and pad. Encoding adds no special tokens by itself.

Train (CPU, ~1 min): ``python -m longspec_lab.train.tokenizer --train`` -> ``data/tokenizer/`` with
``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json`` (loadable by
``transformers.AutoTokenizer``) and ``PROVENANCE.md``.

Taught in: notebooks/01_speculative_decoding_in_one_picture.ipynb.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from longspec_lab.models.tokenizer import tokenizer_fingerprint
from longspec_lab.paths import TOKENIZER_DIR
from longspec_lab.train.corpus import ENDOFTEXT, EOS_ID, HELD_OUT_MODULES, corpus_files, read_corpus

VOCAB_SIZE = 4096


def build_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE pipeline (no normalizer, so text is kept byte-for-byte)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE, min_frequency: int = 2) -> Tokenizer:
    if vocab_size < 256 + 1:
        raise ValueError(f"vocab_size must be >= 257 (256 byte symbols + {ENDOFTEXT}), got {vocab_size}")
    tok = build_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=False,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    assert tok.token_to_id(ENDOFTEXT) == EOS_ID
    return tok


def save_tokenizer(tok: Tokenizer, out_dir=TOKENIZER_DIR) -> Path:
    """Write the three files transformers needs (hand-written configs: stable across transformers versions)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    special = dict(bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT, unk_token=ENDOFTEXT)
    config = dict(
        tokenizer_class="PreTrainedTokenizerFast",
        model_max_length=4096,
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        **special,
    )
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=1) + "\n")
    return out_dir


def _count(tok: Tokenizer, texts: list[str]) -> tuple[int, int]:
    n_tok = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    return sum(len(t.encode("utf-8")) for t in texts), n_tok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m longspec_lab.train.tokenizer",
        description="Train the embedded model's byte-level BPE on the stdlib train split.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--train", action="store_true", help="train and save the tokenizer")
    ap.add_argument("--out", default=str(TOKENIZER_DIR), help="output folder")
    ap.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = ap.parse_args(argv)
    if not args.train:
        ap.error("pass --train")
    t0 = time.time()
    train_texts = read_corpus("train")
    tok = train_tokenizer(train_texts, args.vocab_size)
    out = save_tokenizer(tok, args.out)
    train_s = time.time() - t0
    held_texts = read_corpus("heldout")
    (tb, tt), (hb, ht) = _count(tok, train_texts), _count(tok, held_texts)
    vocab_flag = f" --vocab-size {args.vocab_size}" if args.vocab_size != VOCAB_SIZE else ""
    prov = f"""# data/tokenizer provenance

Command: `python -m longspec_lab.train.tokenizer --train{vocab_flag}`
(run from the repo root; training took {train_s:.0f} s on CPU)

- Python {sys.version.split()[0]} standard library (`{corpus_files.__module__}.stdlib_root()`), test suites
  included, site-packages and non-UTF-8 files skipped.
- Byte-level BPE, vocab {tok.get_vocab_size()}, `{ENDOFTEXT}` = id {EOS_ID} (BOS/EOS/pad), min_frequency 2.
- Held-out modules (not seen by the tokenizer): {", ".join(HELD_OUT_MODULES)}.

| split | files | bytes | tokens (no EOS) | bytes/token |
|---|---:|---:|---:|---:|
| train | {len(train_texts)} | {tb:,} | {tt:,} | {tb / tt:.3f} |
| heldout | {len(held_texts)} | {hb:,} | {ht:,} | {hb / ht:.3f} |

tokenizer.json sha256: `{tokenizer_fingerprint(out)}`
"""
    (out / "PROVENANCE.md").write_text(prov)
    print(prov)
    return 0


if __name__ == "__main__":
    sys.exit(main())
