"""What verifying a 69-node tree costs on an 8B-shaped target, next to one decode step.

Builds a Llama-3-8B-shaped target (32 layers, 32/8 heads, head dim 128, vocab 128,256) with random
bf16 weights and a KV cache filled with random entries up to a context P, then times (medians of
`triton.testing.do_bench`, device synchronised):

  decode   one 1-token forward at position P
  verify   one forward over 4 pending tokens + a 68-node [4,16,16,16] tree... i.e. the pending
           tokens causal and the [4,16,16,16,16] tree (root = last pending token) under its mask
for our target with each attention backend, eager and CUDA-graph captured (and with --compile compiled and
captured, the form the decoder runs), and the same two steps with stock `transformers` (DynamicCache, SDPA, a
4D mask for the tree) sharing the same weights. Beside them: one tree step's drafting by an 8B-shaped one-layer
GliDe draft (`draft_levels`: five levels, each with the LM head and the beam's selection) and the commit.
The floor of each step is the bytes it must read (weights + KV cache) over the copy bandwidth
measured in the same run. A projected end-to-end speedup for such a target,
tau x t_decode / (t_draft + t_verify + t_commit), is reported and labelled as a projection.

Taught in: notebooks/04_hybrid_tree_attention_and_the_triton_kernel.ipynb.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from longspec_lab.decoding.timing import fastest_form
from longspec_lab.models.config import PRESETS
from longspec_lab.models.layers import Rotary, rope_inv_freq
from longspec_lab.models.target import Target
from longspec_lab.provenance import environment
from longspec_lab.spec.tree import DEFAULT_TREE_SHAPE, DraftTree


def random_target(cfg, device, dtype, seed=0, fuse: bool = True) -> Target:
    """A Target of config `cfg` with random weights (norms 1, the rest N(0, 0.02)) on `device` in `dtype`; with
    `fuse` its q/k/v and gate/up projections fused into one weight each, as the loaders fuse a checkpoint's."""
    with torch.device("meta"):
        m = Target(cfg)
    m = m.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    m.rotary = Rotary(cfg).to(device)
    m = m.to(dtype).eval()
    return m.fuse() if fuse else m


def read_weight_bytes(target, rows: int = 1) -> int:
    """The weight bytes one pass of `rows` tokens reads: every parameter, except that an input embedding table not
    shared with the LM head is read one row per token, not whole (Llama-3-8B's: 1.05 GB that a floor counting
    every parameter would add)."""
    total = sum(p.numel() * p.element_size() for p in target.parameters())
    emb = target.model.embed_tokens.weight
    if emb is not target.lm_head.weight:
        total -= (emb.shape[0] - rows) * emb.shape[1] * emb.element_size()
    return total


def verify_block(n_pending=4, shape=DEFAULT_TREE_SHAPE, device="cpu"):
    """Mask [T, T] and depth offsets [T] for pending tokens followed by a random tree whose root is
    the last pending token (random parents, numbered level by level)."""
    g = torch.Generator().manual_seed(0)
    off = shape.level_offsets
    parents = [-1]
    for l in range(1, shape.depth + 1):
        lo, hi = off[l - 1], off[l]
        parents += [int(torch.randint(lo, hi, (1,), generator=g)) for _ in range(off[l + 1] - off[l])]
    tree = DraftTree.from_parents(torch.zeros(len(parents), dtype=torch.long), parents)
    N, p = tree.num_nodes, n_pending - 1  # the root is the last pending token
    T = p + N
    mask = torch.zeros(T, T, dtype=torch.bool)
    mask[:p, :p] = torch.ones(p, p, dtype=torch.bool).tril()
    mask[p:, :p] = True
    mask[p:, p:] = tree.mask
    offsets = torch.cat([torch.arange(p), p + tree.depths])
    return mask.to(device), offsets.to(device)


def copy_bandwidth(device, nbytes=2 << 30) -> float:
    import triton

    a = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=50, rep=200)
    return 2 * nbytes / (ms * 1e-3)


def graphed(fn):
    """fn captured in a CUDA graph (decoding.graphs.capture, after warm-up); returns its replay."""
    from longspec_lab.decoding.graphs import capture

    return capture([fn])[0].replay


