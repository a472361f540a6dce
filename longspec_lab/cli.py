"""`longspec-lab`: the command line, with one vocabulary of flags and one error path for every subcommand.

    longspec-lab generate       generate with ar, chain or tree speculative decoding (LongSpec, arXiv 2502.17421)
    longspec-lab demo           ar, chain and tree side by side on a held-out long code prompt
    longspec-lab bench          end-to-end tokens/s against transformers (greedy, prompt lookup)
    longspec-lab tune           search tree shapes for the most tokens/s on this device
    longspec-lab train-target   train a small target like the embedded one
    longspec-lab train-draft    train a GliDe draft for a target, on token files or on your own text
    longspec-lab lab [DIR]      copy the notebooks into DIR and open JupyterLab there

The same flag means the same thing everywhere: --model, --draft, --tokens, --max-new-tokens, --quiet,
and --tree-shape written as level widths (`4 16 16 16 16`, or `4,16,16,16,16`). Every flag is checked,
and every limit (the tree caps of spec.tree, the model's context) is checked against the model's
config.json, before any weights load. Expected mistakes print one line, `error: <what>; <fix>`, and
exit with status 2; --debug shows the traceback instead. Exit status: 0 done, 1 an unexpected failure
(a bug: the traceback is printed), 2 a mistake in the input, 130 interrupted.

On CUDA, environment variables pick between the fused kernels and the readable PyTorch path, each defaulting
to what the H200 measured faster (a kernel not yet timed stays off): LONGSPEC_NORM_LINEAR (auto/off/on),
LONGSPEC_MASKED_ATTN (auto/sdpa/efficient/math/triton), LONGSPEC_ROW_TOPK (auto/torch/triton),
LONGSPEC_TOPK_FIRST_BLOCK (1024), LONGSPEC_TOPK_SECOND_BLOCK (4096), LONGSPEC_QKV_ROPE (auto/off/on),
LONGSPEC_ROPE_TABLES (auto/off/on), LONGSPEC_FUSE_RESIDUAL (off/auto/on), LONGSPEC_TREE_SPLIT (auto/wide/on/off),
LONGSPEC_PDL (auto/off: programmatic dependent launch on Hopper), LONGSPEC_LM_HEAD (auto/torch),
LONGSPEC_WEIGHT_FIRST (on/off/wide: norm_linear reads its weight before the PDL wait),
LONGSPEC_TOPK_ALGO (auto/bitonic/max: how the beam's top-k passes select; auto: bitonic on a GPU up to
16 x 4,096 keys, max past it),
LONGSPEC_BEAM_SELECT (auto/off/on: a beam level's log-softmax and top-k in one launch),
LONGSPEC_BEAM_WARPS (8/4/2/1: that launch's warps per program), LONGSPEC_BEAM_WRITE (auto/off/on: that launch
also writes the level into the tree), LONGSPEC_HEAD_SELECT (off/auto/on: the draft's LM head and that
selection in one launch; off: slower on the H200), LONGSPEC_STREAM_LINEAR (off/auto/on: up to 16 rows through
a large weight in one split-K kernel; off: slower than cuBLAS on an H100),
LONGSPEC_GREEDY_ACCEPT (auto/off/on: a verification pass's argmax and greedy acceptance in one launch),
LONGSPEC_GREEDY_TAIL (walk/tile: how that launch finds the accepted nodes), LONGSPEC_MASKED_TILE_ROWS (16/32/64:
the draft's window-attention kernel's largest row tile),
LONGSPEC_COMBO_KERNELS (on/off: independent generated kernels launched as one), LONGSPEC_AUTOTUNE (1/0),
LONGSPEC_COMPILE_MODE (default). Every JSON a command writes records the ones set; the repository's
docs/GPU_JOBS.md says what each one changes and what it measured.

Taught in: notebooks/01_speculative_decoding_in_one_picture.ipynb
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import sys
from pathlib import Path

from longspec_lab import __version__

DEFAULT_SHAPE = [4, 16, 16, 16, 16]
VERIFY_CHOICES = ("greedy", "target-sample", "rrs", "chain", "naive-topk")  # = verify.VERIFY_RULES
DTYPES = ("float32", "bf16", "fp16")
BACKENDS = ("torch", "sdpa", "triton")
MAX_SEED = 2**32 - 1
MAX_NEW_TOKENS = 1_000_000
FIGURE_TYPES = (".html", ".png", ".svg", ".pdf", ".jpg", ".jpeg", ".webp")


class UsageError(ValueError):
    """A mistake in the command line or its files; the message says what and how to fix it."""


# ----------------------------------------------------------------------------- parser plumbing


def _given(ns) -> set:
    """The dests set explicitly on the command line (so conflicting flags can be told from defaults)."""
    if "_given" not in vars(ns):
        ns._given = set()
    return ns._given


class _Store(argparse._StoreAction):
    def __call__(self, parser, ns, values, option_string=None):
        _given(ns).add(self.dest)
        super().__call__(parser, ns, values, option_string)


class _StoreTrue(argparse._StoreTrueAction):
    def __call__(self, parser, ns, values, option_string=None):
        _given(ns).add(self.dest)
        super().__call__(parser, ns, values, option_string)


class _Deprecated(argparse.Action):
    """An old spelling of a flag: it still works, with a warning naming the new spelling."""

    def __init__(self, option_strings, dest, new, nargs=None, const=None, convert=None, **kw):
        self.new, self.convert = new, convert
        super().__init__(option_strings, dest, nargs=nargs, const=const, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, ns, values, option_string=None):
        print(f"warning: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        if self.nargs == 0:
            values = self.const
        elif self.convert is not None:
            try:
                values = self.convert(values)
            except (ValueError, argparse.ArgumentTypeError) as e:
                raise argparse.ArgumentError(self, str(e)) from None
        _given(ns).add(self.dest)
        setattr(ns, self.dest, values)


class _Formatter(argparse.HelpFormatter):
    """Shows each default once, at the end of its help line (and none for flags that default to off)."""

    def _get_help_string(self, action):
        h = action.help or ""
        d = action.default
        if not action.option_strings or d is None or d is False or d is argparse.SUPPRESS or d == [] or "default" in h:
            return h
        shown = " ".join(map(str, d)) if isinstance(d, (list, tuple)) else str(d)
        return h + f" (default: {shown})".replace("%", "%%")


class _RawFormatter(argparse.RawDescriptionHelpFormatter, _Formatter):
    """The top-level help keeps the module docstring's layout."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors that name the flag and point at --help (exit status 2)."""

    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", _Formatter)
        super().__init__(*a, **kw)
        self.register("action", None, _Store)
        self.register("action", "store", _Store)
        self.register("action", "store_true", _StoreTrue)

    def error(self, message):
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


def _int_range(lo: int, hi: int | None = None):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
        if v < lo or (hi is not None and v > hi):
            rng = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"{v} is out of range; give an integer {rng}")
        return v

    return parse


def _float_range(lo: float | None = None, hi: float | None = None, lo_open: bool = False):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{s} is not a finite number; give a finite value")
        if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
            left = "(" if lo_open else "["
            rng = f"in {left}{lo:g}, {hi:g}]" if hi is not None else f"{'>' if lo_open else '>='} {lo:g}"
            raise argparse.ArgumentTypeError(f"{v:g} is out of range; give a number {rng}")
        return v

    return parse


_DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _available_devices() -> list[str]:
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["cpu"] + [f"cuda:{i}" for i in range(n)]


def _device_arg(s: str):
    d = s.strip().lower()
    if not _DEVICE_RE.fullmatch(d):
        raise argparse.ArgumentTypeError(
            f"{s!r} is not a device longspec-lab runs on; available here: {', '.join(_available_devices())}"
        )
    return None if d == "auto" else d


def parse_tree_shape(text: str) -> list[int]:
    """'4 16 16' or '4,16,16' -> [4, 16, 16], within the documented caps of spec.tree."""
    from longspec_lab.spec.tree import TreeShape, check_tree_limits

    shape = TreeShape.of(text)
    check_tree_limits(shape)
    return list(shape.widths)


class _Shape(argparse.Action):
    """--tree-shape W [W ...]: level widths, spaces or commas; repeated to give several (bench)."""

    def __init__(self, option_strings, dest, many=False, **kw):
        self.many = many
        super().__init__(option_strings, dest, nargs="+", **kw)

    def __call__(self, parser, ns, values, option_string=None):
        text = " ".join(values)
        try:
            shape = parse_tree_shape(text)
        except ValueError as e:
            raise argparse.ArgumentError(self, f"{text!r}: {e}") from None
        if self.many:
            shape = (getattr(ns, self.dest, None) or []) + [shape]
        _given(ns).add(self.dest)
        setattr(ns, self.dest, shape)


def _old_shapes(text: str) -> list[list[int]]:
    """bench's old --shapes '4,16,16;8,16' -> [[4, 16, 16], [8, 16]]."""
    return [parse_tree_shape(s) for s in text.split(";") if s.strip()]


class _IntList(argparse.Action):
    """--gammas 4 5 (or 4,5): a list of integers in a range."""

    def __init__(self, option_strings, dest, lo=1, hi=None, **kw):
        self.lo, self.hi = lo, hi
        super().__init__(option_strings, dest, nargs="+", **kw)

    def __call__(self, parser, ns, values, option_string=None):
        parse = _int_range(self.lo, self.hi)
        try:
            out = [parse(t) for t in re.split(r"[,\s]+", " ".join(values).strip()) if t]
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentError(self, str(e)) from None
        _given(ns).add(self.dest)
        setattr(ns, self.dest, out)


# ----------------------------------------------------------------------------- shared flags


def _add_common(p, quiet_help="no progress bars"):
    p.add_argument("--quiet", action="store_true", help=quiet_help)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")


def _add_model_args(p, backend=True):
    p.add_argument(
        "--model",
        metavar="DIR",
        default=None,
        help="local Hugging Face checkpoint folder (config.json + *.safetensors; nothing is downloaded); "
        "default: the embedded model",
    )
    p.add_argument(
        "--draft",
        metavar="DIR",
        default=None,
        help="GliDe draft folder (draft.safetensors + draft_config.json); default: the embedded draft, "
        "for the embedded model only",
    )
    _add_device_args(p)
    if backend:
        p.add_argument(
            "--attention-backend",
            default=None,
            choices=BACKENDS,
            help="attention implementation (default: triton on CUDA, torch on the CPU)",
        )
    p.add_argument("--seed", type=_int_range(0, MAX_SEED), default=0, help="random seed")


def _add_device_args(p, dtypes=DTYPES, dtype_help="weights and cache dtype (default: float32 on CPU, bf16 on GPU)"):
    p.add_argument(
        "--device", type=_device_arg, default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)"
    )
    p.add_argument("--dtype", default=None, choices=dtypes, help=dtype_help)


def _add_max_new(p, default, old=None):
    p.add_argument(
        "--max-new-tokens", type=_int_range(1, MAX_NEW_TOKENS), default=default, metavar="N", help="tokens to generate"
    )
    if old:
        p.add_argument(
            old,
            dest="max_new_tokens",
            action=_Deprecated,
            new="--max-new-tokens",
            convert=_int_range(1, MAX_NEW_TOKENS),
            help=argparse.SUPPRESS,
        )


def _add_shape(p, help_text, default=None, many=False, dest="tree_shape", flag="--tree-shape"):
    p.add_argument(flag, dest=dest, action=_Shape, many=many, default=default, metavar="W", help=help_text)


# ----------------------------------------------------------------------------- checks before any weights load


def _check_device(args):
    """--device names a device that exists here; returns the torch.device the run will use."""
    import torch

    d = getattr(args, "device", None)
    if d is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(d)
    if dev.type == "cuda":
        avail = _available_devices()
        n = len(avail) - 1
        if n == 0 or (dev.index or 0) >= n:
            raise UsageError(
                f"--device {d}: {'no CUDA GPU is visible here' if n == 0 else f'only {n} CUDA GPUs here'}; "
                f"available here: {', '.join(avail)}"
            )
    return dev


def _check_backend(args, dev) -> None:
    if getattr(args, "attention_backend", None) != "triton":
        return
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        raise UsageError(
            "--attention-backend triton needs the triton package; install it, or use --attention-backend sdpa"
        )
    if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UsageError(
            "--attention-backend triton runs on a CUDA GPU (or on the CPU only under TRITON_INTERPRET=1, slowly); "
            "use --attention-backend torch or sdpa on the CPU"
        )


def _check_json(path: Path) -> None:
    from longspec_lab.models.files import read_json

    try:
        read_json(path, want=None)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _check_safetensors(path: Path) -> None:
    """Header and size of a .safetensors file, without reading its tensors: a truncated copy names the file."""
    from longspec_lab.models.files import check_safetensors

    try:
        check_safetensors(path)
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_model_dir(path, flag="--model"):
    """A target folder's files are present and intact; returns its ModelConfig (no weights read)."""
    p = Path(path)
    if not p.exists():
        raise UsageError(
            f"{flag} {p} does not exist; give a local folder holding config.json and *.safetensors "
            "(nothing is downloaded)"
        )
    if not p.is_dir():
        raise UsageError(f"{flag} {p} is a file; give the folder that holds config.json and the weights")
    if not (p / "config.json").is_file():
        raise UsageError(f"{flag} {p} has no config.json; give a Hugging Face checkpoint folder")
    for name in ("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer_config.json"):
        if (p / name).is_file():
            _check_json(p / name)
    weights = sorted(p.glob("*.safetensors"))
    if not weights:
        pickled = any(any(p.glob(pat)) for pat in ("*.bin", "*.pt", "*.pth"))
        raise UsageError(
            f"{flag} {p} holds no *.safetensors weights"
            + (
                " but pickle files (*.bin/*.pt), which longspec-lab never loads (unpickling can run code); "
                "convert once with transformers: from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
                if pickled
                else "; copy the model's *.safetensors files next to config.json"
            )
        )
    for f in weights:
        _check_safetensors(f)
    from longspec_lab.models.loaders import read_config

    try:
        return read_config(p)
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{flag} {p}: {e}") from None


def check_draft_dir(path, flag="--draft") -> None:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{flag} {p} does not exist; give a draft folder written by `longspec-lab train-draft`")
    files = [p] if p.is_file() else sorted(p.glob("*.safetensors"))
    if p.is_dir() and (p / "draft_config.json").is_file():
        _check_json(p / "draft_config.json")
    for f in files:
        if f.suffix == ".safetensors":
            _check_safetensors(f)


