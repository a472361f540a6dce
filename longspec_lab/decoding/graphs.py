"""The graph path: the eager loop's own stage functions, compiled and captured in CUDA graphs.

gpt-fast's rule: the fast path is the readable path, captured. `GraphDecoder` holds buffers and
capture and nothing of the algorithm: for each method and tree shape it builds one
`steps.DecodeState` (static shapes, device-resident bookkeeping) and the list of stage functions of
`steps.greedy_stages`, the very functions `SpecDecoder` calls. Then, on CUDA:

  1. each stage is compiled with `torch.compile(fullgraph=True, dynamic=False)` (Inductor fuses the
     elementwise work and the small reductions; the Triton tree kernel is a registered op);
  2. every stage is warmed up on a side stream (compilation, autotuning, allocator);
  3. each stage is recorded in its own CUDA graph, and a greedy step's stages once more, in order, in one
     graph (LONGSPEC_STEP_GRAPH, default on): one replay per step, or one per stage when timing stages.

The host replays bursts of steps and reads the output length once per burst (never more steps than
can be afforded without passing max_new_tokens by more than one step). Compilation and capture are
timed separately (`compile_seconds`), never inside a timed generation.

On the CPU (tests) the same stages run without graphs and, by default, without compilation: the
twin tests check that a compiled stage gives the eager stage's outputs. Sampling rules walk the tree
with host control flow: for target-sample and naive-topk the draft and verification stages are
replayed, the rule walks the tree on the host, and the commit is replayed; rrs and chain draw the tree
from a generator inside the draft stages, so the graph decoder refuses them and names `SpecDecoder`.

Taught in: notebooks/07_timing_real_gpu_runs.ipynb.
"""

from __future__ import annotations

import contextlib
import operator
import os
import time

import torch

from longspec_lab.decoding import steps
from longspec_lab.decoding.eager import DEFAULT_GAMMA, SpecDecoder
from longspec_lab.ops.sampling import probs_from_logits, sample_categorical
from longspec_lab.ops.switches import checked
from longspec_lab.spec.trace import GenerationResult, StepRecord
from longspec_lab.spec.tree import DEFAULT_TREE_SHAPE, TreeShape
from longspec_lab.spec.verify import split_stats

# We capture the graphs ourselves, one per stage, so Inductor's own cudagraphs stay off. On the H200 the
# AR step compiled in "default" mode replays in 404 us with 130 kernels; "max-autotune-no-cudagraphs"
# gives 425 us with 122 kernels after a much longer compile (data/results/h200_speed.log, 2026-12-02).
COMPILE_MODE = os.environ.get("LONGSPEC_COMPILE_MODE", "default")
# LONGSPEC_STEP_GRAPH: a greedy draft-verify-commit step replayed as ONE CUDA graph ("on") instead of one graph
# per stage ("off"). Runs with per-stage CUDA events (stage_timing) always replay the per-stage graphs, which
# are captured either way. One graph per step saves each stage boundary's graph launch on the device.
STEP_GRAPH = os.environ.get("LONGSPEC_STEP_GRAPH", "on")
# LONGSPEC_COMBO_KERNELS ("on", the default; "off"): the stages are compiled with
# Inductor's combo kernels, which launch generated kernels that do not depend on one another as ONE kernel (each
# program runs one of them). A step's bookkeeping is many such kernels: counted on the CPU
# (`python -m longspec_lab.bench.fusion_proxy`, the `combo_bound` column: Inductor's kernels grouped by the
# scheduler's own independent sets), the default tree's first draft level 11 -> 5, the verify's 9 -> 7, the
# commit's 9 -> 3, a chain level's 6 -> 4, the AR step's 5 -> 3: at most 14 launches fewer per default-tree step,
# 2 per AR step. On the H200 (2026-12-05, one call, data/results/e2e_ab_beam_combo_h200.log) Inductor met the bound
# but for one verify kernel (first level 23 -> 17, verify 59 -> 58, commit 9 -> 3, AR 55 -> 53 kernels): the
# default tree 12,851 -> 13,385 tokens/s, chain gamma 5 13,933 -> 14,667, AR 7,666 -> 7,736.
COMBO_KERNELS = os.environ.get("LONGSPEC_COMBO_KERNELS", "on")