def add_ratios(row: dict, backends, tau=None) -> dict:
    """Per backend, from the fastest form measured of each step (`decoding.timing.fastest_form`: compiled and
    captured, captured, or eager): decode and verify over their floors, verify over decode, and with `tau` and a
    draft step the projected speedup tau x t_decode / (t_draft + t_verify + t_commit). Adds the keys to `row` and
    returns it."""
    draft = fastest_form(row, "draft_step")
    for be in backends:
        dec, ver = fastest_form(row, f"{be}_decode")[0], fastest_form(row, f"{be}_verify")[0]
        row[f"{be}_decode_vs_floor"] = dec / row["floor_decode_ms"]
        row[f"{be}_verify_vs_floor"] = ver / row["floor_verify_ms"]
        row[f"{be}_verify_over_decode"] = ver / dec
        if tau and draft is not None:  # a projection, not a measurement
            row[f"{be}_projected_speedup"] = tau * dec / (draft[0] + ver + row["commit_graph_ms"])
    return row


def measure(
    contexts,
    backends,
    n_pending=4,
    tau=None,
    with_hf=True,
    dtype=torch.bfloat16,
    progress=True,
    compile_at=(),
    on_row=None,
) -> dict:
    """One row per context. compile_at: contexts at which the first backend's decode and verify, and the draft
    step, are also compiled and captured; on_row(rows): called after each part of a context (incremental reports:
    a context still being measured is the last row, marked "partial"), so a run cut short keeps what it measured."""
    import triton
    from tqdm.auto import tqdm

    dev = torch.device("cuda")
    cfg = PRESETS["llama3-8b"]
    target = random_target(cfg, dev, dtype)
    bw = copy_bandwidth(dev)
    weight_bytes = read_weight_bytes(target)
    kv_per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8
    mask, offsets = verify_block(n_pending, device=dev)
    T = mask.shape[0]
    hf = build_hf(target, dev) if with_hf else None
    rows = []
    bar = tqdm(contexts, disable=not progress, desc="contexts")
    t_start = time.perf_counter()
    for P in bar:

        def done(part):  # report the part just measured, and hand the rows so far to on_row
            if progress:
                tqdm.write(f"context {P}: {part} measured ({time.perf_counter() - t_start:.0f} s in)")
            if on_row is not None:
                on_row(rows + [{**row, "partial": True}])

        cache = target.new_cache(P + T + 8)
        cache.k[:, :, :, :P].normal_(0, 1)
        cache.v[:, :, :, :P].normal_(0, 1)
        x1 = torch.zeros(1, 1, dtype=torch.long, device=dev)
        xT = torch.zeros(1, T, dtype=torch.long, device=dev)
        pos = P + offsets
        row = {
            "context": P,
            "floor_decode_ms": (weight_bytes + P * kv_per_token) / bw * 1e3,
            "floor_verify_ms": (weight_bytes + (P + T) * kv_per_token) / bw * 1e3,
        }
        with torch.inference_mode():
            for be in backends:
                dec = lambda: target(x1, cache=cache, start=P, backend=be, last_only=True)  # noqa: E731
                ver = lambda: target(xT, positions=pos, cache=cache, start=P, mask=mask, backend=be)  # noqa: E731
                row[f"{be}_decode_ms"] = triton.testing.do_bench(dec, warmup=5, rep=40)
                row[f"{be}_verify_ms"] = triton.testing.do_bench(ver, warmup=5, rep=40)
                try:
                    row[f"{be}_decode_graph_ms"] = triton.testing.do_bench(graphed(dec), warmup=5, rep=40)
                    row[f"{be}_verify_graph_ms"] = triton.testing.do_bench(graphed(ver), warmup=5, rep=40)
                except Exception as e:  # record why a backend cannot be captured
                    row[f"{be}_graph_error"] = f"{type(e).__name__}: {e}"[:300]
                if P in compile_at and be == backends[0]:
                    row.update(_compiled_steps(target, cache, P, pos, mask, be))
                torch.cuda.synchronize()
                done(f"{be} decode and verify")
            try:
                row.update(_draft_and_commit(target, cache, P, dtype, dev, compile_draft=P in compile_at))
                row["floor_draft_ms"] = row["draft_floor_bytes"] / bw * 1e3
                row["draft_vs_floor"] = fastest_form(row, "draft_step")[0] / row["floor_draft_ms"]
                row["draft_levels_floor_vs_floor"] = row["draft_levels_floor_bytes"] / row["draft_floor_bytes"]
            except Exception as e:
                row["draft_error"] = f"{type(e).__name__}: {e}"[:300]
            done("draft step and commit")
            if hf is not None:
                ours = target(xT, positions=pos, cache=cache, start=P, mask=mask, backend=backends[0])
                row.update(_hf_steps(hf, cfg, P, mask, offsets, dtype, dev, cache, ours))
        add_ratios(row, backends, tau)
        rows.append(row)
        if on_row is not None:
            on_row(rows)
        cache = None  # free the context before the next one
        torch.cuda.empty_cache()
    return {
        "rows": rows,
        "copy_bandwidth_TBps": bw / 1e12,
        "weight_bytes": weight_bytes,
        "kv_bytes_per_token": kv_per_token,
        "verify_rows": T,
        "n_pending": n_pending,
        "tree_shape": list(DEFAULT_TREE_SHAPE.widths),
        "dtype": str(dtype).replace("torch.", ""),
    }


