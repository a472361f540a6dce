"""The embedded model's corpus: the running interpreter's Python standard library.

The toy target/draft pair that ships with longspec_lab is trained on code, because long code files are a
natural long-context workload (LongSpec, arXiv 2502.17421, evaluates on RepoBench-style code completion).

Corpus rules (deterministic, no downloads):
- every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]``, test suites included, sorted by path;
- anything under ``site-packages`` / ``dist-packages`` is skipped (that is installed software, not stdlib);
- files that are not valid UTF-8 are skipped (a handful of encoding test fixtures, e.g.
  ``test/encoded_modules/module_koi8_r.py``);
- the 8 modules in ``HELD_OUT_MODULES`` form the held-out split. Only the module files themselves are held
  out; their test files (``test/test_argparse.py`` ...) stay in train. A module that is a package
  (``string`` became one in 3.14) is held out as its ``__init__.py``.

Token stream convention: ``<|endoftext|>`` (id 0) goes before every file and once at the very end:
``[EOS] file_1 [EOS] file_2 ... [EOS] file_n [EOS]``. So EOS doubles as BOS for a document.

CLI: ``python -m longspec_lab.train.corpus --tokenize --out data/tokens`` writes ``train.u16`` and ``heldout.u16``
(uint16 token ids) plus ``meta.json``; the GPU box reads those, so its own (different) stdlib never matters.

Taught in: notebooks/05_the_glide_draft.ipynb (the data the pair was trained on).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from longspec_lab.paths import DATA_DIR, PROMPTS_DIR

ENDOFTEXT = "<|endoftext|>"
EOS_ID = 0
HELD_OUT_MODULES = ("json.decoder", "argparse", "textwrap", "csv", "heapq", "string", "dataclasses", "shlex")
SPLITS = ("train", "heldout")
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def resolve_module(name: str, root: Path | None = None) -> Path:
    """Dotted module name -> its source file in the stdlib (``a/b.py`` or ``a/b/__init__.py``)."""
    root = root or stdlib_root()
    base = root.joinpath(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    raise ValueError(
        f"held-out module {name!r} has no source file under {root}; "
        f"fix HELD_OUT_MODULES or run with a CPython that ships its stdlib sources"
    )


def _is_utf8(path: Path) -> bool:
    try:
        path.read_bytes().decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def corpus_files(split: str = "train", root: Path | None = None) -> list[Path]:
    """Sorted source files of one split ("train" or "heldout")."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = root or stdlib_root()
    held = sorted(resolve_module(m, root) for m in HELD_OUT_MODULES)
    if split == "heldout":
        return held
    held_set = set(held)
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if _SKIP_DIRS.intersection(rel.parts[:-1]) or p in held_set or not p.is_file():
            continue
        if _is_utf8(p):
            out.append(p)
    return out


def read_corpus(split: str = "train", root: Path | None = None) -> list[str]:
    """File texts of one split, in ``corpus_files`` order. Join them as ``ENDOFTEXT + t`` per file."""
    return [p.read_bytes().decode("utf-8") for p in corpus_files(split, root)]


def encode_documents(tokenizer, texts: list[str]) -> np.ndarray:
    """[EOS] doc_1 [EOS] doc_2 ... [EOS] as uint16 ids (tokenizer: a ``tokenizers.Tokenizer``)."""
    if tokenizer.get_vocab_size() > 65536:
        raise ValueError("vocab too large for uint16 token files; use a vocab of at most 65536")
    for i, t in enumerate(texts):
        if ENDOFTEXT in t:  # it would be matched as the special token, corrupting the stream
            raise ValueError(f"document {i} contains the literal {ENDOFTEXT!r}; drop it from the corpus")
    parts = [np.array([EOS_ID], dtype=np.uint16)]
    for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
        parts.append(np.asarray(enc.ids, dtype=np.uint16))
        parts.append(np.array([EOS_ID], dtype=np.uint16))
    return np.concatenate(parts)