def _prepare(args, need_draft: bool):
    """Every check that needs no weights: device, backend, files, config. -> (device, model_dir, draft_dir, cfg)."""
    from longspec_lab.paths import EMBEDDED_DRAFT, EMBEDDED_TARGET

    model = Path(args.model) if args.model else EMBEDDED_TARGET
    cfg = check_model_dir(model, "--model" if args.model else "the embedded model")
    draft = Path(args.draft) if args.draft else None
    if need_draft and draft is None:
        if args.model is None or model.resolve() == EMBEDDED_TARGET.resolve():
            draft = EMBEDDED_DRAFT
        else:
            raise UsageError(
                f"this run needs a draft for --model {model}; pass --draft DIR (train one with "
                f"`longspec-lab train-draft --model {model} --text YOUR_TEXT`)"
                + (", or use --method ar" if hasattr(args, "method") else "")
            )
    if draft is not None:
        check_draft_dir(draft, "--draft" if args.draft else "the embedded draft")
    dev = _check_device(args)
    _check_backend(args, dev)
    return dev, model, draft, cfg


def _tokenizer(model_dir):
    from longspec_lab.models.tokenizer import load_tokenizer_for

    try:
        return load_tokenizer_for(model_dir)
    except FileNotFoundError:
        raise
    except Exception as e:  # tokenizers / transformers raise their own kinds for a damaged file
        raise UsageError(
            f"the tokenizer in {model_dir} cannot be read ({type(e).__name__}: {str(e)[:160]}); tokenizer.json or "
            "tokenizer_config.json is damaged: copy the tokenizer files again from the model's source"
        ) from None