def compile_timed(fn, dev):
    """(compiled fn, compile seconds): fn compiled as the decoder compiles a stage (`decoding.graphs.compile_stage`:
    fullgraph, static shapes) and called once, which is when it compiles; the device synchronised."""
    from longspec_lab.decoding.graphs import compile_stage

    compiled = compile_stage(fn, "default")
    t0 = time.perf_counter()
    compiled()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return compiled, time.perf_counter() - t0


def compile_and_time(fn, dev) -> tuple[float, float]:
    """(compile seconds, ms a replay) of fn compiled (`compile_timed`) and captured in a CUDA graph; the
    compilation is timed apart."""
    import triton

    compiled, seconds = compile_timed(fn, dev)
    return seconds, triton.testing.do_bench(graphed(compiled), warmup=5, rep=40)


def _compiled_steps(target, cache, P, pos, mask, backend) -> dict:
    """Decode and verify with the context length in a device tensor, each compiled (`torch.compile`,
    fullgraph, static shapes: the layer bodies fused by Inductor, the attention kernel a registered op) and
    captured in one CUDA graph: the form the decoder runs. Compilation is timed apart."""
    dev = cache.k.device
    Pt = torch.tensor([P], device=dev)
    x1 = torch.zeros(1, 1, dtype=torch.long, device=dev)
    xT = torch.zeros(1, mask.shape[0], dtype=torch.long, device=dev)

    def dec():
        return target(x1, positions=Pt, cache=cache, start=Pt, backend=backend, last_only=True)

    def ver():
        return target(xT, positions=pos, cache=cache, start=Pt, mask=mask, backend=backend)

    out = {}
    for kind, fn in (("decode", dec), ("verify", ver)):
        try:
            out[f"{backend}_{kind}_compile_s"], out[f"{backend}_{kind}_compiled_ms"] = compile_and_time(fn, dev)
        except Exception as e:  # record why this backend does not compile
            out[f"{backend}_{kind}_compile_error"] = f"{type(e).__name__}: {e}"[:300]
    return out


