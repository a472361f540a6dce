"""End-to-end decoding benchmark: our loops against stock `transformers` on the same weights.

One run measures, on the same prompts and device:
  hf-greedy         transformers `generate(do_sample=False)`
  hf-prompt-lookup  the same with `prompt_lookup_num_tokens` (strong stock baseline for code)
  ar                our autoregressive loop
  chain-g<N>        our chain speculative decoding
  tree-<shape>      our tree speculative decoding
and reports tokens/s (decode phase, prefill excluded for ours; whole `generate` minus a measured
prefill for transformers), tau, speedups over our AR and over transformers, efficiency =
speedup / tau, and a per-stage breakdown. Every timed run is preceded by a warm-up run. Each tree is also set
against the chain of its own depth and the fastest chain (`tree_against_chains`): what its branches add to tau,
what they cost a step, and its speed were its step a chain's.

Taught in: notebooks/07_timing_real_gpu_runs.ipynb.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from longspec_lab.decoding.timing import drafted_shape, method_name, sync
from longspec_lab.provenance import environment

DEFAULT_SHAPES = ([4, 16, 16, 16, 16], [4, 8, 8, 8], [2, 4, 8, 8, 8, 8], [8, 16, 32])
# the stock peers a user would reach for: transformers' generate with its default dynamic cache, with a
# static cache (which transformers compiles on CUDA), and prompt-lookup decoding
HF_PEERS = (
    ("hf-greedy", {}),
    ("hf-static-compiled", {"cache_implementation": "static"}),
    ("hf-prompt-lookup", {"prompt_lookup_num_tokens": 10}),
)


def _hf_time(hf, ids, n, device, **kw):
    """Seconds for the decode phase of transformers.generate: total minus a 1-token generate."""
    x = torch.tensor([ids], device=device)
    common = dict(do_sample=False, eos_token_id=None, pad_token_id=0, **kw)
    with torch.inference_mode():
        hf.generate(x, max_new_tokens=n, **common)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        out = hf.generate(x, max_new_tokens=n, **common)
        sync(device)
        total = time.perf_counter() - t0
        t0 = time.perf_counter()
        hf.generate(x, max_new_tokens=1, **common)
        sync(device)
        first = time.perf_counter() - t0
    return max(total - first, 1e-9), out[0, len(ids) :].tolist()


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def run_bench(
    target,
    draft,
    prompts: list[list[int]],
    max_new_tokens=256,
    shapes=DEFAULT_SHAPES,
    gammas=(4,),
    hf_model=None,
    backend=None,
    progress=True,
    fast=None,
    extra_backends=(),
    compile=None,
    batch_invariant=False,
    on_prompt=None,
) -> dict:
    """Our loops: the CUDA-graph fast path on the GPU (`fast=None` -> on CUDA), else the eager loop.
    Per-stage times come from a second, separately timed run with per-stage CUDA events (or the
    eager loop's synchronised timers), so the tokens/s runs carry no timing overhead.
    on_prompt(report): called with the report so far after each prompt (long GPU jobs save as they go)."""
    from tqdm.auto import tqdm

    from longspec_lab.decoding.eager import SpecDecoder
    from longspec_lab.decoding.graphs import GraphDecoder

    fast = target.device.type == "cuda" if fast is None else fast
    make = (
        (lambda be, **kw: GraphDecoder(target, draft, backend=be, **kw))
        if fast
        else (lambda be, **kw: SpecDecoder(target, draft, backend=be, batch_invariant=kw.get("batch_invariant", False)))
    )
    opts = {"batch_invariant": batch_invariant} if batch_invariant else {}
    if fast and compile is not None:
        opts["compile"] = compile
    dec = make(backend, **opts)
    configs = [("ar", dict(method="ar"), dec)]
    configs += [(method_name("chain", gamma=g), dict(method="chain", gamma=g), dec) for g in gammas]
    configs += [(method_name("tree", shape=s), dict(method="tree", tree_shape=list(s)), dec) for s in shapes]
    for be in extra_backends:
        tree = dict(method="tree", tree_shape=list(shapes[0]))
        configs.append((method_name("tree", shape=shapes[0], backend=be), tree, make(be)))
    rows = {
        name: {
            "tokens": 0, "seconds": 0.0, "target_calls": 0, "stages": {}, "stage_seconds_total": 0.0,
            "depth": len(kw["tree_shape"]) if "tree_shape" in kw else kw.get("gamma", 0),
        }
        for name, kw, _ in configs
    }  # fmt: skip
    hf_rows = {}
    dec.generate(prompts[0][:128], method="tree", max_new_tokens=16)  # global warm-up
    bar = tqdm(
        total=len(prompts) * (len(configs) + (len(HF_PEERS) if hf_model is not None else 0)),
        disable=not progress,
        desc="bench",
    )
    agree, same_prefix = True, []
    for ids in prompts:
        ref = None
        for name, kw, d in configs:
            d.generate(ids, max_new_tokens=min(32, max_new_tokens), stop_at_eos=False, **kw)  # warm-up
            res = d.generate(ids, max_new_tokens=max_new_tokens, stop_at_eos=False, **kw)
            ref = res.new_tokens if ref is None else ref
            agree &= res.new_tokens == ref
            same_prefix.append(_common_prefix(res.new_tokens, ref))
            r = rows[name]
            r.setdefault("sha", hashlib.sha256()).update(repr(res.new_tokens).encode())
            r["tokens"] += len(res.new_tokens) - 1
            r["seconds"] += res.decode_seconds
            r["target_calls"] += res.target_calls - 1
            st = res
            if fast and d is dec:  # a separate run with CUDA events around every stage replay
                dec.stage_timing = True
                st = dec.generate(ids, max_new_tokens=max_new_tokens, stop_at_eos=False, **kw)
                dec.stage_timing = False
            for k, v in st.stage_seconds.items():
                if k in ("draft", "verify", "commit"):
                    r["stages"][k] = r["stages"].get(k, 0.0) + v
            r["stage_seconds_total"] += st.decode_seconds
            bar.update()
        if hf_model is not None:
            for name, kw in HF_PEERS:
                secs, toks = _hf_time(hf_model, ids, max_new_tokens, target.device, **kw)
                agree &= toks == ref
                h = hf_rows.setdefault(name, {"tokens": 0, "seconds": 0.0})
                h["tokens"] += len(toks) - 1
                h["seconds"] += secs
                bar.update()
        if on_prompt is not None:
            on_prompt(_report(rows, hf_rows, agree, same_prefix, dec, max_new_tokens, len(same_prefix) // len(configs)))
    bar.close()
    return _report(rows, hf_rows, agree, same_prefix, dec, max_new_tokens, len(prompts))


def _report(rows, hf_rows, agree, same_prefix, dec, max_new_tokens, num_prompts) -> dict:
    """tokens/s, tau, speedups and efficiency from the accumulated rows (ours and transformers')."""
    out = {}
    for name, r in {**hf_rows, **rows}.items():
        o = {"tokens_per_s": r["tokens"] / r["seconds"], "tokens": r["tokens"], "seconds": r["seconds"]}
        if "sha" in r:  # the tokens of every prompt: two runs (an A/B) that gave the same outputs have the same digest
            o["outputs_sha256"] = r["sha"].hexdigest()
        if "target_calls" in r:
            o["tau"] = (r["tokens"]) / max(r["target_calls"], 1)
            if r["stages"]:
                other = r["stage_seconds_total"] - sum(r["stages"].values())
                o["stage_seconds"] = {**r["stages"], "overhead": max(other, 0.0)}
                steps = max(r["target_calls"], 1)  # the stage-timed run takes the same steps (greedy)
                o["stage_us_per_step"] = {k: v / steps * 1e6 for k, v in o["stage_seconds"].items()}
                if r.get("depth"):
                    o["stage_us_per_step"]["draft_level"] = o["stage_us_per_step"].get("draft", 0.0) / r["depth"]
        out[name] = o
    ar = out["ar"]["tokens_per_s"]
    hf = out.get("hf-greedy", {}).get("tokens_per_s")
    for name, o in out.items():
        o["speedup_vs_ar"] = o["tokens_per_s"] / ar
        if hf:
            o["speedup_vs_hf"] = o["tokens_per_s"] / hf
        if "tau" in o:
            o["efficiency"] = o["speedup_vs_ar"] / o["tau"]
    return {
        "results": out,
        "tree_vs_chain": tree_against_chains(out),
        "outputs_identical": bool(agree),
        "min_common_prefix_with_ar": min(same_prefix) if same_prefix else None,
        "backend": dec.backend,
        "decoder": type(dec).__name__,
        "compile": getattr(dec, "compile", False),
        "batch_invariant_rows": dec.rows,
        "compile_seconds": dict(getattr(dec, "compile_seconds", {})),
        "max_new_tokens": max_new_tokens,
        "num_prompts": num_prompts,
    }


def _depth(name: str) -> int | None:
    """The draft levels of a results row named by `method_name`: chain-g7 -> 7, tree-4-16-16 -> 3; None for others
    (ar, the transformers peers, a run on another attention backend), as `drafted_shape` reads the name."""
    shape = drafted_shape(name)
    return None if shape is None else len(shape)


def tree_against_chains(results: dict) -> dict:
    """Each tree against the chain of its own depth and against the fastest chain, from one report's rows.

    A step's time is tau / tokens_per_s (tokens per target pass over tokens per second). For a tree of d levels
    and the chain of d levels (chain-g<d>, when the run has it):
        tau_ratio    tree tau / chain tau: what the branches add to the tokens a pass keeps
        step_ratio   tree step / chain step: what the branches cost (wider levels, beam selections, a wider verify)
        at_chain_cost_tokens_per_s   tree tau / chain step: the tree's speed if its step cost no more than the chain's
    and vs_best_chain (the tree's tokens/s over the fastest chain's), at_chain_cost_vs_best_chain (the same for the
    speed at the chain's cost). The last is the ceiling of the goal "best tree >= 1.15x best chain" that making the
    tree-only work free can reach: below 1.15, only more tokens per pass (tau) or cheaper levels for both can.
    Returns {"best_chain": name or None, "trees": {tree name: {...}}}; a tree without its chain has only depth,
    tau, step_us and vs_best_chain."""
    rows = {n: r for n, r in results.items() if _depth(n) is not None and r.get("tau") and r.get("tokens_per_s")}
    step_us = {n: r["tau"] / r["tokens_per_s"] * 1e6 for n, r in rows.items()}
    chains = {_depth(n): n for n in rows if n.startswith("chain-")}
    best = max(chains.values(), key=lambda n: rows[n]["tokens_per_s"], default=None)
    best_tps = rows[best]["tokens_per_s"] if best else None
    trees = {}
    for n in (n for n in rows if n.startswith("tree-")):
        d, r = _depth(n), rows[n]
        t = {"depth": d, "tau": r["tau"], "step_us": step_us[n], "chain": chains.get(d)}
        t["vs_best_chain"] = r["tokens_per_s"] / best_tps if best_tps else None
        c = chains.get(d)
        if c is not None:
            at_cost = r["tau"] / step_us[c] * 1e6
            t.update(
                tau_ratio=r["tau"] / rows[c]["tau"], step_ratio=step_us[n] / step_us[c],
                at_chain_cost_tokens_per_s=at_cost, at_chain_cost_vs_best_chain=at_cost / best_tps,
            )  # fmt: skip
        trees[n] = t
    return {"best_chain": best, "trees": trees}


def format_tree_against_chains(table: dict) -> list[str]:
    """`tree_against_chains` as printable lines: one per tree."""
    lines = [f"trees against chains (best chain: {table['best_chain']}):"]
    for n, t in table["trees"].items():
        line = f"  {n:28s} depth {t['depth']}  step {t['step_us']:.1f} us"
        if t["vs_best_chain"] is not None:
            line += f"  x{t['vs_best_chain']:.3f} the best chain"
        if "tau_ratio" in t:
            line += (
                f"  vs {t['chain']}: tau x{t['tau_ratio']:.3f}, step x{t['step_ratio']:.3f};"
                f" at its cost x{t['at_chain_cost_vs_best_chain']:.3f} the best chain"
            )
        lines.append(line)
    return lines


def write_plot(rep: dict, path) -> str:
    """tokens/s (bars) and tau (markers) per method, written to `path` (.html, or an image through kaleido).
    Returns the path written; raises ValueError rather than writing a different file."""
    from plotly.subplots import make_subplots

    names = list(rep["results"])
    res = rep["results"]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_bar(x=names, y=[res[n]["tokens_per_s"] for n in names], name="tokens/s")
    fig.add_scatter(
        x=names,
        y=[res[n].get("tau") for n in names],
        mode="markers",
        name="tau",
        marker={"size": 12, "symbol": "diamond"},
        secondary_y=True,
    )
    env = rep.get("environment", {})
    fig.update_layout(
        title=f"End-to-end greedy decoding on {env.get('gpu') or 'CPU'}<br><sup>"
        f"{rep['max_new_tokens']} new tokens, {rep['num_prompts']} held-out prompts, "
        f"{rep.get('dtype', '')}, {rep.get('decoder', '')}</sup>",
        xaxis_title="method",
        legend_title="measure",
        width=1000,
        height=520,
    )
    fig.update_yaxes(title_text="tokens per second", rangemode="tozero", secondary_y=False)
    fig.update_yaxes(
        title_text="tau (tokens per target pass)", rangemode="tozero", dtick=1, showgrid=False, secondary_y=True
    )
    path = str(path)
    if path.lower().endswith(".html"):
        fig.write_html(path, include_plotlyjs="cdn")
        return path
    try:
        fig.write_image(path)
    except Exception as e:  # kaleido missing or broken: say so, never write another file instead
        raise ValueError(
            f"could not write the figure {path} ({e}); install kaleido, or ask for an interactive "
            f"{path.rsplit('.', 1)[0]}.html"
        ) from e
    return path


def run_cli(args) -> int:
    """`longspec-lab bench` after its flags are parsed and checked (the parser is in longspec_lab.cli)."""
    from longspec_lab.models.pair import load_pair
    from longspec_lab.paths import EMBEDDED_TARGET, load_prompts

    target, draft, tok = load_pair(args.model, args.draft, args.device, args.dtype)
    widest = max([1 + sum(s) for s in args.tree_shapes] + [1 + g for g in args.gammas])
    room = target.config.context_length - args.max_new_tokens - widest
    prompts = [tok.encode(p["text"]) for p in load_prompts(min_tokens=args.min_prompt_tokens)]
    fitting = [p for p in prompts if len(p) <= room]
    prompts = fitting[: args.num_prompts]
    if prompts and len(prompts) < args.num_prompts:
        print(
            f"note: {len(prompts)} held-out prompts fit these settings (--num-prompts {args.num_prompts} asked for "
            "more); the report counts the ones that ran",
            file=sys.stderr,
        )
    if not prompts:
        raise ValueError(
            f"no held-out prompt of at least --min-prompt-tokens {args.min_prompt_tokens} tokens fits the model's "
            f"context with --max-new-tokens {args.max_new_tokens} and the widest tree ({widest} nodes); lower "
            "--min-prompt-tokens or --max-new-tokens"
        )
    hf = None
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(args.model or EMBEDDED_TARGET), dtype=target.dtype)
        hf = hf.to(target.device).eval()
    shapes = args.tree_shapes
    rep = run_bench(
        target,
        draft,
        prompts,
        args.max_new_tokens,
        shapes,
        gammas=args.gammas,
        hf_model=hf,
        backend=args.attention_backend,
        progress=not args.quiet,
        fast=False if args.eager else None,
        extra_backends=args.extra_backends,
        compile=getattr(args, "compile", None),
        batch_invariant=getattr(args, "batch_invariant", False),
    )
    if getattr(args, "profile", False):
        from longspec_lab.bench.profile import profile_stages

        if target.device.type != "cuda":
            raise ValueError("--profile counts GPU kernels and needs --device cuda; drop --profile on this device")
        be = args.attention_backend or "triton"
        rep["profile"] = {
            "ar": profile_stages(target, draft, prompts[0], "ar", backend=be),
            **{
                method_name("chain", gamma=g): profile_stages(target, draft, prompts[0], "chain", [1] * g, be)
                for g in args.gammas
            },
            **{method_name("tree", shape=s): profile_stages(target, draft, prompts[0], "tree", s, be) for s in shapes},
        }
    rep["environment"] = environment(target.device)
    rep["prompt_tokens"] = [len(p) for p in prompts]
    rep["dtype"] = str(target.dtype).replace("torch.", "")
    text = json.dumps({"schema_version": rep["environment"]["schema_version"], **rep}, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        print(f"wrote the report to {args.out}")
    print_report(rep, args.plot)
    return 0


def print_report(rep: dict, plot=None) -> None:
    """A report's table (tokens/s, tau, speed-ups, efficiency), each tree against the chains (computed here, so a
    report recorded before `tree_against_chains` existed prints it too) and whether the outputs agreed; with `plot`,
    also the figure (`write_plot`), and where it went."""
    print(f"{'method':<24}{'tok/s':>10}{'tau':>7}{'vs ar':>8}{'vs hf':>8}{'eff':>7}")
    for name, o in rep["results"].items():
        print(
            f"{name:<24}{o['tokens_per_s']:>10.1f}{o.get('tau', float('nan')):>7.2f}"
            f"{o.get('speedup_vs_ar', float('nan')):>8.2f}{o.get('speedup_vs_hf', float('nan')):>8.2f}"
            f"{o.get('efficiency', float('nan')):>7.2f}"
        )
    table = tree_against_chains(rep["results"])
    if table["trees"]:
        print("\n".join(format_tree_against_chains(table)))
    if "outputs_identical" in rep:
        print(f"outputs identical across methods: {rep['outputs_identical']}")
    if plot:
        print(f"wrote the figure to {write_plot(rep, plot)}")


def load_report(path) -> dict:
    """A recorded end-to-end report (`longspec-lab bench --out`, bench.h200_speed's e2e JSON), checked: a ValueError
    naming the file and the problem when it is missing, not JSON, or has no results with tokens/s."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(
            f"{p}: no such report; pass a JSON file that `longspec-lab bench --out` wrote (data/results/e2e_*.json)"
        )
    try:
        rep = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p} is not a JSON report ({e}); pass a file that `longspec-lab bench --out` wrote") from None
    res = rep.get("results") if isinstance(rep, dict) else None
    rows_ok = isinstance(res, dict) and res and all(isinstance(r, dict) and "tokens_per_s" in r for r in res.values())
    if not rows_ok:
        raise ValueError(
            f"{p} has no end-to-end results (a 'results' object of methods with tokens_per_s); pass a report that "
            "`longspec-lab bench --out` or bench.h200_speed wrote"
        )
    for name, r in res.items():  # every figure the table prints must be a number (a hand-edited file may hold others)
        for key in ("tokens_per_s", "tau", "speedup_vs_ar", "speedup_vs_hf", "efficiency"):
            v = r.get(key, 0.0) if key != "tokens_per_s" else r[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(
                    f"{p}: results[{name!r}][{key!r}] is {v!r}, not a number; the report was edited or damaged: "
                    "restore it, or record it again with `longspec-lab bench --out`"
                )
    return rep


if __name__ == "__main__":  # the old spelling, `python -m longspec_lab.bench.e2e`, runs the CLI's subcommand
    import runpy
    import sys

    sys.argv = ["longspec-lab", "bench", *sys.argv[1:]]
    runpy.run_module("longspec_lab", run_name="__main__", alter_sys=True)