def _load(model_dir, draft_dir, dev, dtype):
    """Target and draft, with any failure to read them named by folder."""
    from longspec_lab.models.draft_io import load_draft
    from longspec_lab.models.loaders import load_target

    try:
        target = load_target(model_dir, device=dev, dtype=dtype)
    except (ValueError, OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and type(e).__name__ != "SafetensorError":
            raise
        raise UsageError(f"cannot load the model in {model_dir}: {e}") from e
    draft = None
    if draft_dir is not None:
        try:
            draft = load_draft(draft_dir, target)
        except (ValueError, OSError, RuntimeError) as e:
            if isinstance(e, RuntimeError) and type(e).__name__ != "SafetensorError":
                raise
            raise UsageError(f"cannot load the draft in {draft_dir}: {e}") from e
    return target, draft


def _seed(seed):
    import torch

    torch.manual_seed(seed)


def _check_out_file(path, flag, overwrite) -> Path:
    from longspec_lab.paths import check_output_path

    p = Path(path)
    check_output_path(p)
    if p.is_dir():
        raise UsageError(f"{flag} {p} is a folder; give a file name")
    if p.exists() and not overwrite:
        raise UsageError(f"{flag} {p} already exists; pass --overwrite to replace it, or choose a new name")
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(
            f"{flag} {p}: {parent} is a file, so the folder for {p.name} cannot be made; choose another path"
        )
    return p


class _Progress:
    """A progress line on stderr for long runs: one tick per target forward pass (shown after 1 s)."""

    def __init__(self, target, desc, quiet):
        self.target, self.desc, self.quiet = target, desc, quiet

    def __enter__(self):
        from tqdm.auto import tqdm

        self.bar = tqdm(desc=self.desc, unit=" target passes", delay=1.0, disable=True if self.quiet else None)

        def tick(module, inputs, output):  # returns None: a forward hook's return value would replace the output
            self.bar.update()

        self.hook = self.target.register_forward_hook(tick)
        return self

    def __exit__(self, *exc):
        self.hook.remove()
        self.bar.close()


# ----------------------------------------------------------------------------- generate


def _prompt_text(args) -> str:
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.exists():
            raise UsageError(f"--prompt-file {path} does not exist; give the path of a text file")
        if path.is_dir():
            raise UsageError(f"--prompt-file {path} is a folder; give the path of a text file")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise UsageError(f"--prompt-file {path} cannot be read ({e.strerror}); check its permissions") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(
                f"--prompt-file {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                "save it as UTF-8"
            ) from None
        if not text:
            raise UsageError(f"--prompt-file {path} is empty; put the prompt text in it")
        return text
    if args.prompt is not None:
        if not args.prompt:
            raise UsageError("--prompt is empty; give some text, or leave --prompt out for a held-out code prompt")
        return args.prompt
    from longspec_lab.paths import load_prompts

    return load_prompts(min_tokens=1000)[0]["text"]


def _check_method_flags(args) -> None:
    given = _given(args)
    if "prompt" in given and "prompt_file" in given:
        raise UsageError("--prompt and --prompt-file both give the prompt; keep one")
    if args.method != "tree" and "tree_shape" in given:
        raise UsageError(f"--tree-shape only applies to --method tree, not {args.method}; drop it or use --method tree")
    if args.method != "chain" and "gamma" in given:
        raise UsageError(f"--gamma only applies to --method chain, not {args.method}; drop it or use --method chain")
    if args.method == "ar" and "draft" in given:
        raise UsageError("--method ar uses no draft; drop --draft or use --method chain / tree")
    if args.temperature == 0 and ("top_k" in given or "top_p" in given):
        raise UsageError("--top-k / --top-p only apply when sampling; add --temperature > 0 (and a sampling --verify)")
    if args.temperature > 0 and args.verify == "greedy":
        raise UsageError(
            f"--temperature {args.temperature:g} samples, but --verify greedy is only lossless at temperature 0; "
            "use --verify target-sample, rrs or chain (chain with --method chain), or --temperature 0"
        )


def _nodes(method, shape, gamma) -> int:
    """Target positions one step can use beyond the committed tokens (root included)."""
    if method == "tree":
        return 1 + sum(shape)
    return 1 + (gamma if method == "chain" else 0)


def _check_fits(n_prompt, max_new: int, nodes: int, ctx: int, flag_nodes: str) -> None:
    """One step's tree, the prompt (when known) and the new tokens fit the model's context."""
    if nodes + max_new >= ctx:
        room = ctx - nodes - 1
        fix = f"use --max-new-tokens {room} or less, or a smaller tree" if room >= 1 else "use a smaller tree"
        raise UsageError(
            f"{flag_nodes} ({nodes} positions per step) and --max-new-tokens {max_new} do not fit the model's "
            f"context of {ctx}; {fix}"
        )
    if n_prompt is None:
        return
    if n_prompt >= ctx:
        raise UsageError(f"the prompt has {n_prompt} tokens, the model's context is {ctx}; shorten the prompt")
    if n_prompt + max_new > ctx:
        raise UsageError(
            f"--max-new-tokens {max_new}: the prompt ({n_prompt} tokens) + {max_new} new tokens exceed the model's "
            f"context of {ctx}; use --max-new-tokens {ctx - n_prompt} or less, or a shorter prompt"
        )


def cmd_generate(args) -> int:
    from longspec_lab.decoding.eager import BATCH_INVARIANT_ROWS, SpecDecoder

    _check_method_flags(args)
    text = _prompt_text(args)
    dev, model_dir, draft_dir, cfg = _prepare(args, need_draft=args.method != "ar")
    tok = _tokenizer(model_dir)
    ids = tok.encode(text)
    if not ids:
        raise UsageError("the prompt encodes to no tokens; give some text")
    flag = "--tree-shape" if args.method == "tree" else "--gamma"
    _check_fits(
        len(ids),
        args.max_new_tokens,
        _nodes(args.method, args.tree_shape, args.gamma),
        cfg.context_length,
        flag,
    )
    nodes = _nodes(args.method, args.tree_shape, args.gamma)
    if args.batch_invariant and nodes > BATCH_INVARIANT_ROWS:
        raise UsageError(
            f"--batch-invariant pads every pass to {BATCH_INVARIANT_ROWS} rows but this tree has {nodes} nodes; "
            f"use a --tree-shape of at most {BATCH_INVARIANT_ROWS} nodes, e.g. 4 16 16 16 16"
        )
    _seed(args.seed)
    target, draft = _load(model_dir, draft_dir, dev, args.dtype)
    dec = SpecDecoder(
        target, draft, backend=args.attention_backend, tokenizer=tok, batch_invariant=args.batch_invariant
    )
    with _Progress(target, args.method, args.quiet):
        shape_kw = {"tree": {"tree_shape": args.tree_shape}, "chain": {"gamma": args.gamma}}.get(args.method, {})
        res = dec.generate(
            ids,
            method=args.method,
            max_new_tokens=args.max_new_tokens,
            **shape_kw,
            verify=args.verify,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        )
    out_text = tok.decode(res.new_tokens)
    if args.json:
        obj = res.summary()
        obj.update(
            model_path=str(model_dir.resolve()),
            draft_path=str(draft_dir.resolve()) if draft_dir is not None else None,
            text=out_text,
            prompt_tokens=len(ids),
            attention_backend=dec.backend,
            device=str(target.device),
            dtype=str(target.dtype).replace("torch.", ""),
            seed=args.seed,
        )
        print(json.dumps(obj))
    else:
        print(out_text)
        if not args.quiet:
            print(
                f"\n[{args.method}, verify {args.verify}, temperature {args.temperature:g}] "
                f"{len(res.new_tokens)} tokens, tau {res.tau:.2f}, "
                f"{res.tokens_per_s:.1f} tokens/s, {res.target_calls} target calls",
                file=sys.stderr,
            )
    return 0


# ----------------------------------------------------------------------------- demo


def cmd_demo(args) -> int:
    from longspec_lab.decoding.eager import SpecDecoder
    from longspec_lab.paths import load_prompts

    dev, model_dir, draft_dir, cfg = _prepare(args, need_draft=True)
    tok = _tokenizer(model_dir)
    ctx, nodes = cfg.context_length, _nodes("tree", args.tree_shape, 0)
    if nodes >= ctx:
        _check_fits(None, 0, nodes, ctx, "--tree-shape")
    prompts = [dict(p, ids=tok.encode(p["text"])) for p in load_prompts(min_tokens=1000)]
    room = ctx - args.max_new_tokens - nodes
    fits = [p for p in prompts if len(p["ids"]) <= room]
    if not fits:
        shortest = min(len(p["ids"]) for p in prompts)
        most = ctx - shortest - nodes
        fix = f"use --max-new-tokens {most} or less" if most >= 1 else "use a model with a longer context"
        raise UsageError(
            f"--max-new-tokens {args.max_new_tokens} leaves no room in the model's {ctx}-token context for a "
            f"held-out prompt (the shortest has {shortest} tokens); {fix}"
        )
    prompt = max(fits, key=lambda p: len(p["ids"]))
    ids = prompt["ids"]
    _seed(args.seed)
    target, draft = _load(model_dir, draft_dir, dev, args.dtype)
    dec = SpecDecoder(target, draft, backend=args.attention_backend, tokenizer=tok)
    print(
        f"prompt: {prompt['name']} ({len(ids)} tokens, held out from training)\n"
        f"device {target.device}, dtype {str(target.dtype).replace('torch.', '')}, "
        f"attention backend {dec.backend}\n"
    )
    rows = []
    dec.generate(ids[:64], method="tree", max_new_tokens=8)  # warm-up
    for method, kw in [("ar", {}), ("chain", {"gamma": 4}), ("tree", {"tree_shape": args.tree_shape})]:
        with _Progress(target, method, args.quiet):
            res = dec.generate(ids, method=method, max_new_tokens=args.max_new_tokens, **kw)
        rows.append((method, res))
    base = rows[0][1].new_tokens
    print(tok.decode(rows[-1][1].new_tokens))
    print("\n" + "-" * 72)
    print(f"{'method':<28}{'tau':>7}{'tokens/s':>11}{'speedup':>9}{'target calls':>14}{'same as ar':>12}")
    ar_tps = rows[0][1].tokens_per_s
    for method, res in rows:
        label = {"ar": "ar", "chain": "chain (gamma 4)", "tree": f"tree {list(args.tree_shape)}"}[method]
        print(
            f"{label:<28}{res.tau:>7.2f}{res.tokens_per_s:>11.1f}{res.tokens_per_s / ar_tps:>8.2f}x"
            f"{res.target_calls:>14}{str(res.new_tokens == base):>12}"
        )
    print("\n".join(_demo_reading(rows, str(target.device))))
    return 0


def _step_cost(res) -> float:
    """Seconds per decoding step (a target call after the prefill) of one generate() result."""
    return (res.wall_seconds - res.stage_seconds.get("prefill", 0.0)) / max(res.target_calls - 1, 1)


def _demo_reading(rows, device: str) -> list[str]:
    """The demo table read from its own numbers: a method's speedup is its tau over the cost of one of its steps in
    AR steps; and, for comparison, the recorded GPU run's figures for the same tree, when the file is there."""
    ar = _step_cost(rows[0][1])
    lines = ["", "speedup ~ tau / (one step's cost in AR steps), the prefill aside:"]
    for method, res in rows[1:]:
        cost = _step_cost(res) / ar
        lines.append(f"  {method}: {res.tau:.2f} / {cost:.2f} = {res.tau / cost:.2f}x")
    tree = rows[-1][1]
    lines.append(
        f"On {device} a tree step drafts {len(tree.tree_shape or [])} levels and verifies every node in one target\n"
        "pass, and that pass costs the more, the more rows it has."
    )
    from longspec_lab.paths import RESULTS_DIR

    record = RESULTS_DIR / "e2e_h200.json"
    try:
        gpu = json.loads(record.read_text())["results"]
        name = "tree-" + "-".join(map(str, tree.tree_shape or []))
        r = gpu[name]
        step = r["tau"] / r["speedup_vs_ar"]  # AR steps one of its steps costs, from the recorded tokens/s
        lines.append(
            f"On an H200 (recorded: data/results/{record.name}) the same tree's step costs {step:.2f} AR steps\n"
            f"for tau {r['tau']:.2f}: {r['speedup_vs_ar']:.2f}x. docs/RESULTS.md says why, stage by stage."
        )
    except (OSError, KeyError, ValueError, TypeError):
        pass  # no record for this shape: the CPU reading stands alone
    return lines


# ----------------------------------------------------------------------------- bench / tune


def _check_plot(args) -> None:
    if args.plot is None:
        return
    p = _check_out_file(args.plot, "--plot", args.overwrite)
    suffix = p.suffix.lower()
    if suffix not in FIGURE_TYPES:
        raise UsageError(
            f"--plot {p}: unknown figure type {suffix or '(none)'!r}; name the file .html, .png, .svg or .pdf"
        )
    import importlib.util

    if suffix != ".html" and importlib.util.find_spec("kaleido") is None:
        raise UsageError(
            f"--plot {p}: writing {suffix} needs the kaleido package, which is not installed; install kaleido, "
            f"or write an interactive figure with --plot {p.with_suffix('.html')}"
        )


def cmd_bench(args) -> int:
    from longspec_lab.bench import e2e

    if args.from_report is not None:  # a recorded run, printed (and plotted) again: nothing runs, no model loads
        if args.out is not None:
            raise UsageError(f"--from-report reads {args.from_report}; it writes no report, so drop --out")
        unused = sorted(_given(args) - {"from_report", "plot", "overwrite", "quiet", "debug", "out"})
        if unused:
            flags = ", ".join("--" + {"tree_shapes": "tree_shape"}.get(d, d).replace("_", "-") for d in unused)
            raise UsageError(
                f"--from-report prints a recorded run and runs nothing, so {flags} would go unused; drop it"
            )
        _check_plot(args)
        try:
            rep = e2e.load_report(args.from_report)
        except ValueError as e:
            raise UsageError(str(e))
        e2e.print_report(rep, args.plot)
        return 0
    if args.out is not None:
        _check_out_file(args.out, "--out", args.overwrite)
        if args.plot is not None and Path(args.plot).absolute() == Path(args.out).absolute():
            raise UsageError(
                f"--out and --plot are both {args.out}; the figure would replace the report: give two names"
            )
    _check_plot(args)
    args.tree_shapes = args.tree_shapes or [list(s) for s in e2e.DEFAULT_SHAPES]
    if args.eager and args.compile:
        raise UsageError("--compile applies to the graph path, but --eager runs the eager loop; drop one of them")
    dev, _, _, cfg = _prepare(args, need_draft=True)
    if args.profile and not str(dev).startswith("cuda"):
        raise UsageError("--profile counts GPU kernels and needs a CUDA device; use --device cuda or drop --profile")
    ctx = cfg.context_length
    for s in args.tree_shapes:
        _check_fits(None, args.max_new_tokens, 1 + sum(s), ctx, f"--tree-shape {' '.join(map(str, s))}")
    if getattr(args, "batch_invariant", False):  # before any method runs: generate checks the same up front
        from longspec_lab.decoding.eager import BATCH_INVARIANT_ROWS

        wide = [s for s in args.tree_shapes if 1 + sum(s) > BATCH_INVARIANT_ROWS]
        if wide:
            raise UsageError(
                f"--batch-invariant pads every pass to {BATCH_INVARIANT_ROWS} rows but --tree-shape "
                f"{' '.join(map(str, wide[0]))} has {1 + sum(wide[0])} nodes; use trees of at most "
                f"{BATCH_INVARIANT_ROWS} nodes, e.g. 4 16 16 16 16"
            )
    for g in args.gammas:
        _check_fits(None, args.max_new_tokens, 1 + g, ctx, f"--gammas {g}")
    return e2e.run_cli(args)


def cmd_tune(args) -> int:
    from longspec_lab.bench import tune
    from longspec_lab.spec.tree import MAX_TREE_DEPTH, MAX_TREE_NODES

    if args.max_nodes > MAX_TREE_NODES:
        raise UsageError(f"--max-nodes {args.max_nodes} is above the tree cap of {MAX_TREE_NODES}; use at most that")
    if "shortlist" in _given(args) and not args.every_position:
        raise UsageError("--shortlist sets how many shapes --every-position rescores; add --every-position or drop it")
    if args.max_depth > min(len(args.probe_shape), MAX_TREE_DEPTH):
        raise UsageError(
            f"--max-depth {args.max_depth} is deeper than --probe-shape ({len(args.probe_shape)} levels), which "
            f"records acceptance only that deep; use --max-depth {len(args.probe_shape)} or a deeper --probe-shape"
        )
    try:  # before any model is loaded or any GPU time spent: the search's size is known from the arguments
        tune.check_search_size(args.max_depth, args.max_nodes, args.probe_shape)
    except ValueError as e:
        raise UsageError(str(e))
    from longspec_lab.paths import load_prompts

    if not load_prompts(min_tokens=args.min_prompt_tokens):
        longest = max(p["n_tokens"] for p in load_prompts())
        raise UsageError(
            f"no held-out prompt has --min-prompt-tokens {args.min_prompt_tokens} tokens (the longest has {longest}); "
            "lower it"
        )
    if args.out is not None:
        _check_out_file(args.out, "--out", args.overwrite)
    if args.latency_from is not None:
        try:
            tune.recorded_step_times(json.loads(Path(args.latency_from).read_text()))
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as e:
            raise UsageError(f"--latency-from {args.latency_from}: {e}; pass a report written by `longspec-lab bench`")
    _, _, _, cfg = _prepare(args, need_draft=True)
    ctx = cfg.context_length
    _check_fits(args.prompt_tokens, args.max_new_tokens, 1 + sum(args.probe_shape), ctx, "--probe-shape")
    _check_fits(args.prompt_tokens, args.max_new_tokens, args.max_nodes, ctx, "--max-nodes")
    return tune.run_cli(args)


# ----------------------------------------------------------------------------- training


def _smoke_conflicts(args, fixed) -> None:
    if not args.smoke:
        return
    clash = [f"--{d.replace('_', '-')}" for d in fixed if d in _given(args)]
    if clash:
        raise UsageError(
            f"--smoke sets {', '.join(clash)} itself; drop {'them' if len(clash) > 1 else 'it'}, or drop --smoke "
            "for a full run"
        )


def _check_train_out(args) -> None:
    from longspec_lab.train.output import check_out_dir

    if args.out is not None:
        check_out_dir(args.out, args.overwrite)
    elif args.overwrite:
        raise UsageError("--overwrite needs --out (without --out the run writes to a fresh folder); add --out DIR")


# flags that --smoke fixes itself (train.draft.SMOKE and train.target.SMOKE; a test keeps them equal)
DRAFT_SMOKE_FLAGS = ("steps", "batch_size", "seq_len", "warmup", "device", "dtype", "eval_every", "eval_windows")
TARGET_SMOKE_FLAGS = ("steps", "batch_size", "seq_len", "lr", "warmup", "eval_every", "device", "dtype")


def cmd_train_draft(args) -> int:
    _smoke_conflicts(args, DRAFT_SMOKE_FLAGS)
    _check_train_out(args)
    for name, flag in (("tokens", "--tokens"), ("text", "--text")):
        v = getattr(args, name)
        if v is not None and not Path(v).exists():
            what = "a folder with train.u16 / heldout.u16" if name == "tokens" else "a folder of text files or a JSONL"
            raise UsageError(f"{flag} {v} does not exist; give {what}")
    if not args.smoke and args.tokens is None and args.text is None:
        raise UsageError(
            "no training data; give --text DIR_OR_JSONL (your own text, tokenized with the target's tokenizer) or "
            "--tokens DIR (from `python -m longspec_lab.train.corpus --tokenize --out DIR`)"
        )
    for name in ("steps", "batch_size", "seq_len", "warmup", "eval_every", "eval_windows"):
        if getattr(args, name) is None:
            setattr(args, name, DRAFT_DEFAULTS[name])
    if args.model is not None:
        cfg = check_model_dir(args.model)
        if args.seq_len > cfg.max_position_embeddings:
            raise UsageError(
                f"--seq-len {args.seq_len} exceeds the model's context of {cfg.max_position_embeddings}; "
                f"use --seq-len {cfg.max_position_embeddings} or less"
            )
        has_tok = any((Path(args.model) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        if args.text is not None and not has_tok:
            raise UsageError(
                f"--text needs the target's tokenizer, but --model {args.model} has no tokenizer.json or "
                "tokenizer_config.json; copy the tokenizer files next to the weights"
            )
    _check_device(args)
    from longspec_lab.train import draft

    return draft.run_cli(args)


DRAFT_DEFAULTS = dict(steps=4000, batch_size=32, seq_len=1024, warmup=200, eval_every=1000, eval_windows=64)


def cmd_train_target(args) -> int:
    _smoke_conflicts(args, TARGET_SMOKE_FLAGS)
    if args.smoke and "preset" in _given(args):
        raise UsageError("--smoke trains the tiny preset itself; drop --preset, or drop --smoke for a full run")
    _check_train_out(args)
    if args.tokens is not None and not Path(args.tokens).is_dir():
        raise UsageError(f"--tokens {args.tokens} is not a folder; give the folder with train.u16 / heldout.u16")
    if args.tokenizer_dir is not None and not Path(args.tokenizer_dir).is_dir():
        raise UsageError(f"--tokenizer-dir {args.tokenizer_dir} is not a folder; give the folder with tokenizer.json")
    if not args.smoke and args.tokens is None:
        raise UsageError(
            "no training data; give --tokens DIR (make it with `python -m longspec_lab.train.corpus --tokenize "
            "--out DIR`), or --smoke for a short check"
        )
    from longspec_lab.train import target

    for k, v in target.DEFAULTS.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    _check_device(args)
    if args.device is None:
        args.device = "auto"
    if args.dtype is None:
        args.dtype = "bf16"
    return target.run_cli(args)


# ----------------------------------------------------------------------------- lab


def cmd_lab(args) -> int:
    import importlib.util
    import shutil
    import subprocess

    from longspec_lab.paths import check_output_path, notebooks_dir

    notebooks = sorted(notebooks_dir().glob("*.ipynb"))
    if not notebooks:
        raise UsageError(f"no notebooks in {notebooks_dir()}; reinstall longspec-lab (the notebooks ship with it)")
    if importlib.util.find_spec("jupyterlab") is None:
        raise UsageError("JupyterLab is not installed; install jupyterlab, then run `longspec-lab lab` again")
    dest = Path(args.dir)
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"{dest} is a file; give a folder for the notebooks")
    check_output_path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    copied, kept = [], []
    for nb in notebooks:
        target = dest / nb.name
        if target.exists():
            kept.append(nb.name)  # the user's copy, maybe edited: never replaced
        else:
            shutil.copyfile(nb, target)
            copied.append(nb.name)
    print(f"notebooks in {dest.resolve()}: copied {len(copied)}, kept {len(kept)} you already had", flush=True)
    cmd = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={dest.resolve()}"]
    if args.no_browser:
        cmd.append("--no-browser")
    if args.port is not None:
        cmd.append(f"--port={args.port}")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # JupyterLab refuses root (containers) without it
    try:
        return subprocess.run(cmd, cwd=dest).returncode
    except KeyboardInterrupt:
        return 0


# ----------------------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="longspec-lab", description=__doc__.split("\n\nTaught in")[0], formatter_class=_RawFormatter)
    p.add_argument("--version", action="version", version=f"longspec-lab {__version__}")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p.commands = sub.choices  # for errors that argparse reports at the top level

    def add(name, helptext, description):
        s = sub.add_parser(name, help=helptext, description=description)
        return s

    # generate ------------------------------------------------------------------
    g = add(
        "generate",
        "generate with ar, chain or tree speculative decoding",
        "Generate with the target alone (ar) or with draft + verification (chain, tree). Greedy outputs are "
        "identical for every method. Prints the text (the run summary goes to stderr), or one JSON object.",
    )
    _add_model_args(g)
    g.add_argument("--prompt", default=None, help="prompt text (default: a held-out long code prompt)")
    g.add_argument("--prompt-file", default=None, metavar="FILE", help="read the prompt from a UTF-8 text file")
    g.add_argument(
        "--method",
        default="tree",
        choices=["ar", "chain", "tree"],
        help="ar = the target alone; chain = the draft proposes --gamma tokens in a row; "
        "tree = a beam tree of --tree-shape",
    )
    _add_shape(g, "widths of the draft tree levels, e.g. 4 16 16 16 16 (69 nodes with the root)", DEFAULT_SHAPE)
    g.add_argument("--gamma", type=_int_range(1, 64), default=4, help="chain length for --method chain")
    _add_max_new(g, 128)
    g.add_argument(
        "--verify",
        default="greedy",
        choices=VERIFY_CHOICES,
        help="acceptance rule: greedy (temperature 0); lossless sampling: target-sample (any tree), rrs (sampled "
        "tree), chain (sampled chain, --method chain); naive-topk is BIASED, for comparison only",
    )
    g.add_argument("--temperature", type=_float_range(0, 100), default=0.0, help="sampling temperature, 0 = greedy")
    g.add_argument("--top-k", type=_int_range(1), default=None, help="keep the k likeliest tokens when sampling")
    g.add_argument("--top-p", type=_float_range(0, 1, lo_open=True), default=None, help="nucleus mass in (0, 1]")
    g.add_argument(
        "--batch-invariant",
        action="store_true",
        help="pad every target pass to 128 rows and sum each row's attention keys in one fixed order, so a token's "
        "logits do not depend on the pass that computed them (ar, chain and tree then agree in bf16 too; trees of "
        "at most 128 nodes; slower)",
    )
    g.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    _add_common(g, "no progress line and no summary on stderr")
    g.set_defaults(func=cmd_generate)

    # demo ----------------------------------------------------------------------
    d = add(
        "demo",
        "ar, chain and tree side by side on a held-out long prompt",
        "Run ar, chain (gamma 4) and tree decoding on the longest held-out prompt that fits, and print tau and "
        "tokens/s side by side.",
    )
    _add_model_args(d)
    _add_shape(d, "tree widths for the tree row", DEFAULT_SHAPE)
    _add_max_new(d, 128)
    _add_common(d, "no progress lines")
    d.set_defaults(func=cmd_demo)

    # bench ---------------------------------------------------------------------
    b = add(
        "bench",
        "end-to-end tokens/s against transformers generate (writes JSON)",
        "End-to-end greedy decoding on held-out prompts: our ar / chain / tree loops against transformers "
        "generate (with and without prompt lookup) on the same weights; tokens/s, tau and speed-ups.",
    )
    _add_model_args(b)
    b.add_argument("--num-prompts", type=_int_range(1, 1000), default=4, help="held-out prompts to run")
    b.add_argument("--min-prompt-tokens", type=_int_range(1), default=2000, help="shortest prompt used")
    _add_max_new(b, 256)
    _add_shape(
        b,
        "a tree shape to run; repeat the flag for several (default: 4 16 16 16 16, 4 8 8 8, 2 4 8 8 8 8, 8 16 32)",
        many=True,
        dest="tree_shapes",
    )
    b.add_argument(
        "--shapes",
        dest="tree_shapes",
        action=_Deprecated,
        new="--tree-shape (once per shape)",
        convert=_old_shapes,
        help=argparse.SUPPRESS,
    )
    b.add_argument("--gammas", action=_IntList, lo=1, hi=64, default=[4, 5], metavar="G", help="chain lengths")
    b.add_argument(
        "--extra-backends",
        nargs="+",
        choices=BACKENDS,
        default=[],
        metavar="B",
        help="also run the first tree shape with these attention backends",
    )
    b.add_argument("--eager", action="store_true", help="use the eager loop even on CUDA")
    b.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile every stage before capturing it (default: on with CUDA; its time is reported "
        "separately as compile_seconds, never inside a timed run)",
    )
    b.add_argument(
        "--batch-invariant",
        action="store_true",
        help="batch-invariant passes: 128 rows each, attention keys in one fixed order (ar, chain and tree then "
        "agree in bf16 too); run it beside a "
        "default run to see its cost",
    )
    b.add_argument(
        "--profile",
        action="store_true",
        help="also count, per stage, the GPU kernels one call launches and their time, eager against compiled "
        "against replayed (needs CUDA; stored under 'profile' in the report)",
    )
    b.add_argument("--no-hf", action="store_true", help="skip the transformers baselines")
    b.add_argument(
        "--plot",
        default=None,
        metavar="FILE",
        help="also write a tokens/s + tau figure: .html, or .png/.svg/.pdf (needs kaleido)",
    )
    b.add_argument("--out", default=None, metavar="FILE", help="write the JSON report here")
    b.add_argument(
        "--from-report",
        default=None,
        metavar="FILE",
        help="print a recorded report instead of running (e.g. data/results/e2e_h100.json): its table, each tree "
        "against the chain of its depth, and --plot; no model is loaded and no GPU is needed",
    )
    b.add_argument("--overwrite", action="store_true", help="replace an existing --out / --plot file")
    _add_common(b)
    b.set_defaults(func=cmd_bench)

    # tune ----------------------------------------------------------------------
    t = add(
        "tune",
        "search tree shapes for the most tokens/s on this device",
        "Record where the target's greedy path runs through a wide probe tree, fit the step time against the "
        "tree size, score every shape on a width grid, and run the best few for real.",
    )
    _add_model_args(t, backend=False)
    t.add_argument("--num-prompts", type=_int_range(1, 1000), default=3, help="held-out prompts")
    t.add_argument("--prompt-tokens", type=_int_range(16), default=2000, help="prompt length (tokens)")
    t.add_argument("--min-prompt-tokens", type=_int_range(1), default=1000,
                   help="held-out prompts of at least this many tokens, shortest first (`bench` takes 2000: "
                        "--min-prompt-tokens 2000 --prompt-tokens 3000 --num-prompts 4 tunes on the prompts `bench` "
                        "times, whose acceptance differs)")  # fmt: skip
    _add_max_new(t, 64, old="--new-tokens")
    _add_shape(
        t,
        "the wide tree whose acceptance is recorded",
        [16, 32, 32, 32, 32, 32, 32],
        dest="probe_shape",
        flag="--probe-shape",
    )
    t.add_argument("--max-depth", type=_int_range(1, 64), default=6,
                   help="deepest shape searched: every grid shape up to it is scored (0.9M at 6 and 8.9M at 7 with "
                        "the defaults; a search above 10M shapes is refused before anything runs)")  # fmt: skip
    t.add_argument("--max-nodes", type=_int_range(2), default=160, help="largest shape searched (nodes, root included)")
    t.add_argument("--top", type=_int_range(1, 100), default=5, help="candidates validated by running them")
    t.add_argument(
        "--every-position", action="store_true",
        help="rescore the best --shortlist shapes (and every chain, and the default) by the exact acceptance: a probe "
        "tree at every position of each prompt's continuation and the decoder's own walk over them (one prefill "
        "and probe step per position: several times slower, and on the CPU in float32 equal to the measured tau), "
        "then hill-climb from the best few under it",
    )  # fmt: skip
    t.add_argument("--shortlist", type=_int_range(1, 100000), default=2000,
                   help="with --every-position: how many of the rank model's best shapes to rescore")  # fmt: skip
    t.add_argument(
        "--latency-from", default=None, metavar="REPORT",
        help="fit the step-time model to a recorded bench report (e.g. data/results/e2e_h200.json) instead of "
        "timing calibration shapes here; the top shapes are then predictions for that device, not run",
    )  # fmt: skip
    t.add_argument("--out", default=None, metavar="FILE", help="write the JSON report here")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    _add_common(t)
    t.set_defaults(func=cmd_tune)

    # train-target --------------------------------------------------------------
    tt = add(
        "train-target",
        "train a small Llama target like the embedded one (GPU recommended)",
        "Train a small Llama on pre-tokenized code and save a Hugging Face folder (the best held-out "
        "checkpoint). --out must be new or empty unless --overwrite; it is replaced only once the new "
        "checkpoint is complete and finite.",
    )
    from longspec_lab.models.config import PRESETS  # plain dataclasses, no torch

    _add_train_out(tt, "target")
    tt.add_argument(
        "--tokens",
        default=None,
        metavar="DIR",
        help="folder with train.u16 / heldout.u16 (`python -m longspec_lab.train.corpus --tokenize`)",
    )
    tt.add_argument("--tokens-dir", dest="tokens", action=_Deprecated, new="--tokens", help=argparse.SUPPRESS)
    tt.add_argument(
        "--tokenizer-dir",
        default=None,
        metavar="DIR",
        help="tokenizer copied into --out (default: the embedded tokenizer)",
    )
    tt.add_argument("--preset", default="embedded", choices=sorted(PRESETS), help="model shape")
    tt.add_argument("--steps", type=_int_range(1), default=None, help="optimizer steps (default: 800)")
    tt.add_argument("--batch-size", type=_int_range(1), default=None, help="windows per step (default: 16)")
    tt.add_argument("--seq-len", type=_int_range(2), default=None, help="training window (default: 4096)")
    tt.add_argument("--lr", type=_float_range(0, 10, lo_open=True), default=2e-3, help="peak learning rate")
    tt.add_argument("--min-lr-frac", type=_float_range(0, 1), default=0.1, help="final lr / peak lr")
    tt.add_argument("--warmup", type=_int_range(0), default=None, help="linear warm-up steps (default: 50)")
    tt.add_argument("--weight-decay", type=_float_range(0, 10), default=0.1, help="AdamW decay on matrices")
    tt.add_argument("--grad-clip", type=_float_range(0), default=1.0, help="gradient norm clip, 0 = off")
    tt.add_argument("--eval-every", type=_int_range(1), default=None, help="held-out eval period (default: 50)")
    tt.add_argument("--seed", type=_int_range(0, MAX_SEED), default=0, help="init and data-order seed")
    _add_device_args(tt, ("bf16", "float32"), "bf16 = autocast on CUDA (default: bf16)")
    tt.add_argument(
        "--smoke",
        action="store_true",
        help="20 CPU steps of the tiny preset on a few stdlib files (checks the pipeline on a fresh checkout)",
    )
    _add_common(tt, "no progress bar")
    tt.set_defaults(func=cmd_train_target)

    # train-draft ---------------------------------------------------------------
    td = add(
        "train-draft",
        "train a GliDe draft for a target, on token files or on your own text",
        "Train the one-layer GliDe draft (LongSpec section 2) against a frozen target: anchor-offset positions, "
        "CE + KD loss, staleness-aware cross-attention. --text reads a folder of text files or a JSONL and "
        "tokenizes it with the target's own tokenizer. Writes draft.safetensors, draft_config.json and "
        "train_log.json into --out (new or empty unless --overwrite; replaced only once complete and finite); "
        "`longspec-lab generate --model MODEL --draft OUT` then uses it.",
    )
    td.add_argument(
        "--model", default=None, metavar="DIR", help="the target's Hugging Face folder (default: the embedded model)"
    )
    td.add_argument("--target", dest="model", action=_Deprecated, new="--model", help=argparse.SUPPRESS)
    _add_train_out(td, "draft")
    data = td.add_mutually_exclusive_group()
    data.add_argument(
        "--text",
        default=None,
        metavar="DIR_OR_JSONL",
        help='your own text: a folder of text files, or a .jsonl with a "text" field per line',
    )
    data.add_argument(
        "--tokens",
        default=None,
        metavar="DIR",
        help="token files train.u16 / heldout.u16 in the "
        "target's vocabulary (`python -m longspec_lab.train.corpus --tokenize`)",
    )
    td.add_argument("--steps", type=_int_range(1), default=None, help="optimizer steps (default: 4000)")
    td.add_argument("--batch-size", type=_int_range(1), default=None, help="sequences per step (default: 32)")
    td.add_argument("--seq-len", type=_int_range(2), default=None, help="tokens per sequence (default: 1024)")
    td.add_argument("--lr", type=_float_range(0, 10, lo_open=True), default=2e-3, help="peak AdamW learning rate")
    td.add_argument("--warmup", type=_int_range(0), default=None, help="linear warm-up steps (default: 200)")
    td.add_argument("--weight-decay", type=_float_range(0, 10), default=0.0, help="AdamW weight decay")
    td.add_argument("--kd-weight", type=_float_range(0, 1e6), default=1.0, help="weight of KL(target || draft)")
    td.add_argument("--window", type=_int_range(1), default=512, help="draft self-attention window W")
    td.add_argument(
        "--max-staleness",
        type=_int_range(0, 64),
        default=4,
        help="the draft's view of the target cache is 0..this many tokens stale",
    )
    td.add_argument("--max-sinks", type=_int_range(0), default=4, help="anchor positions kept unshifted: 0..this")
    td.add_argument(
        "--eval-every",
        type=_int_range(0),
        default=None,
        help="held-out eval period, 0 = only at the end (default: 1000)",
    )
    td.add_argument(
        "--eval-windows", type=_int_range(1), default=None, help="held-out windows per evaluation (default: 64)"
    )
    td.add_argument(
        "--max-seconds",
        type=_float_range(0, lo_open=True),
        default=None,
        help="stop early (and still evaluate and save) after this much wall time",
    )
    td.add_argument("--seed", type=_int_range(0, MAX_SEED), default=0, help="data order, positions, init")
    _add_device_args(td, DTYPES, "the target's dtype (default: bf16 on GPU, float32 on CPU)")
    td.add_argument(
        "--smoke",
        action="store_true",
        help="20 CPU steps of 2 x 64 tokens to check the pipeline "
        "(the embedded target and a few stdlib files unless --model / --text / --tokens)",
    )
    _add_common(td, "no progress bars")
    td.add_argument(
        "--no-progress", dest="quiet", action=_Deprecated, new="--quiet", nargs=0, const=True, help=argparse.SUPPRESS
    )
    td.set_defaults(func=cmd_train_draft)

    # lab -----------------------------------------------------------------------
    lab = add(
        "lab",
        "copy the notebooks into a folder and open JupyterLab there",
        "Copy the notebooks into DIR (notebooks already there, maybe edited by you, are never replaced) and "
        "start JupyterLab on that folder.",
    )
    lab.add_argument(
        "dir",
        nargs="?",
        default="longspec-lab-notebooks",
        metavar="DIR",
        help="working folder (default: ./longspec-lab-notebooks)",
    )
    lab.add_argument("--no-browser", action="store_true", help="print the URL instead of opening a browser")
    lab.add_argument("--port", type=_int_range(1, 65535), default=None, help="port (default: JupyterLab's)")
    lab.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    lab.set_defaults(func=cmd_lab)
    return p


def _add_train_out(p, what):
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help=f"folder for the {what}; must be new or empty unless "
        f"--overwrite (default: a fresh ./{what}-DATE-TIME folder)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a checkpoint already in --out (only once the new one is complete)",
    )


# ----------------------------------------------------------------------------- the one error path


def _expected(e: BaseException) -> bool:
    if isinstance(e, (ValueError, OSError, ImportError)):
        return True
    if type(e).__name__ == "SafetensorError":
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename:
        return f"{e.filename}: {e.strerror}; check the path and its permissions"
    if isinstance(e, ImportError):
        return f"{e}; install the missing package"
    if type(e).__name__ == "SafetensorError":
        return f"a safetensors file could not be read ({e}); the checkpoint is corrupt, copy it again"
    if isinstance(e, RuntimeError):
        return f"{e}; use a smaller --max-new-tokens / tree, or --device cpu"
    msg = _as_flags(str(e).strip() or type(e).__name__)
    return msg if ";" in msg else f"{msg}; run again with --debug for the details"


# the library's argument names that are this command line's flags: its messages are shown in the flags' spelling
_FLAG_NAMES = ("method", "verify", "gamma", "temperature", "top_k", "top_p", "tree_shape", "max_new_tokens", "seed")
_PY_ARG = re.compile(r"\b(" + "|".join(_FLAG_NAMES) + r"|attention_backend)=('([^']*)'|[\w.+-]+)")


def _as_flags(msg: str) -> str:
    """A library message with its Python spellings (method='chain', top_k=5) written as flags (--method chain)."""

    def flag(m):
        name = "attention-backend" if m.group(1) == "attention_backend" else m.group(1).replace("_", "-")
        value = m.group(3) if m.group(3) is not None else m.group(2)
        return f"--{name} {value}"

    return _PY_ARG.sub(flag, msg)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # name the subcommand whose --help lists the flags
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    args.command_line = "longspec-lab " + shlex.join(argv)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # the reader went away (`| head`): nothing to report
        try:
            sys.stdout = open(os.devnull, "w")  # so that the interpreter's final flush does not raise again
        except OSError:
            pass
        return 0
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            raise
        print("error: interrupted; no partial checkpoint or result was kept", file=sys.stderr)
        return 130
    except Exception as e:
        if getattr(args, "debug", False) or not _expected(e):
            raise
        print(f"error: {_message(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
