"""End-to-end decoding benchmark: our loops against stock `transformers` on the same weights.

One run measures, on the same prompts and device:
  hf-greedy         transformers `generate(do_sample=False)`
  hf-prompt-lookup  the same with `prompt_lookup_num_tokens` (strong stock baseline for code)
  ar                our autoregressive loop
  chain-g<N>        our chain speculative decoding
  tree-<shape>      our tree speculative decoding
and reports tokens/s (decode phase, prefill excluded for ours; whole `generate` minus a measured
prefill for transformers), tau, speedups over our AR and over transformers, efficiency =
speedup / tau, and a per-stage breakdown. Every timed run is preceded by a warm-up run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from .timing import sync

DEFAULT_SHAPES = ([4, 16, 16, 16, 16], [4, 8, 8, 8], [2, 4, 8, 8, 8, 8], [8, 16, 32])


def environment(device) -> dict:
    import transformers

    env = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "platform": platform.platform(),
           "device": str(device), "command": " ".join(sys.argv)}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.device(device).type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, sm_count=p.multi_processor_count, cuda=torch.version.cuda)
    else:
        env.update(gpu=None, cpu_threads=torch.get_num_threads())
    return env


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
    return max(total - first, 1e-9), out[0, len(ids):].tolist()


def run_bench(target, draft, prompts: list[list[int]], max_new_tokens=256, shapes=DEFAULT_SHAPES,
              gammas=(4,), hf_model=None, backend=None, progress=True, decoder_cls=None) -> dict:
    from tqdm.auto import tqdm

    from .decode import SpecDecoder

    dec = (decoder_cls or SpecDecoder)(target, draft, backend=backend)
    configs = [("ar", dict(method="ar"))]
    configs += [(f"chain-g{g}", dict(method="chain", gamma=g)) for g in gammas]
    configs += [("tree-" + "-".join(map(str, s)), dict(method="tree", tree_shape=list(s))) for s in shapes]
    rows = {name: {"tokens": 0, "seconds": 0.0, "target_calls": 0, "stages": {}} for name, _ in configs}
    hf_rows = {}
    dec.generate(prompts[0][:128], method="tree", max_new_tokens=16)  # global warm-up
    bar = tqdm(total=len(prompts) * (len(configs) + (2 if hf_model is not None else 0)),
               disable=not progress, desc="bench")
    agree = True
    for ids in prompts:
        ref = None
        for name, kw in configs:
            dec.generate(ids, max_new_tokens=min(32, max_new_tokens), stop_at_eos=False, **kw)  # warm-up
            res = dec.generate(ids, max_new_tokens=max_new_tokens, stop_at_eos=False, **kw)
            ref = res.new_tokens if ref is None else ref
            agree &= res.new_tokens == ref
            r = rows[name]
            r["tokens"] += len(res.new_tokens) - 1
            r["seconds"] += res.decode_seconds
            r["target_calls"] += res.target_calls - 1
            for k, v in res.stage_seconds.items():
                if k != "prefill":
                    r["stages"][k] = r["stages"].get(k, 0.0) + v
            bar.update()
        if hf_model is not None:
            for name, kw in [("hf-greedy", {}), ("hf-prompt-lookup", {"prompt_lookup_num_tokens": 10})]:
                secs, toks = _hf_time(hf_model, ids, max_new_tokens, target.device, **kw)
                agree &= toks == ref
                h = hf_rows.setdefault(name, {"tokens": 0, "seconds": 0.0})
                h["tokens"] += len(toks) - 1
                h["seconds"] += secs
                bar.update()
    bar.close()
    out = {}
    for name, r in {**hf_rows, **rows}.items():
        o = {"tokens_per_s": r["tokens"] / r["seconds"], "tokens": r["tokens"], "seconds": r["seconds"]}
        if "target_calls" in r:
            o["tau"] = (r["tokens"]) / max(r["target_calls"], 1)
            other = r["seconds"] - sum(r["stages"].values())
            o["stage_seconds"] = {**r["stages"], "overhead": max(other, 0.0)}
        out[name] = o
    ar = out["ar"]["tokens_per_s"]
    hf = out.get("hf-greedy", {}).get("tokens_per_s")
    for name, o in out.items():
        o["speedup_vs_ar"] = o["tokens_per_s"] / ar
        if hf:
            o["speedup_vs_hf"] = o["tokens_per_s"] / hf
        if "tau" in o:
            o["efficiency"] = o["speedup_vs_ar"] / o["tau"]
    return {"results": out, "outputs_identical": bool(agree), "backend": dec.backend,
            "max_new_tokens": max_new_tokens, "num_prompts": len(prompts)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="longspec-lab bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="target folder (default: data/embedded)")
    ap.add_argument("--draft", default=None, help="draft folder (default: data/embedded-draft)")
    ap.add_argument("--device", default=None, help="cpu / cuda (default: auto)")
    ap.add_argument("--dtype", default=None, help="float32 / bf16 / fp16 (default: fp32 CPU, bf16 GPU)")
    ap.add_argument("--attention-backend", default=None, choices=["torch", "sdpa", "triton"])
    ap.add_argument("--num-prompts", type=int, default=4, help="held-out prompts of 2k-4k tokens (default: 4)")
    ap.add_argument("--min-prompt-tokens", type=int, default=2000)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--shapes", default=";".join(",".join(map(str, s)) for s in DEFAULT_SHAPES),
                    help="tree shapes, ';'-separated (default: %(default)s)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baselines")
    ap.add_argument("--out", default=None, help="write the JSON here")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    from .corpus import load_prompts
    from .load import EMBEDDED_TARGET, load_pair

    target, draft, tok = load_pair(args.model, args.draft, args.device, args.dtype)
    room = target.config.max_position_embeddings - args.max_new_tokens - 80
    prompts = [tok.encode(p["text"]) for p in load_prompts(min_tokens=args.min_prompt_tokens)]
    prompts = [p for p in prompts if len(p) <= room][: args.num_prompts]
    if not prompts:
        raise SystemExit("no held-out prompt fits; lower --min-prompt-tokens or --max-new-tokens")
    hf = None
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(args.model or EMBEDDED_TARGET), dtype=target.dtype)
        hf = hf.to(target.device).eval()
    shapes = [list(map(int, s.split(","))) for s in args.shapes.split(";") if s]
    rep = run_bench(target, draft, prompts, args.max_new_tokens, shapes, hf_model=hf,
                    backend=args.attention_backend, progress=not args.quiet)
    rep["environment"] = environment(target.device)
    rep["prompt_tokens"] = [len(p) for p in prompts]
    rep["dtype"] = str(target.dtype).replace("torch.", "")
    text = json.dumps(rep, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(f"{'method':<24}{'tok/s':>10}{'tau':>7}{'vs ar':>8}{'vs hf':>8}{'eff':>7}")
    for name, o in rep["results"].items():
        print(f"{name:<24}{o['tokens_per_s']:>10.1f}{o.get('tau', float('nan')):>7.2f}"
              f"{o['speedup_vs_ar']:>8.2f}{o.get('speedup_vs_hf', float('nan')):>8.2f}"
              f"{o.get('efficiency', float('nan')):>7.2f}")
    print(f"outputs identical across methods: {rep['outputs_identical']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