def draft_levels(target, cache, P, dtype, dev) -> tuple[list, dict]:
    """One tree step's drafting for an 8B-shaped one-layer GliDe draft, as callables, and its bytes: "floor" (the
    goal's floor, below), "projections" (the part of it the projections read: the draft's matrices and the LM head
    once per level) and "levels" (what the sequential levels must read at the least: each its own layer weights,
    the LM head and the layer of KV its cross-attention reads).

    The levels: ingest of the 5 pending tokens, then the levels of the default tree over 4, 16, 16, 16 nodes,
    each the decoder's own pieces: self-attention over the draft's window and the tree's scratch slots
    (`masked_sdpa`), cross-attention to the target's last-layer cache through `prefix_attention` (the split-KV
    tree kernel with no tree part), the last hidden rows, then the shared LM head and the beam's selection
    (`beam_level_from_hidden`, as `decoding.steps` calls it). Its floor, as the goal states it: the draft layer's
    own weights, the LM head once per level and one layer of the target's KV at this context. (Each level reads
    the layer's weights and, in its cross-attention, that KV again: the floor counts them once.)"""
    from longspec_lab.models.glide import DraftConfig, Glide
    from longspec_lab.models.layers import fuse_projections
    from longspec_lab.ops.attention import masked_sdpa, prefix_attention
    from longspec_lab.spec.draft import beam_level_from_hidden

    torch.manual_seed(0)
    d = fuse_projections(Glide(DraftConfig.from_target(target.config), target).to(dev, dtype).eval())  # as loaded
    dc = d.config
    W = dc.window
    N = DEFAULT_TREE_SHAPE.num_nodes  # the draft's ring: W + 1 slots of committed keys, then a scratch slot per node
    rk = torch.randn(1, dc.num_kv_heads, W + N, dc.head_dim, dtype=dtype, device=dev)  # [1, Hkv, W + N, D]
    rv = torch.randn_like(rk)
    window = torch.ones(5, W + 1, dtype=torch.bool, device=dev)  # what each row sees of the committed ring
    scratch = torch.ones(DEFAULT_TREE_SHAPE.widths[-1], N - 1, dtype=torch.bool, device=dev)  # and of the tree
    Pt = torch.tensor([P], device=dev)
    widths = list(DEFAULT_TREE_SHAPE.widths)  # [4, 16, 16, 16, 16]
    rows = [5] + widths[:-1]  # rows of each draft call: the ingest block, then each level's nodes
    head = d.head_weight  # [V, hidden]

    def cross(q):
        return prefix_attention(q, cache.k[-1], cache.v[-1], Pt, "triton")

    def selfa(q, k, v):  # as the draft's ingest and tree levels attend (`masked_sdpa`: one kernel on CUDA)
        n = q.shape[2]
        if n == 5:
            return masked_sdpa(q, rk[:, :, : W + 1], rv[:, :, : W + 1], window)
        return masked_sdpa(q, rk, rv, window[:1], scratch[:n])

    def level(n, width):
        toks = torch.zeros(1, n, dtype=torch.long, device=dev)
        pos = torch.full((1, n), P, device=dev)
        scores = torch.zeros(n if n != 5 else 1, device=dev)

        def run():
            h = d.layer(toks, pos, selfa, cross, hidden=True)[0]  # [n, hidden]
            h = h[-1:] if n == 5 else h  # the ingest grows the tree from its last token only
            return beam_level_from_hidden(scores, h, head, width)

        return run

    own = sum(p.numel() * p.element_size() for p in d.parameters())
    cfg = target.config
    kv_layer = P * 2 * cfg.num_kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8
    heads = len(rows) * head.numel() * head.element_size()
    matrices = sum(p.numel() * p.element_size() for p in d.parameters() if p.dim() == 2)
    nbytes = {
        "floor": own + heads + kv_layer,
        "projections": matrices + heads,
        "levels": len(rows) * (own + kv_layer) + heads,
    }
    return [level(n, w) for n, w in zip(rows, widths)], nbytes


def _draft_and_commit(target, cache, P, dtype, dev, compile_draft: bool = False) -> dict:
    """Cost of one tree step's drafting (`draft_levels`: each level captured alone, and all levels as one CUDA
    graph, as in a step) and of the commit gather. With compile_draft the whole draft step is also compiled
    (`torch.compile`, fullgraph, static shapes: the form the decoder runs) and captured; its compile time apart."""
    import triton

    fns, nbytes = draft_levels(target, cache, P, dtype, dev)

    def step():
        return [f() for f in fns]

    out = {
        "draft_level_graph_ms": [triton.testing.do_bench(graphed(f), warmup=5, rep=40) for f in fns],
        "draft_step_graph_ms": triton.testing.do_bench(graphed(step), warmup=5, rep=40),
        "draft_floor_bytes": nbytes["floor"],
        "draft_levels_floor_bytes": nbytes["levels"],  # five sequential levels: no draft step reads less
    }
    if compile_draft:
        try:
            out["draft_compile_s"], out["draft_step_compiled_ms"] = compile_and_time(step, dev)
        except Exception as e:  # record why the draft does not compile
            out["draft_compile_error"] = f"{type(e).__name__}: {e}"[:300]
    Pt = torch.tensor([P], device=dev)
    path = torch.arange(6, device=dev)

    def commit():
        for t in (cache.k, cache.v):
            t.index_copy_(3, Pt + path, t.index_select(3, Pt + path))

    out["commit_graph_ms"] = triton.testing.do_bench(graphed(commit), warmup=5, rep=40)
    return out