def write_tokens(tokenizer, texts: list[str], out_path) -> int:
    """Encode ``texts`` and write them as a flat uint16 file (readable with ``np.memmap``). Returns count."""
    ids = encode_documents(tokenizer, texts)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    mm = np.memmap(out_path, dtype=np.uint16, mode="w+", shape=(len(ids),))
    mm[:] = ids
    mm.flush()
    del mm
    return int(len(ids))


def tokenize_corpus(tokenizer, split: str, out_path) -> int:
    """Tokenize one split of the stdlib corpus into ``out_path`` (uint16). Returns the token count."""
    return write_tokens(tokenizer, read_corpus(split), out_path)


def token_file(tokens_dir, split: str) -> Path:
    """`split`.u16, or `split`.u32 for vocabularies above 65,536 ids, in `tokens_dir`."""
    tokens_dir = Path(tokens_dir)
    for ext in ("u16", "u32"):
        if (tokens_dir / f"{split}.{ext}").is_file():
            return tokens_dir / f"{split}.{ext}"
    return tokens_dir / f"{split}.u16"


def load_tokens(path) -> np.ndarray:
    """A token file as a read-only memmap: uint16 (.u16) or uint32 (.u32) ids."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"token file {path} not found; make it with "
            f"`python -m longspec_lab.train.corpus --tokenize --out {path.parent}`"
        )
    dtype = np.uint32 if path.suffix == ".u32" else np.uint16
    if path.stat().st_size % np.dtype(dtype).itemsize or path.stat().st_size == 0:
        raise ValueError(f"token file {path} is empty or truncated; make it again")
    return np.memmap(path, dtype=dtype, mode="r")


class TokenDataset:
    """Random windows of ``seq_len + 1`` tokens from a uint16 token file, seeded and reproducible.

    ``batch(B)`` -> int64 [B, seq_len + 1]; inputs are ``[:, :-1]``, labels ``[:, 1:]``.
    ``eval_windows()`` -> the fixed, non-overlapping windows covering the file (for held-out loss).
    """

    def __init__(self, path, seq_len: int, seed: int = 0):
        self.tokens = load_tokens(path)
        self.seq_len = int(seq_len)
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if len(self.tokens) < self.seq_len + 1:
            raise ValueError(
                f"{path} has {len(self.tokens)} tokens, fewer than seq_len+1={self.seq_len + 1}; "
                f"use a shorter seq_len or a bigger token file"
            )
        self.generator = torch.Generator().manual_seed(int(seed))

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, batch_size: int) -> torch.Tensor:
        hi = len(self.tokens) - self.seq_len - 1
        starts = torch.randint(0, hi + 1, (batch_size,), generator=self.generator)
        rows = [np.asarray(self.tokens[s : s + self.seq_len + 1], dtype=np.int64) for s in starts.tolist()]
        return torch.from_numpy(np.stack(rows))  # [B, T+1]

    def eval_windows(self, max_windows: int | None = None) -> torch.Tensor:
        n = (len(self.tokens) - 1) // self.seq_len
        if max_windows is not None:
            n = min(n, max_windows)
        rows = [
            np.asarray(self.tokens[i * self.seq_len : (i + 1) * self.seq_len + 1], dtype=np.int64) for i in range(n)
        ]
        return torch.from_numpy(np.stack(rows))  # [N, T+1]


# ---------------------------------------------------------------- sample long prompts (held-out code)


@dataclass(frozen=True)
class PromptSpec:
    module: str
    start_line: int  # 1-based, first line of the chunk
    target_tokens: int  # the chunk is the longest run of whole lines with at most this many tokens


# Lengths spread over ~500..3800 tokens; 3800 + 256 new tokens + BOS still fits a 4096 context.
PROMPT_SPECS = (  # start lines are top-level class/def lines of the Python 3.11 sources
    PromptSpec("json.decoder", 1, 2300),
    PromptSpec("argparse", 1, 3800),
    PromptSpec("argparse", 1104, 3500),
    PromptSpec("argparse", 1868, 2800),
    PromptSpec("dataclasses", 1, 3000),
    PromptSpec("dataclasses", 723, 2200),
    PromptSpec("textwrap", 1, 1500),
    PromptSpec("csv", 1, 1200),
    PromptSpec("heapq", 1, 1800),
    PromptSpec("string", 1, 1100),
    PromptSpec("shlex", 1, 600),
    PromptSpec("heapq", 316, 500),
)


def _cut_chunk(tokenizer, lines: list[str], start: int, target: int) -> tuple[str, int, int]:
    """Longest run of whole lines from ``start`` (0-based) with <= target tokens -> (text, end, n_tokens)."""
    lo, hi = start + 1, len(lines)  # binary search on the end line (token count grows with lines)
    count = lambda e: len(tokenizer.encode("".join(lines[start:e]), add_special_tokens=False).ids)
    if count(lo) > target:
        raise ValueError(f"first line at {start + 1} alone exceeds {target} tokens; move the start line")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(mid) <= target:
            lo = mid
        else:
            hi = mid - 1
    return "".join(lines[start:lo]), lo, count(lo)


def make_prompts(tokenizer, out_dir=PROMPTS_DIR, specs=PROMPT_SPECS) -> list[dict]:
    """Write the prompt .txt files and ``index.json`` from the held-out modules of this interpreter."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    root, entries = stdlib_root(), []
    for spec in specs:
        path = resolve_module(spec.module, root)
        raw = path.read_bytes()
        lines = raw.decode("utf-8").splitlines(keepends=True)
        text, end, n = _cut_chunk(tokenizer, lines, spec.start_line - 1, spec.target_tokens)
        name = f"{spec.module.replace('.', '_')}_L{spec.start_line}-{end}.txt"
        (out_dir / name).write_bytes(text.encode("utf-8"))
        entries.append(
            dict(
                file=name,
                module=spec.module,
                source=str(path.relative_to(root)),
                line_start=spec.start_line,
                line_end=end,
                n_tokens=n,
                sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
                source_sha256=hashlib.sha256(raw).hexdigest(),
            )
        )
    index = dict(
        python_version=sys.version.split()[0],
        stdlib=str(root),
        note="contiguous whole-line chunks of held-out modules; n_tokens without BOS",
        prompts=entries,
    )
    (out_dir / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return entries


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m longspec_lab.train.corpus",
        description="Stdlib corpus tools: token files for training, long prompts.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--tokenize", action="store_true", help="write OUT/train.u16, OUT/heldout.u16, OUT/meta.json")
    ap.add_argument("--out", default=str(DATA_DIR / "tokens"), help="output folder for --tokenize")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: data/tokenizer)")
    ap.add_argument("--make-prompts", action="store_true", help="regenerate data/prompts from held-out modules")
    ap.add_argument("--stats", action="store_true", help="print file counts and bytes per split")
    args = ap.parse_args(argv)
    if not (args.tokenize or args.make_prompts or args.stats):
        ap.error("nothing to do: pass --tokenize, --make-prompts and/or --stats")
    from longspec_lab.models.tokenizer import load_tokenizer, tokenizer_fingerprint

    if args.stats:
        for s in SPLITS:
            files = corpus_files(s)
            print(f"{s}: {len(files)} files, {sum(p.stat().st_size for p in files):,} bytes")
    if args.tokenize or args.make_prompts:
        tok = load_tokenizer(args.tokenizer)
    if args.tokenize:
        out = Path(args.out)
        meta = dict(
            python_version=sys.version.split()[0],
            stdlib=str(stdlib_root()),
            tokenizer_sha256=tokenizer_fingerprint(args.tokenizer),
            eos_id=EOS_ID,
            dtype="uint16",
            held_out_modules=list(HELD_OUT_MODULES),
        )
        for s in SPLITS:
            texts = read_corpus(s)
            n = write_tokens(tok, texts, out / f"{s}.u16")
            nbytes = sum(len(t.encode("utf-8")) for t in texts)
            meta[s] = dict(files=len(texts), bytes=nbytes, tokens=n, bytes_per_token=round(nbytes / n, 4))
            print(f"{s}: {len(texts)} files, {nbytes:,} bytes -> {n:,} tokens ({nbytes / n:.3f} bytes/token)")
        (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    if args.make_prompts:
        for e in make_prompts(tok):
            print(f"{e['file']}: {e['n_tokens']} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
