"""How many kernels each stage of a decoding step launches on the GPU, counted on the CPU.

On a small model a decoding step is bound by kernel launches (docs/GPU_JOBS.md), so the first question about a
change to a stage is how many kernels it will launch. `bench.profile` answers it on the GPU with
`torch.profiler`. This module answers it without one: it compiles each stage function of `decoding/steps.py`
(`greedy_stages`, the functions both decoders run) as the graph path does (fullgraph, static shapes), with
Inductor's Triton backend generating code for the CPU (`torch._inductor.config.cpu_backend = "triton"`: the
scheduler and fusion rules it applies to CUDA), and with the package's own kernels chosen as on the GPU (their
switches set to `on`/`triton`, run by Triton's interpreter). It counts

    generated   the scheduler's kernels (each fused or single node is one Triton kernel on the GPU)
    combo_bound the fewest launches those could become as Inductor's combo kernels (LONGSPEC_COMBO_KERNELS):
                the scheduler's own sets of mutually independent nodes that hold a generated kernel. A bound:
                Inductor's grouping (which skips CPU nodes, so it cannot be run here) may combine fewer
    ours        the calls of the package's registered ops in the graph (each launches one kernel, or two for
                the tree kernel's split and merge: counted as the ops, so add the merges by hand)

and stops before any code is generated (the count is all it needs; nothing is run). Against the H200's profile of
the same code (profile_ab_base_beam_h200.json, 2026-12-05, the one-launch selection and combo kernels off) the
counts agree for the AR step (55 kernels), the default tree's first four levels (23, 16, 16, 16), its verify (59)
and its commit (9); the last level has one kernel more on the H200 (17: its bookkeeping in two kernels, one
here), so the proxy can miss a split that the GPU's heuristics make. Combo kernels are not applied here (Inductor
skips CPU nodes when it groups them): `combo_bound` stands in for them.

    python -m longspec_lab.bench.fusion_proxy --shape 4,16,16,16,16 [--set LONGSPEC_X=value] [--json]
    python -m longspec_lab.bench.fusion_proxy --record data/results/kernel_counts_cpu.json

`--record` counts plain decoding and the default tree under each variant of `RECORD_VARIANTS` (the defaults, and
each switch that changes the counts: the selection in the compiled definition, the head and the selection in one
launch, each level written by add_level instead of its selection, the verify's greedy tail as the compiled
definition instead of one launch), every one in a fresh process, and writes them with the environment: notebook 07
sets them beside the H200's profile.

Taught in: notebooks/07_timing_real_gpu_runs.ipynb
"""

from __future__ import annotations

import argparse
import os
import sys

# the switches that make the CPU take the GPU's kernels (before the package reads them at import)
GPU_SWITCHES = {
    "LONGSPEC_BEAM_SELECT": "on",
    "LONGSPEC_BEAM_WRITE": "on",
    "LONGSPEC_GREEDY_ACCEPT": "on",
    "LONGSPEC_NORM_LINEAR": "on",
    "LONGSPEC_QKV_ROPE": "on",
    "LONGSPEC_ROPE_TABLES": "on",
    "LONGSPEC_MASKED_ATTN": "triton",
    "LONGSPEC_ROW_TOPK": "triton",
}


# what `--record` counts: (name, switches set beyond GPU_SWITCHES), each for plain decoding and the default tree
RECORD_VARIANTS = [
    ("default", {}),
    ("beam_select_off", {"LONGSPEC_BEAM_SELECT": "off"}),
    ("head_select_on", {"LONGSPEC_HEAD_SELECT": "on"}),  # the LM head and the selection in one launch
    ("beam_write_off", {"LONGSPEC_BEAM_WRITE": "off"}),  # each level written by add_level, after its selection
    ("greedy_accept_off", {"LONGSPEC_GREEDY_ACCEPT": "off"}),  # the verify's greedy tail as the compiled definition
]
RECORD_SHAPES = [("ar", "ar"), ("tree-4-16-16-16-16", "4,16,16,16,16")]


# kernels one call of each of our ops launches in a decoding step: the tree kernel's split and merge (every call of
# the embedded pair's steps has several splits), flat_topk's two passes (a level's rows have several chunks)
LAUNCHES_PER_OP = {"longspec.tree_attention_packed.default": 2, "longspec.flat_topk.default": 2}