def _hf_steps(hf, cfg, P, mask, offsets, dtype, dev, ours_cache, ours_logits) -> dict:
    """Stock transformers on the same weights and the same cached K/V; also checks that its verify
    logits agree with ours."""
    import triton
    from transformers import DynamicCache

    T = mask.shape[0]
    cache = DynamicCache(config=hf.config)
    for layer in range(cfg.num_layers):
        cache.update(ours_cache.k[layer, :, :, :P].clone(), ours_cache.v[layer, :, :, :P].clone(), layer)
    full = torch.ones(T, P + T, dtype=torch.bool, device=dev)
    full[:, P:] = mask
    add = torch.zeros(1, 1, T, P + T, dtype=dtype, device=dev).masked_fill(~full, torch.finfo(dtype).min)
    x1 = torch.zeros(1, 1, dtype=torch.long, device=dev)
    xT = torch.zeros(1, T, dtype=torch.long, device=dev)

    def dec():
        hf(
            input_ids=x1,
            past_key_values=cache,
            use_cache=True,
            position_ids=torch.full((1, 1), P, device=dev),
            logits_to_keep=1,
        )
        cache.crop(-1)

    def ver():
        out = hf(
            input_ids=xT, past_key_values=cache, use_cache=True, attention_mask=add, position_ids=(P + offsets)[None]
        ).logits
        cache.crop(-T)
        return out

    out = {}
    try:
        ref = ver().float()
        out["hf_vs_ours_verify_logits_max_abs_diff"] = float((ref - ours_logits.float()).abs().max())
        out["logits_max_abs"] = float(ref.abs().max())
        out["hf_decode_ms"] = triton.testing.do_bench(dec, warmup=3, rep=30)
        out["hf_verify_ms"] = triton.testing.do_bench(ver, warmup=3, rep=30)
        out["hf_verify_over_decode"] = out["hf_verify_ms"] / out["hf_decode_ms"]
    except Exception as e:
        out["hf_error"] = f"{type(e).__name__}: {e}"[:300]
    cache = None
    return out


# ----------------------------------------------------------------------------------------------
# Agreement with stock transformers, layer by layer: plain causal prefill in float32, then bf16, then the
# verify step under the tree mask, each time naming the first decoder layer whose output differs.


def hf_llama_config(cfg):
    """transformers' `LlamaConfig` for one of our model configs (the fields both sides share)."""
    from transformers import LlamaConfig

    return LlamaConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "torch_dtype")})


def build_hf(target, device):
    """Stock `LlamaForCausalLM` (SDPA attention) whose parameters ARE the target's tensors (assign=True)."""
    from transformers import LlamaForCausalLM

    cfg = target.config
    hcfg = hf_llama_config(cfg)
    hcfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = LlamaForCausalLM(hcfg)
    hf.load_state_dict(target.state_dict(), assign=True, strict=True)
    hf.lm_head.weight = target.lm_head.weight
    with torch.device(device):  # its inv_freq buffer was created on the meta device
        hf.model.rotary_emb = hf.model.rotary_emb.__class__(config=hcfg)
    return hf.to(device).eval()


def _with_layer_outputs(model, layers, fn):
    """fn()'s result and the output of every decoder layer in `layers` (float32 copies)."""
    outs = []

    def hook(mod, args, out):
        outs.append((out[0] if isinstance(out, tuple) else out).detach().float())

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        res = fn()
    finally:
        for h in handles:
            h.remove()
    return res, outs


