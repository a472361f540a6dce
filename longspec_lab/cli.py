"""`longspec-lab`: the command line.

    longspec-lab generate   greedy generation (ar / chain / tree) with the embedded or a local HF model
    longspec-lab demo       ar, chain and tree side by side on a held-out long code prompt
    longspec-lab bench      end-to-end tokens/s against transformers (greedy, prompt lookup)
    longspec-lab tune       search tree shapes for the most tokens/s on this device
    longspec-lab train-target / train-draft   train the embedded pair (GPU recommended)
Every subcommand explains itself with --help.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_SHAPE = [4, 16, 16, 16, 16]


def _add_model_args(p):
    p.add_argument(
        "--model",
        metavar="DIR",
        default=None,
        help="local HF checkpoint folder (config.json + *.safetensors); default: the embedded model in data/embedded",
    )
    p.add_argument(
        "--draft",
        metavar="DIR",
        default=None,
        help="GliDe draft folder (draft.safetensors + draft_config.json); "
        "default: data/embedded-draft for the embedded model",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bf16", "fp16"],
        help="weights and cache dtype (default: float32 on CPU, bf16 on GPU)",
    )
    p.add_argument(
        "--attention-backend",
        default=None,
        choices=["torch", "sdpa", "triton"],
        help="attention implementation (default: triton on CUDA, torch on CPU)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def _add_decode_args(p, default_method="tree"):
    p.add_argument(
        "--method",
        default=default_method,
        choices=["ar", "chain", "tree"],
        help=f"ar = plain greedy decoding; chain = draft proposes --gamma tokens in a row; "
        f"tree = beam tree of --tree-shape (default: {default_method})",
    )
    p.add_argument(
        "--tree-shape",
        nargs="+",
        type=int,
        default=DEFAULT_SHAPE,
        metavar="W",
        help="widths of the draft tree levels (default: 4 16 16 16 16 = 69 nodes with the root)",
    )
    p.add_argument("--gamma", type=int, default=4, help="chain length for --method chain (default: 4)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default: 128)")
    _add_sampling_args(p)


VERIFY_CHOICES = ("greedy", "target-sample", "rrs", "chain", "naive-topk")  # = verify.VERIFY_RULES


def _add_sampling_args(p):
    p.add_argument(
        "--verify",
        default="greedy",
        choices=VERIFY_CHOICES,
        help="acceptance rule: greedy (temperature 0, default); lossless sampling: target-sample "
        "(any tree), rrs (sampled tree, recursive rejection sampling), chain (sampled chain, "
        "--method chain); naive-topk = min(1,p/q) on beam siblings, BIASED, for comparison only",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature, >= 0 (default: 0 = greedy); > 0 needs a sampling --verify rule",
    )
    p.add_argument("--top-k", type=int, default=None, help="keep the k likeliest tokens (default: off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (default: off)")


def _seed(seed):
    import torch

    torch.manual_seed(seed)


def _prompt_text(args) -> str:
    if args.prompt is not None and args.prompt_file is not None:
        raise SystemExit("error: give --prompt or --prompt-file, not both")
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise SystemExit(f"error: prompt file {path} does not exist")
        return path.read_text()
    if args.prompt is not None:
        return args.prompt
    from longspec_lab.paths import load_prompts

    return load_prompts(min_tokens=1000)[0]["text"]


def cmd_generate(args) -> int:
    from longspec_lab.decoding.eager import SpecDecoder
    from longspec_lab.models.pair import load_pair
    from longspec_lab.paths import EMBEDDED_TARGET

    _seed(args.seed)
    text = _prompt_text(args)
    target, draft, tok = load_pair(args.model, args.draft, args.device, args.dtype, need_draft=args.method != "ar")
    ids = tok.encode(text)
    dec = SpecDecoder(target, draft, backend=args.attention_backend, tokenizer=tok)
    res = dec.generate(
        ids,
        method=args.method,
        max_new_tokens=args.max_new_tokens,
        tree_shape=args.tree_shape,
        gamma=args.gamma,
        verify=args.verify,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    out_text = tok.decode(res.new_tokens)
    model_path = str(Path(args.model).resolve() if args.model else EMBEDDED_TARGET.resolve())
    if args.json:
        obj = res.summary()
        obj.update(
            model_path=model_path,
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
        print(
            f"\n[{args.method}, verify {args.verify}, temperature {args.temperature:g}] "
            f"{len(res.new_tokens)} tokens, tau {res.tau:.2f}, "
            f"{res.tokens_per_s:.1f} tokens/s, {res.target_calls} target calls",
            file=sys.stderr,
        )
    return 0


def cmd_demo(args) -> int:
    from longspec_lab.decoding.eager import SpecDecoder
    from longspec_lab.models.pair import load_pair
    from longspec_lab.paths import load_prompts

    _seed(args.seed)
    target, draft, tok = load_pair(args.model, args.draft, args.device, args.dtype)
    room = target.config.max_position_embeddings - args.max_new_tokens
    prompts = [p for p in load_prompts(min_tokens=1000) if p["n_tokens"] <= room]
    prompt = max(prompts, key=lambda p: p["n_tokens"])
    ids = tok.encode(prompt["text"])
    dec = SpecDecoder(target, draft, backend=args.attention_backend, tokenizer=tok)
    print(
        f"prompt: {prompt['name']} ({len(ids)} tokens, held out from training)\n"
        f"device {target.device}, dtype {str(target.dtype).replace('torch.', '')}, "
        f"attention backend {dec.backend}\n"
    )
    rows = []
    dec.generate(ids[:64], method="tree", max_new_tokens=8)  # warm-up
    for method, kw in [("ar", {}), ("chain", {"gamma": 4}), ("tree", {"tree_shape": args.tree_shape})]:
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
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="longspec-lab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser(
        "generate",
        help="generate text greedily (ar, chain or tree speculative decoding)",
        description="Generate with the target alone (ar) or with draft + verification "
        "(chain, tree). Greedy outputs are identical for every method.",
    )
    _add_model_args(g)
    g.add_argument("--prompt", default=None, help="prompt text (default: a held-out long code prompt)")
    g.add_argument("--prompt-file", default=None, metavar="FILE", help="read the prompt from a file")
    _add_decode_args(g)
    g.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser(
        "demo",
        help="ar, chain and tree side by side on a held-out long prompt",
        description="Run ar, chain (gamma 4) and tree decoding on the longest held-out "
        "prompt that fits and print tau and tokens/s side by side.",
    )
    _add_model_args(d)
    d.add_argument(
        "--tree-shape",
        nargs="+",
        type=int,
        default=DEFAULT_SHAPE,
        metavar="W",
        help="tree widths (default: 4 16 16 16 16)",
    )
    d.add_argument("--max-new-tokens", type=int, default=128, help="tokens per method (default: 128)")
    d.set_defaults(func=cmd_demo)

    for name, module, helptext in [
        ("train-target", "train_target", "train the embedded target model (GPU recommended)"),
        ("train-draft", "train_draft", "train the GliDe draft against the frozen target (GPU recommended)"),
        ("bench", "bench", "end-to-end benchmark against transformers generate (writes JSON)"),
        ("tune", "tune", "search tree shapes for the most tokens/s on this device"),
    ]:
        s = sub.add_parser(name, help=helptext, add_help=False)
        s.set_defaults(func=None, module=module)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in ("train-target", "train-draft", "bench", "tune"):
        import importlib

        mod = importlib.import_module(f"longspec_lab.{argv[0].replace('-', '_')}")
        return mod.main(argv[1:]) or 0
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