def launches(counts: dict, combo: bool = False) -> int:
    """The kernels a stage launches from its counts: Inductor's (or their combo bound) and our ops' launches."""
    ours = sum(n * LAUNCHES_PER_OP.get(op, 1) for op, n in counts["ours"].items())
    return ours + counts["combo_bound" if combo else "generated"]


class _Counted(Exception):
    """Raised by the patched scheduler once it has counted: code generation is not needed."""


def count_stage(fn, order: bool = False) -> dict:
    """{"generated": Inductor's kernels, "combo_bound": the fewest they could be as combo kernels, "ours": {op name:
    calls}} for one zero-argument stage function; with `order`, also "order": the launches in the scheduler's
    order, each ["generated", [the graph nodes it fuses]] or ["ours", op name]."""
    import torch
    import torch._inductor.config as inductor_config
    from torch._inductor import scheduler as sched

    from longspec_lab.decoding.graphs import short_op_descriptions  # the decoder's compile, the same description

    found: dict = {}

    def generated(nodes) -> int:
        return sum(isinstance(n, (sched.SchedulerNode, sched.FusedSchedulerNode)) for n in nodes)

    def our_op(n) -> str | None:
        """The registered op's name when the node is a call of one of this package's ops (`longspec.*`)."""
        op = str(getattr(n.node, "op_overload", "")) if isinstance(n, sched.ExternKernelSchedulerNode) else ""
        return op if op.startswith("longspec.") else None

    def codegen(self):
        found["generated"] = generated(self.nodes)
        found["combo_bound"] = sum(1 for group in self._topological_sort_nodes() if generated(group))
        ours: dict = {}
        for op in filter(None, map(our_op, self.nodes)):
            ours[op] = ours.get(op, 0) + 1
        found["ours"] = ours
        if order:
            seq = []
            for n in self.nodes:
                if isinstance(n, (sched.SchedulerNode, sched.FusedSchedulerNode)):
                    names = sorted({o.name for sn in n.get_nodes() for o in getattr(sn.node, "origins", ())})
                    seq.append(["generated", names])
                elif our_op(n):
                    seq.append(["ours", our_op(n)])
            found["order"] = seq
        raise _Counted

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    real = sched.Scheduler.codegen
    sched.Scheduler.codegen = codegen
    try:
        with inductor_config.patch({"cpu_backend": "triton", "fx_graph_cache": False}), short_op_descriptions():
            compiled()
    except Exception as e:  # noqa: BLE001 - Inductor wraps the stop signal in its own error
        if "generated" not in found:
            raise RuntimeError(f"the stage did not reach Inductor's scheduler: {type(e).__name__}: {e}") from e
    finally:
        sched.Scheduler.codegen = real
    return found


def count_step(shape, prompt_tokens: int = 64, order: bool = False) -> dict:
    """{stage name: count_stage + its `launches` and `launches_combo`} for every stage of one greedy step of the
    embedded pair (float32, CPU) with tree `shape` (a list of widths, or None for plain decoding), after a prefill
    of `prompt_tokens` tokens."""
    import torch

    from longspec_lab.decoding import steps
    from longspec_lab.decoding.graphs import default_capacity
    from longspec_lab.models.pair import load_pair
    from longspec_lab.spec.tree import TreeShape

    target, draft, _ = load_pair(device="cpu", dtype="float32", attention_backend="triton")
    tree = TreeShape.of(shape) if shape is not None else None
    with torch.no_grad():
        st = steps.DecodeState(target, draft, tree, default_capacity(target), "triton")
        prompt = torch.arange(3, 3 + prompt_tokens) % target.config.vocab_size
        steps.prefill(st, prompt)
        counts = {name: count_stage(fn, order) for name, fn in steps.greedy_stages(st)}
    for c in counts.values():
        c.update(launches=launches(c), launches_combo=launches(c, combo=True))
    return counts