def _compare(a_logits, a_layers, b_logits, b_layers, tol):
    """Max |a - b| of the logits, each layer's max |a - b| / max |b|, and the first layer over tol."""
    rel = [float((x - y).abs().max() / y.abs().max().clamp_min(1e-30)) for x, y in zip(a_layers, b_layers)]
    over = [i for i, r in enumerate(rel) if not r <= tol]  # NaN counts as over
    return {
        "logits_max_abs_diff": float((a_logits.float() - b_logits.float()).abs().max()),
        "logits_max_abs": float(b_logits.float().abs().max()),
        "layer_max_rel_diff": rel,
        "first_layer_over_tol": over[0] if over else None,
        "tol": tol,
    }


def hf_agreement(target32, device, context=4096, n_prefill=64, n_pending=4, backend="torch", seed=0) -> dict:
    """Our logits and every layer's output against `transformers` on the same weights, in stages:
      prefill_fp32 / prefill_bf16: a plain causal prefill of n_prefill random tokens (no cache);
      tree_fp32 / tree_bf16: the verify step (n_pending tokens + the default tree under its mask) on a cache
        holding `context` random K/V entries, given to both (ours: KVCache + `backend`; theirs: DynamicCache
        + a 4D additive mask).
    bf16 stages also report transformers' own bf16 against its float32 (the spread bf16 itself causes), so
    a bf16 difference can be read against it. target32: a float32 Target; it is copied to bf16."""
    import copy

    from transformers import DynamicCache

    cfg = target32.config
    target16 = copy.deepcopy(target32).to(torch.bfloat16)
    models = {
        torch.float32: (target32, build_hf(target32, device)),
        torch.bfloat16: (target16, build_hf(target16, device)),
    }
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (1, n_prefill), generator=g).to(device)
    mask, offsets = verify_block(n_pending, device=device)
    T = mask.shape[0]
    ids_t = torch.randint(0, cfg.vocab_size, (1, T), generator=g).to(device)
    kv_shape = (cfg.num_layers, 1, cfg.num_kv_heads, context, cfg.head_dim)
    k0 = torch.randn(kv_shape, generator=g).to(device)
    v0 = torch.randn(kv_shape, generator=g).to(device)
    full = torch.ones(T, context + T, dtype=torch.bool, device=device)
    full[:, context:] = mask
    res, raw = {}, {}
    with torch.inference_mode():
        for dtype, (ours_m, hf) in models.items():
            name = "fp32" if dtype == torch.float32 else "bf16"
            tol = 1e-3 if dtype == torch.float32 else 2e-2
            o = _with_layer_outputs(ours_m, ours_m.model.layers, lambda: ours_m(ids))
            h = _with_layer_outputs(hf, hf.model.layers, lambda: hf(input_ids=ids).logits)
            raw[("prefill", name)] = (o, h)
            res[f"prefill_{name}"] = _compare(*o[0:1], o[1], *h[0:1], h[1], tol)
            cache = ours_m.new_cache(context + T + 8)
            cache.k[:, :, :, :context] = k0.to(dtype)
            cache.v[:, :, :, :context] = v0.to(dtype)
            pos = context + offsets
            o = _with_layer_outputs(
                ours_m,
                ours_m.model.layers,
                lambda: ours_m(ids_t, positions=pos, cache=cache, start=context, mask=mask, backend=backend),
            )
            dc = DynamicCache(config=hf.config)
            for layer in range(cfg.num_layers):
                dc.update(k0[layer].to(dtype), v0[layer].to(dtype), layer)
            add = torch.zeros(1, 1, T, context + T, dtype=dtype, device=device).masked_fill(
                ~full, torch.finfo(dtype).min
            )
            h = _with_layer_outputs(
                hf,
                hf.model.layers,
                lambda: hf(input_ids=ids_t, past_key_values=dc, attention_mask=add, position_ids=pos[None]).logits,
            )
            raw[("tree", name)] = (o, h)
            res[f"tree_{name}"] = _compare(*o[0:1], o[1], *h[0:1], h[1], tol)
            if dtype == torch.float32:  # the same step with transformers given our rotary frequencies
                rot = hf.model.rotary_emb
                saved = rot.inv_freq.clone()
                rot.inv_freq.copy_(ours_m.rotary.inv_freq)
                dc = DynamicCache(config=hf.config)
                for layer in range(cfg.num_layers):
                    dc.update(k0[layer], v0[layer], layer)
                h2 = _with_layer_outputs(
                    hf,
                    hf.model.layers,
                    lambda: hf(input_ids=ids_t, past_key_values=dc, attention_mask=add, position_ids=pos[None]).logits,
                )
                rot.inv_freq.copy_(saved)
                res["tree_fp32_same_rope"] = _compare(*o[0:1], o[1], *h2[0:1], h2[1], tol)
    for stage in ("prefill", "tree"):  # the spread bf16 causes by itself, and ours-bf16 against theirs-fp32
        (o16, h16), (_, h32) = raw[(stage, "bf16")], raw[(stage, "fp32")]
        res[f"{stage}_bf16"]["hf_bf16_vs_hf_fp32"] = _compare(h16[0], h16[1], h32[0], h32[1], 2e-2)
        res[f"{stage}_bf16"]["ours_bf16_vs_hf_fp32"] = _compare(o16[0], o16[1], h32[0], h32[1], 2e-2)
    res.update(context=context, n_prefill=n_prefill, verify_rows=T, backend=backend)
    return res