def capture(fns, warmup: int = 3) -> list[torch.cuda.CUDAGraph]:
    """Run the functions in order `warmup` times on a side stream (compilation, autotuning, allocator), then
    record each in its own CUDA graph (`kernels.launch.capture_calls` with each=True). Replay with
    `graph.replay()`."""
    from longspec_lab.kernels.launch import capture_calls  # CUDA only, where Triton comes with torch

    return capture_calls(fns, warmup, each=True)


def run_in_order(fns):
    """One function that calls fns in order (the stages of a step, recorded together in one graph)."""

    def run():
        for fn in fns:
            fn()

    return run


def allow_many_graphs() -> None:
    """Every (stage function, tree shape, level) is its own compiled graph of the same Python function:
    raise Dynamo's recompile limits (8 per function by default) so that none falls back or fails."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 4096)


def default_capacity(target) -> int:
    """GraphDecoder's cache slots when none are asked for: the model's context plus room for two default
    trees. Other code that compiles the same stages (bench.profile) uses it, so the graphs are the same."""
    return target.config.context_length + 2 * DEFAULT_TREE_SHAPE.num_nodes


def brief_operator_str(target, args, kwargs) -> str:
    """Inductor's description of an op call (`OperatorIssue.operator_str`), with each argument named, not printed:
    an IR node by its type and buffer name, a list by its length, a number or string as itself.

    torch 2.11 builds that description for every op it lowers by an implicit fallback (each of this package's ops,
    on its first call in a process), for a log line, whether or not the line is shown (2.13 builds it only when it
    is). Printed in full, an argument is its IR node with all of its inputs, recursively: the greedy tail's logits
    come out of the verify's 50 launches, and on an H100 that print had not ended after 170 s, while the same stage
    compiles in 23 s with this one (data/results/e2e_ab_beam_write_h100.log)."""

    def name(a) -> str:
        if a is None or isinstance(a, (bool, int, float, str)):
            return repr(a)
        if isinstance(a, (list, tuple)):
            return f"{type(a).__name__} of {len(a)}"
        get_name = getattr(a, "get_name", None)
        try:
            buf = get_name() if callable(get_name) else None
        except Exception:  # noqa: BLE001 - an IR node without a buffer yet
            buf = None
        return f"{type(a).__name__}({buf})" if buf else type(a).__name__

    lines = [f"target: {target}"] + [f"args[{i}]: {name(a)}" for i, a in enumerate(args)]
    lines += [f"kwargs[{k!r}]: {name(v)}" for k, v in (kwargs or {}).items()]
    return "\n".join("  " + line for line in lines)


@contextlib.contextmanager
def short_op_descriptions():
    """While inside, Inductor describes op calls with `brief_operator_str` (where its `OperatorIssue` has the
    method, which every supported torch does)."""
    from unittest import mock

    from torch._inductor import exc as inductor_exc

    issue = getattr(inductor_exc, "OperatorIssue", None)
    if issue is None or not hasattr(issue, "operator_str"):
        yield
        return
    with mock.patch.object(issue, "operator_str", staticmethod(brief_operator_str)):
        yield


def compile_stage(fn, mode: str = COMPILE_MODE):
    """`torch.compile(fn)` as the graph path compiles a stage: the whole graph (fullgraph), static shapes, `mode`.
    Where the package's kernels launch with PDL (a Hopper GPU, LONGSPEC_PDL=auto: kernels/launch.py), Inductor
    generates its kernels with PDL too, and with LONGSPEC_COMBO_KERNELS=on it groups independent kernels into
    combo kernels. Inductor's description of an op call is the short one (`brief_operator_str`). All of this is
    patched while a call may compile (the first, and any recompilation), which leaves the process's own Inductor
    settings alone."""
    from longspec_lab.kernels.launch import inductor_options

    allow_many_graphs()
    compiled = torch.compile(fn, fullgraph=True, dynamic=False, mode=mode)
    options = inductor_options("cuda") if torch.cuda.is_available() else {}
    if checked("LONGSPEC_COMBO_KERNELS", COMBO_KERNELS, ("on", "off")) == "on":
        options = {**options, "combo_kernels": True}

    def run(*args, **kwargs):
        with torch._inductor.config.patch(options), short_op_descriptions():
            return compiled(*args, **kwargs)

    return run


class Stage:
    """One stage function: called as is, compiled, or replayed from its CUDA graph once captured."""

    def __init__(self, name: str, fn, compile_mode: str | None = None):
        self.name, self.eager_fn = name, fn
        self.fn = fn if compile_mode is None else compile_stage(fn, compile_mode)
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self):
        if self.graph is None:
            self.fn()
        else:
            self.graph.replay()


class GraphDecoder(SpecDecoder):
    """Greedy ar / chain / tree decoding with static shapes; compiled and CUDA-graph-captured on a GPU.

    graphs / compile: None = on for CUDA, off on the CPU. capacity: cache slots (default: the model's
    context plus room for two default trees). stage_timing: CUDA events around every stage. step_graph: a
    greedy step replayed as one graph (None: LONGSPEC_STEP_GRAPH, default on); the stages' own graphs serve
    stage_timing."""

    def __init__(
        self,
        target,
        draft=None,
        backend: str | None = None,
        tokenizer=None,
        capacity: int | None = None,
        graphs: bool | None = None,
        compile: bool | None = None,
        compile_mode: str = COMPILE_MODE,
        stage_timing: bool = False,
        batch_invariant: bool | int = False,
        step_graph: bool | None = None,
    ):
        super().__init__(target, draft, backend, tokenizer, batch_invariant=batch_invariant)
        self.device = target.device
        cuda = self.device.type == "cuda"
        self.graphs = cuda if graphs is None else bool(graphs)
        self.compile = cuda if compile is None else bool(compile)
        if self.graphs and not cuda:
            raise ValueError("CUDA graphs need a CUDA device; use graphs=False on the CPU")
        self.compile_mode = compile_mode
        self.capacity = capacity or default_capacity(target)
        self.max_cache_len = self.capacity
        self.stage_timing = stage_timing and cuda
        self.compile_seconds: dict[str, float] = {}
        self._plans: dict = {}
        if step_graph is None:
            step_graph = checked("LONGSPEC_STEP_GRAPH", STEP_GRAPH, ("on", "off")) == "on"
        self.step_graph = bool(step_graph)
        self._step_stages: dict = {}  # plan key -> [Stage]: the whole greedy step in one graph

    # ------------------------------------------------------------------ buffers and capture
    def plan(self, method: str, shape: TreeShape | None, sampled: bool = False, params=None):
        """(DecodeState, [Stage] before the host, [Stage] after it) for a method and shape, built, compiled
        and captured once. Greedy steps run entirely on the device (nothing after the host); sampled steps
        stop after the verification pass for the rule's host walk (`params`: naive-topk's recorded q)."""
        key = self._plan_key(method, shape, sampled, params)
        if key not in self._plans:
            t0 = time.perf_counter()
            st = steps.DecodeState(
                self.target, self.draft, shape, self.capacity, self.backend, keep_q=sampled, rows=self.rows
            )
            mode = self.compile_mode if self.compile else None
            before, after = steps.sampling_stages(st, params) if sampled else (steps.greedy_stages(st), [])
            before, after = ([Stage(name, fn, mode) for name, fn in part] for part in (before, after))
            if self.graphs:
                self._capture(st, before + after)
                if self.step_graph and not sampled and len(before) > 1:
                    step = Stage("step", run_in_order([stage.fn for stage in before]))
                    self._capture(st, [step])
                    self._step_stages[key] = [step]
            self._plans[key] = (st, before, after)
            self.compile_seconds[f"{method}:{shape or ''}{':sampled' if sampled else ''}"] = time.perf_counter() - t0
        return self._plans[key]

    @staticmethod
    def _plan_key(method: str, shape: TreeShape | None, sampled: bool, params) -> tuple:
        return (method, shape.widths if shape is not None else None, sampled, params)

    @staticmethod
    def _capture(st: steps.DecodeState, stages: list[Stage]) -> None:
        """Warm every stage up in order on a side stream (compilation, autotuning, allocator), then record
        each one in its own CUDA graph. The state this leaves is garbage; `generate` resets it."""
        st.P.fill_(1)  # a valid state for the warm-up: one committed token, one pending token
        if st.shape is not None:
            st.pend_n.fill_(1)
            st.ring.seen.fill_(1)
        for stage, g in zip(stages, capture([stage.fn for stage in stages])):
            stage.graph = g

    def _replay(self, stages: list[Stage], events: dict) -> None:
        for stage in stages:
            if self.stage_timing:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                stage()
                b.record()
                events.setdefault(stage.name, []).append((a, b))
            else:
                stage()

    # ------------------------------------------------------------------ the loop
    @torch.inference_mode()
    def generate(
        self,
        prompt_ids,
        method: str = "tree",
        max_new_tokens: int = 64,
        tree_shape=DEFAULT_TREE_SHAPE,
        gamma: int = DEFAULT_GAMMA,
        trace: bool = False,
        stop_at_eos: bool = True,
        **sampling,
    ) -> GenerationResult:
        """SpecDecoder.generate's arguments. Greedy steps run as bursts of captured stages; a sampled step
        (target-sample, naive-topk) replays the draft and verification stages, walks the tree on the host
        with the rule, then replays the commit. rrs and chain draw the tree itself from a generator
        inside the draft stages: they raise, naming SpecDecoder."""
        keys = ("verify", "temperature", "top_k", "top_p", "do_sample")
        unknown = set(sampling) - set(keys) - {"seed", "generator"}
        if unknown:
            raise TypeError(f"generate() got unexpected arguments {sorted(unknown)}")
        args = [sampling.get(k, d) for k, d in zip(keys, (None, 0.0, None, None, None))]
        prompt, shape, verify, params, _ = self._check_call(
            prompt_ids, method, max_new_tokens, tree_shape, gamma, *args
        )
        max_new_tokens = operator.index(max_new_tokens)  # checked above: a numpy or 0-d integer becomes an int
        if verify in ("rrs", "chain"):
            raise ValueError(
                f"GraphDecoder does not run verify={verify!r}: its tree is drawn from a random generator inside "
                "the draft stages, which a CUDA graph would replay with the same draws; use SpecDecoder, which "
                "runs the same stage functions eagerly"
            )
        sampled = verify != "greedy"
        _, gen, seed = self._sampler(verify, params, sampling.get("seed"), sampling.get("generator"))
        pick = (lambda lg: sample_categorical(probs_from_logits(lg, params), gen)[None]) if sampled else None
        st, before, after = self.plan(method, shape, sampled, params if verify == "naive-topk" else None)
        if not self.stage_timing:  # one replay per step where the whole step was captured as one graph
            before = self._step_stages.get(self._plan_key(method, shape, sampled, None), before)
        sync = (lambda: torch.cuda.synchronize(self.device)) if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        steps.prefill(st, prompt, pick)
        sync()
        t_prefill = time.perf_counter() - t0
        events: dict[str, list] = {}
        res = GenerationResult(
            method, [], 1, [], {}, 0.0,
            tree_shape=list(shape.widths) if method == "tree" else None,
            gamma=gamma if method == "chain" else None,
            verify=verify, seed=seed if sampled else None, **params.as_dict(),
        )  # fmt: skip
        eos = set(self.target.config.eos_ids) if stop_at_eos else set()
        produced, per_step = 1, st.D + 1
        done = max_new_tokens <= 1 or int(st.out[0]) in eos
        while not done:
            burst = 1 if trace or sampled else max(1, (max_new_tokens - produced) // per_step)
            for _ in range(burst):
                prefix_len = int(st.P) if trace else 0
                self._replay(before, events)
                if sampled and shape is None:
                    steps.ar_choose(st, st.logits[0], pick)
                elif sampled:
                    result, tree, preds = steps.sample_accept(st, st.logits, verify, params, gen)
                self._replay(after, events)
            start, produced = produced, int(st.out_len)  # the one host sync per burst
            if produced <= start:  # every step emits at least one token: a stage wrote nothing, so this would spin
                raise RuntimeError(
                    f"{method} decoding emitted no token in {burst} step(s) (output length stuck at {produced}): a "
                    "stage did not write its outputs on this device. Retry with the fused kernels off "
                    "(LONGSPEC_GREEDY_ACCEPT=off LONGSPEC_BEAM_WRITE=off) or with SpecDecoder, and report it"
                )
            if trace and shape is not None:
                if not sampled:
                    tree, preds, result = steps.step_outcome(st)
                new = self._cut(st.out[start:produced].tolist(), max_new_tokens - start)[0] if stop_at_eos else (
                    st.out[start : min(produced, max_new_tokens)].tolist())  # fmt: skip
                text = self._text(st.out[: start + len(new)].tolist())
                res.trace.append(StepRecord(len(res.trace), prefix_len, tree.to("cpu"), preds.cpu(), result, new, text))
            if eos:
                done = any(x in eos for x in st.out[:produced].tolist())
            done = done or produced >= max_new_tokens
        sync()
        res.wall_seconds = time.perf_counter() - t0
        n_steps = int(st.steps)
        toks, stopped = self._cut(st.out[:produced].tolist(), max_new_tokens) if stop_at_eos else (
            st.out[: min(produced, max_new_tokens)].tolist(), False)  # fmt: skip
        lengths, total = [], 1
        for n in st.lengths[:n_steps].tolist():  # the last step may have been cut
            if total >= len(toks):
                break
            lengths.append(min(n, len(toks) - total))
            total += lengths[-1]
        res.new_tokens, res.stopped_at_eos, res.accepted_lengths = toks, stopped, lengths
        res.target_calls = 1 + len(lengths)
        res.draft_calls = len(lengths) * st.D
        if shape is not None:
            res.add_acceptance(split_stats(st.stats.tolist(), st.D, st.R))
        res.stage_seconds = {"prefill": t_prefill}
        for name, evs in events.items():  # per-level draft times also summed into "draft"
            secs = sum(a.elapsed_time(b) for a, b in evs) / 1e3
            res.stage_seconds[name] = secs
            if name.startswith("draft"):
                res.stage_seconds["draft"] = res.stage_seconds.get("draft", 0.0) + secs
        return res


def check_against_eager(prompts, target, draft, max_new_tokens=64, **graph_kw) -> dict:
    """Run the graph path and the eager loop on the same prompts; report whether the tokens agree."""
    cases = [("ar", {}), ("chain", {"gamma": 4}), ("tree", {}), ("tree", {"tree_shape": [1, 3, 9]})]
    eager, fast = SpecDecoder(target, draft), GraphDecoder(target, draft, **graph_kw)
    rows = []
    for ids in prompts:
        for method, kw in cases:
            a = eager.generate(ids, method=method, max_new_tokens=max_new_tokens, stop_at_eos=False, **kw)
            b = fast.generate(ids, method=method, max_new_tokens=max_new_tokens, stop_at_eos=False, **kw)
            rows.append(
                {
                    "method": method,
                    **kw,
                    "prompt_tokens": len(ids),
                    "identical": a.new_tokens == b.new_tokens,
                    "same_accepted_lengths": a.accepted_lengths == b.accepted_lengths,
                    "target_calls": [a.target_calls, b.target_calls],
                }
            )
    return {
        "rows": rows,
        "all_identical": all(r["identical"] and r["same_accepted_lengths"] for r in rows),
        "graphs": fast.graphs,
        "compile": fast.compile,
        "compile_seconds": fast.compile_seconds,
        "dtype": str(target.dtype).replace("torch.", ""),
        "backend": fast.backend,
    }


def main(argv=None) -> int:
    """python -m longspec_lab.decoding.graphs: check that the graph path gives the eager loop's tokens."""
    import argparse
    import json

    from longspec_lab.models.pair import load_pair
    from longspec_lab.paths import load_prompts
    from longspec_lab.provenance import stamp

    ap = argparse.ArgumentParser(
        prog="python -m longspec_lab.decoding.graphs",
        description="Check that the compiled, graph-captured path gives the eager loop's tokens on this device.",
    )
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--dtype", default="float32", help="float32 (bit-exact comparison) or bfloat16")
    ap.add_argument("--no-compile", action="store_true", help="capture the stages without torch.compile")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", default=None, help="write the report (JSON) here")
    a = ap.parse_args(argv)
    tgt, drf, tk = load_pair(device=a.device, dtype=a.dtype)
    prompts = [tk.encode(p["text"]) for p in load_prompts(min_tokens=2000)[:2]]
    kw = {"compile": False} if a.no_compile else {}
    rep = stamp(check_against_eager(prompts, tgt, drf, a.max_new_tokens, **kw), tgt.device, tgt.dtype)
    print(json.dumps(rep, indent=1))
    if a.out:
        with open(a.out, "x") as fh:
            json.dump(rep, fh, indent=2)
    return 0 if rep["all_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