def record(path: str) -> dict:
    """Run the counts of RECORD_VARIANTS x RECORD_SHAPES, each in a fresh process, and write them to `path` with
    the environment (`provenance.stamp`). Returns the report."""
    import json
    import subprocess

    from longspec_lab.provenance import stamp, write_new_json

    report: dict = {"switches_always": GPU_SWITCHES, "variants": {}}
    for name, switches in RECORD_VARIANTS:
        report["variants"][name] = {"switches": switches, "methods": {}}
        for method, shape in RECORD_SHAPES:
            args = ["--shape", shape, "--json"] + [f"--set={k}={v}" for k, v in switches.items()]
            print(f"counting {method} with {switches or 'the defaults'} ...", flush=True)
            run = subprocess.run(
                [sys.executable, "-m", "longspec_lab.bench.fusion_proxy", *args],
                capture_output=True, text=True, timeout=900,
            )  # fmt: skip
            if run.returncode != 0:
                raise RuntimeError(f"counting {method} ({name}) failed:\n{run.stderr[-2000:]}")
            report["variants"][name]["methods"][method] = json.loads(run.stdout.strip().splitlines()[-1])
    out = stamp(report, command="python -m longspec_lab.bench.fusion_proxy --record " + path)
    write_new_json(path, out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m longspec_lab.bench.fusion_proxy",
        description=(
            "Count the kernels each stage of a greedy decoding step will launch on a GPU, without one: every "
            "stage is compiled as the graph path compiles it, with Inductor's Triton backend scheduling for the "
            "CPU and the package's kernels switched on as on the GPU; the scheduler's kernels are counted and "
            "nothing runs. Needs TRITON_INTERPRET=1 (set here when missing) and takes a minute or two."
        ),
    )
    ap.add_argument(
        "--shape", default="4,16,16,16,16", help="tree widths, comma-separated, or 'ar' (default: %(default)s)"
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="LONGSPEC_X=value",
        help="a switch to set before counting (repeatable), e.g. LONGSPEC_BEAM_SELECT=on",
    )
    ap.add_argument("--json", action="store_true", help="print the counts as one JSON object instead of a table")
    ap.add_argument(
        "--list",
        metavar="STAGE",
        help="also list one stage's launches in order (e.g. draft2, verify, commit): each of Inductor's kernels with "
        "the graph nodes it fuses, each of our ops by name",
    )
    ap.add_argument(
        "--record",
        metavar="F",
        help="count plain decoding and the default tree under each recorded variant (the defaults, "
        "LONGSPEC_BEAM_SELECT=off), each in a fresh process (about two minutes), and write them to F (must not exist)",
    )
    a = ap.parse_args(argv)
    if a.record:
        if os.path.exists(a.record):
            ap.exit(2, f"error: {a.record} exists; pick another path or remove it first\n")
        record(a.record)
        return 0
    try:
        shape = None if a.shape == "ar" else [int(w) for w in a.shape.split(",")]
    except ValueError:
        ap.error(f"--shape takes comma-separated widths or 'ar', got {a.shape!r}")
    extra = {}
    for item in a.set:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("LONGSPEC_"):
            ap.error(f"--set takes LONGSPEC_NAME=value, got {item!r}")
        extra[name] = value
    if "longspec_lab.kernels.tree_attention" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        ap.exit(2, "error: run it in a fresh process: the kernels were imported without TRITON_INTERPRET=1\n")
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.update({**GPU_SWITCHES, **extra})
    counts = count_step(shape, order=bool(a.list))
    if a.list and a.list not in counts:
        ap.exit(2, f"error: --list {a.list!r} is not a stage of this step; the stages are {', '.join(counts)}\n")
    if a.json:
        import json

        print(json.dumps(counts))
        return 0
    for name, c in counts.items():
        ours = ", ".join(f"{k.split('.')[-2] if '.' in k else k} x{v}" for k, v in sorted(c["ours"].items()))
        print(f"{name:8s} generated {c['generated']:3d} (combo bound {c['combo_bound']:3d})   ours: {ours or '-'}")
    if a.list:
        print(f"\n{a.list}, launch by launch:")
        for i, (kind, what) in enumerate(counts[a.list]["order"], 1):
            text = ", ".join(what[:12]) + (" ..." if len(what) > 12 else "") if kind == "generated" else what
            print(f"{i:3d}  {kind:9s}  {text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