def minimal_cases(cfg, device, context=4096, n_pending=4, seed=0) -> dict:
    """The two parts of a verify step whose float32 results depend on the implementation, alone and
    against float64, so that a difference between us and `transformers` can be pinned on one side:
      rope: cos/sin at positions context + offsets: ours (`Rotary`) and transformers' rotary embedding;
      attention: the tree block over `context` random keys: our Triton kernel, our PyTorch path, and SDPA
        with the dense boolean mask transformers builds (default backend choice, and the math backend).
    Each entry is the max |x - float64 reference|; `tf32` records the matmul settings in force."""
    import torch.nn.functional as F
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from longspec_lab.ops.attention import attend

    mask, offsets = verify_block(n_pending, device=device)
    T = mask.shape[0]
    pos = (context + offsets)[None]  # [1, T]
    hcfg = hf_llama_config(cfg)
    x = torch.zeros(1, T, cfg.head_dim, device=device)
    ours_cos, ours_sin = Rotary(cfg).to(device)(pos, torch.float32)
    with torch.device(device):
        hf_rot = LlamaRotaryEmbedding(config=hcfg)
    hf_cos, hf_sin = hf_rot(x, pos)
    ang = pos.double()[..., None] * rope_inv_freq(cfg, torch.float64).to(device)  # [1, T, D/2] in float64
    ang = torch.cat([ang, ang], -1)
    rope = {
        "ours": float(max((ours_cos[:, 0] - ang.cos()).abs().max(), (ours_sin[:, 0] - ang.sin()).abs().max())),
        "transformers": float(max((hf_cos - ang.cos()).abs().max(), (hf_sin - ang.sin()).abs().max())),
    }
    g = torch.Generator(device="cpu").manual_seed(seed)
    Hq, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = torch.randn(1, Hq, T, D, generator=g).to(device)
    k = torch.randn(1, Hkv, context + T, D, generator=g).to(device)
    v = torch.randn(1, Hkv, context + T, D, generator=g).to(device)
    full = torch.ones(T, context + T, dtype=torch.bool, device=device)
    full[:, context:] = mask
    rep = Hq // Hkv
    ref = F.scaled_dot_product_attention(  # float64 on the math path: the reference
        q.double(), k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1), attn_mask=full
    )
    err = lambda o: float((o.double() - ref).abs().max())  # noqa: E731
    kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    attn = {
        "ours_triton": err(attend(q, k, v, context, mask, backend="triton")) if device.type == "cuda" else None,
        "ours_torch": err(attend(q, k, v, context, mask, backend="torch")),
        "sdpa_bool_mask": err(F.scaled_dot_product_attention(q, kr, vr, attn_mask=full)),
    }
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        attn["sdpa_bool_mask_math"] = err(F.scaled_dot_product_attention(q, kr, vr, attn_mask=full))
    return {
        "rope_max_abs_err_vs_fp64": rope,
        "attention_max_abs_err_vs_fp64": attn,
        "context": context,
        "rows": T,
        "tf32": {
            "matmul": torch.backends.cuda.matmul.allow_tf32,
            "cudnn": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
        },
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m longspec_lab.bench.verify_cost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--contexts", default="4096,32768,131072", help="comma-separated (default: %(default)s)")
    ap.add_argument("--backends", default="triton,sdpa", help="comma-separated (default: %(default)s)")
    ap.add_argument("--no-hf", action="store_true", help="skip stock transformers")
    ap.add_argument(
        "--compile", default="",
        help="comma-separated contexts at which the first backend's decode and verify, and the draft step, are also "
        "compiled with torch.compile and captured, the form the decoder runs (on an H100: 24-48 s a decode, about "
        "55 s a verify, 233 s for the 128k verify, 19-33 s the draft step; recorded apart as *_compile_s). A run "
        "at 4k and 32k takes about 6 minutes on an H100; give 128k a call of its own",
    )  # fmt: skip
    ap.add_argument(
        "--tau",
        type=float,
        default=5.0,
        help="accepted length used for the projected speedup (default: the embedded pair's measured tree tau, about 5)",
    )
    ap.add_argument(
        "--out", required=True, help="the JSON report (must not exist; rewritten as each context's parts finish)"
    )
    ap.add_argument(
        "--agreement",
        action="store_true",
        help="only compare our logits and each layer with transformers (fp32, bf16, tree mask) and write that",
    )
    ap.add_argument("--agreement-context", type=int, default=4096, help="cached entries for the tree stage")
    ap.add_argument("--small", action="store_true", help="with --agreement: a 4-layer, 256-wide model (CPU)")
    ap.add_argument(
        "--minimal-only", action="store_true",
        help="with --agreement: only the RoPE and attention cases against float64 (seconds, no 8B model)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if Path(args.out).exists():
        ap.exit(2, f"error: {args.out} exists; pick another --out (recorded results are never overwritten)\n")
    if args.agreement:
        return _agreement_main(args)
    if not torch.cuda.is_available():
        raise SystemExit(
            "error: bench.verify_cost needs a CUDA GPU (an 8B-shaped model in bf16 takes 16 GB); "
            "on CPU only --agreement --small runs"
        )
    note = (
        "projected_speedup = tau x t_decode / (t_draft + t_verify + t_commit) with random "
        "weights: a projection from measured step costs, not a measured speedup"
    )
    env = environment("cuda")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def write(rep, complete):
        body = {"schema_version": env["schema_version"], **rep, "projection_note": note, "complete": complete}
        Path(args.out).write_text(json.dumps({**body, "environment": env}, indent=2) + "\n")

    rep = measure(
        [int(c) for c in args.contexts.split(",")],
        args.backends.split(","),
        tau=args.tau,
        with_hf=not args.no_hf,
        compile_at={int(c) for c in args.compile.split(",") if c.strip()},
        on_row=lambda rows: write({"rows": rows}, False),
    )
    write(rep, True)
    for r in rep["rows"]:
        print(json.dumps(r))
    return 0


def _agreement_main(args) -> int:
    import dataclasses

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = PRESETS["llama3-8b"]
    if args.small:
        cfg = dataclasses.replace(
            cfg,
            vocab_size=512,
            hidden_size=256,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            head_dim=64,
            intermediate_size=512,
            bos_token_id=None,
            eos_token_id=None,
        )
    elif dev.type != "cuda":
        raise SystemExit("error: the 8B-shaped agreement check needs a CUDA GPU; add --small to run it on CPU")
    backend = args.backends.split(",")[0] if dev.type == "cuda" else "torch"
    rep = {
        "model": "small" if args.small else "llama3-8b",
        "minimal_cases": minimal_cases(cfg, dev, args.agreement_context),
    }
    if not args.minimal_only:
        rep["hf_agreement"] = hf_agreement(
            random_target(cfg, dev, torch.float32), dev, args.agreement_context, backend=backend
        )
    rep["environment"] = environment(dev)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"schema_version": rep["environment"]["schema_version"], **rep}, indent=2) + "\n"
    )
    print("minimal cases (max |err| vs float64):", json.dumps(rep["minimal_cases"]))
    for stage, r in rep.get("hf_agreement", {}).items():
        if isinstance(r, dict):
            print(
                stage, "logits max|diff|", r["logits_max_abs_diff"], "first layer over tol", r["first_layer_over_tol"]
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
