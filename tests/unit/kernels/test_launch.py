"""Programmatic dependent launch (kernels/launch.py): the switch, and the rule every kernel must keep.

A kernel launched with PDL may start before the one in front of it has finished, so each kernel of the package has
to wait (`gdc_wait`) before it touches memory, in every program, and only then let its successor start. A kernel
that skipped the gate would race on the GPU alone; the CPU interpreter runs with PDL off and would never show it.
So the rule is checked on the source: every launched kernel opens with the gate, and every launch passes
`launch_args`, which keeps the kernel's USE_PDL and Triton's launch_pdl equal. compile_check (tests/integration)
then finds griddepcontrol.wait in every compiled variant's PTX."""

import ast
from pathlib import Path

import pytest
import torch

from longspec_lab.kernels import launch

KERNELS = Path(launch.__file__).resolve().parent


# What a kernel may read before its PDL wait, by kernel: only operands that no kernel of a decoding step writes.
# norm_linear's weight and norm weight (and the integers that place its tile) are parameters: reading them early
# overlaps their load with the kernel before (LONGSPEC_WEIGHT_FIRST).
READ_BEFORE_WAIT = {  # the weights (parameters) each kernel reads before its wait, and the sizes that bound them
    "_norm_linear_kernel": {"W", "NW", "stride_wn", "N", "K"},
    "_head_select_kernel": {"HEAD", "stride_w", "V", "K"},  # the draft's LM head
    "_stream_linear_kernel": {"W", "NW", "stride_wn", "N", "K", "K_STEPS"},  # its first step's weight tiles
}


def _jit_functions(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and any(ast.unparse(d) == "triton.jit" for d in node.decorator_list):
            yield node


def _launches(tree):
    """(kernel name, call) for each `name[grid](...)` launch in a module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
            yield ast.unparse(node.func.value), node


def _sources():
    return {p.name: ast.parse(p.read_text()) for p in sorted(KERNELS.glob("*.py"))}


def test_pdl_is_off_on_the_cpu_and_under_the_interpreter():
    assert launch.pdl_enabled("cpu") is False
    assert launch.launch_args(torch.device("cpu")) == {"USE_PDL": False, "launch_pdl": False}
    assert launch.inductor_options("cpu") == {}


def test_an_unknown_switch_value_names_the_variable_and_the_choices(monkeypatch):
    monkeypatch.setattr(launch, "PDL", "yes")
    with pytest.raises(ValueError, match=r"LONGSPEC_PDL='yes' is not one of auto, off"):
        launch.pdl_enabled("cpu")


def test_every_launched_kernel_opens_with_the_pdl_gate():
    sources = _sources()
    launched = {name.lstrip("_").removesuffix("_plain") for tree in sources.values() for name, _ in _launches(tree)}
    kernels = {}
    for tree in sources.values():
        for fn in _jit_functions(tree):
            kernels[fn.name] = fn
    # the launches name kernels directly, or `kern` / `_split_kernel` (the autotuned split kernel)
    assert {"tree_attn_merge_kernel", "norm_linear_kernel", "row_topk_kernel", "masked_attn_kernel"} <= launched
    gated = {name for name, fn in kernels.items() if "USE_PDL" in [a.arg for a in fn.args.args]}
    assert gated == {name for name in kernels if name.endswith("_kernel")}, "a kernel without the USE_PDL gate"
    for name in gated:
        fn = kernels[name]
        body = fn.body
        if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body = body[1:]  # the docstring
        at = next(i for i, st in enumerate(body) if isinstance(st, ast.If) and ast.unparse(st.test) == "USE_PDL")
        before, gate = body[:at], body[at]
        calls = [ast.unparse(s) for s in gate.body]
        assert calls == ["tl.extra.cuda.gdc_wait()", "tl.extra.cuda.gdc_launch_dependents()"], (name, calls)
        # Before the wait a kernel may read only what no kernel of a step writes (a weight: a parameter), and only
        # where it says so; everything else it touches comes after the gate.
        args = {a.arg for a in fn.args.args}
        constexpr = {
            a.arg for a in fn.args.args if a.annotation is not None and "constexpr" in ast.unparse(a.annotation)
        }
        touched = {n.id for st in before for n in ast.walk(st) if isinstance(n, ast.Name)} & args
        allowed = READ_BEFORE_WAIT.get(name, set())
        assert touched - constexpr <= allowed, f"{name} reads {sorted(touched - constexpr - allowed)} before the wait"
        assert not before or allowed, f"{name}: statements before the gate"


def test_every_launch_passes_launch_args():
    n = 0
    for fname, tree in _sources().items():
        for name, call in _launches(tree):
            splats = [ast.unparse(k.value) for k in call.keywords if k.arg is None]
            assert any(s.startswith("launch_args(") for s in splats), f"{fname}: {name}[...] without **launch_args"
            n += 1
    assert n >= 10  # tree split (interpreted and compiled), merge, norm_linear x 3, rope, top-k x 2, masked, ordered


def test_compiled_stages_carry_inductors_pdl_setting_only_where_pdl_is_on(monkeypatch):
    """The decoder's stages are compiled with Inductor's `triton.enable_pdl` exactly when this package's kernels
    launch with PDL, so that a generated kernel between two of ours waits for its inputs as ours do. The setting is
    patched around the compiled call (when Inductor compiles), and the process's own config is left as it was."""
    import torch._inductor.config as inductor_config

    from longspec_lab.decoding import graphs

    if not hasattr(inductor_config.triton, "enable_pdl"):
        pytest.skip("this PyTorch's Inductor generates no PDL code")
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: lambda: seen.append(inductor_config.triton.enable_pdl))
    before = inductor_config.triton.enable_pdl
    graphs.compile_stage(lambda: None, "default")()  # a CPU machine: no PDL
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(launch, "pdl_enabled", lambda device: torch.device(device).type == "cuda")
    graphs.compile_stage(lambda: None, "default")()  # a Hopper GPU
    monkeypatch.setattr(launch, "PDL", "off")
    monkeypatch.setattr(launch, "pdl_enabled", lambda device: False)
    graphs.compile_stage(lambda: None, "default")()  # LONGSPEC_PDL=off
    assert seen == [before, True, before] and inductor_config.triton.enable_pdl == before


def test_combo_kernels_switch_reaches_inductor_only_when_on(monkeypatch):
    """LONGSPEC_COMBO_KERNELS=on (the default) compiles the stages with Inductor's combo kernels (patched around the
    call, the process's config left alone); off leaves them out; another value is refused, naming the fix."""
    import torch._inductor.config as inductor_config

    from longspec_lab.decoding import graphs

    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: lambda: seen.append(inductor_config.combo_kernels))
    before = inductor_config.combo_kernels
    monkeypatch.setattr(graphs, "COMBO_KERNELS", "off")
    graphs.compile_stage(lambda: None, "default")()
    monkeypatch.setattr(graphs, "COMBO_KERNELS", "on")
    graphs.compile_stage(lambda: None, "default")()
    assert seen == [before, True] and inductor_config.combo_kernels == before
    monkeypatch.setattr(graphs, "COMBO_KERNELS", "yes")
    with pytest.raises(ValueError, match="LONGSPEC_COMBO_KERNELS='yes' is not one of on, off"):
        graphs.compile_stage(lambda: None, "default")


def test_pdl_needs_a_triton_that_offers_it(monkeypatch):
    """On a Hopper GPU with a Triton too old for the gate, the kernels launch plainly instead of failing to compile:
    the decision follows the installed Triton (this machine's has it), and a Triton without it turns PDL off."""
    import triton.language.extra.cuda as cuda_ext

    monkeypatch.setattr(launch, "_interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    monkeypatch.setattr(launch, "_CAPABLE", {})
    assert launch.triton_has_pdl() and launch.pdl_enabled("cuda")
    monkeypatch.setattr(launch, "_CAPABLE", {})
    monkeypatch.delattr(cuda_ext, "gdc_wait")
    assert not launch.triton_has_pdl() and not launch.pdl_enabled("cuda")
    assert launch.launch_args("cuda") == {"USE_PDL": False, "launch_pdl": False}


def test_launch_args_can_force_either_form_where_the_device_can(monkeypatch):
    """`pdl=` (the boundary-cost timing launches the tick both ways): False is plain whatever the switch says, True
    is PDL only where the device can, None follows the switch."""
    monkeypatch.setattr(launch, "_interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(launch, "_CAPABLE", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    monkeypatch.setattr(launch, "PDL", "off")
    assert launch.launch_args("cuda") == {"USE_PDL": False, "launch_pdl": False}
    assert launch.launch_args("cuda", pdl=True) == {"USE_PDL": True, "launch_pdl": True}
    monkeypatch.setattr(launch, "PDL", "auto")
    assert launch.launch_args("cuda", pdl=False) == {"USE_PDL": False, "launch_pdl": False}
    assert launch.launch_args("cpu", pdl=True) == {"USE_PDL": False, "launch_pdl": False}
    monkeypatch.setattr(launch, "_CAPABLE", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (8, 0))  # an A100: never
    assert launch.launch_args("cuda", pdl=True) == {"USE_PDL": False, "launch_pdl": False}


def test_the_tick_adds_one_as_its_reference_does():
    """The boundary-cost unit is a real kernel (interpreted here): one launch adds one, as `tick_reference`."""
    x = torch.tensor([41], dtype=torch.int32)
    for pdl in (None, False, True):
        want = launch.tick_reference(x)
        assert launch.tick(x, pdl=pdl) is x and torch.equal(x, want)
    assert int(x) == 44
    with pytest.raises(ValueError, match="one-element"):
        launch.tick(torch.zeros(2, dtype=torch.int32))


def test_the_boundary_cost_needs_a_gpu_and_says_so(capsys):
    with pytest.raises(RuntimeError, match="a GPU measurement"):
        launch.boundary_cost_us("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as e:
            launch.main([])
        assert e.value.code == 2 and "no CUDA device" in capsys.readouterr().err


def _counters():
    return torch.zeros(3 + launch.MAX_PROGRAMS, dtype=torch.int32)


@pytest.mark.parametrize("sync", [launch.SYNC_NONE, launch.SYNC_BARRIER, launch.SYNC_FLAG])
def test_phases_of_one_program_equal_the_reference_and_leave_the_counters_at_zero(sync):
    """The persistent kernel's phases (interpreted): each reads what the phase before wrote, as `phases_reference`,
    launch after launch; with one program every wait passes at once, none gives up, and the last program out zeroes
    the counters and flags, so the next launch (a graph replay) starts from zero."""
    x = torch.zeros(6, 1, dtype=torch.int32)
    x[0, 0] = 41
    counters = _counters()
    for _ in range(2):
        assert launch.phases(x, counters, sync) is x
        assert torch.equal(x, launch.phases_reference(x[0], 5)) and x[-1, 0] == 46
        assert int(counters.abs().sum()) == 0


@pytest.mark.parametrize("sync", [launch.SYNC_BARRIER, launch.SYNC_FLAG])
def test_a_wait_that_cannot_be_met_gives_up_and_says_so(sync, monkeypatch):
    """The interpreter runs programs one after another, so the first of three waits for programs that have not
    started: after SPIN_LIMIT polls it raises the error flag instead of hanging, and the result differs from the
    reference. The counters and flags are still reset by the last program out."""
    monkeypatch.setattr(launch, "SPIN_LIMIT", 8)
    x = torch.zeros(3, 3, dtype=torch.int32)
    x[0] = torch.tensor([5, 7, 9], dtype=torch.int32)
    counters = _counters()
    launch.phases(x, counters, sync)
    assert int(counters[2]) == 1 and not torch.equal(x, launch.phases_reference(x[0], 2))
    counters[2] = 0
    assert int(counters.abs().sum()) == 0


def test_phases_refuse_what_would_race_or_hang():
    c = _counters()
    with pytest.raises(ValueError, match=r"int32 tensor \[phases \+ 1, n\]"):
        launch.phases(torch.zeros(1, 2, dtype=torch.int32), c)
    with pytest.raises(ValueError, match=r"counters must be int32 \[259\]"):
        launch.phases(torch.zeros(2, 1, dtype=torch.int32), c[:3])
    with pytest.raises(ValueError, match="SYNC_NONE runs one program"):
        launch.phases(torch.zeros(2, 4, dtype=torch.int32), c, launch.SYNC_NONE)
    with pytest.raises(ValueError, match="sync must be SYNC_NONE, SYNC_BARRIER or SYNC_FLAG"):
        launch.phases(torch.zeros(2, 1, dtype=torch.int32), c, 3)
    with pytest.raises(ValueError, match="300 programs is more than the 256 flags"):
        launch.phases(torch.zeros(2, 300, dtype=torch.int32), c)
    with pytest.raises(RuntimeError, match="a GPU measurement"):
        launch.barrier_cost_us("cpu")


def test_weight_copies_read_past_the_span_and_differ():
    """A projection chain's weights: at least two, together at least `span` bytes (so the chain finds none in the
    L2), each its own random tensor of the asked shape and dtype, and the same ones for the same seed."""

    def copies(N, K, span, seed=1):
        return launch.weight_copies(N, K, torch.bfloat16, "cpu", torch.Generator().manual_seed(seed), span=span)

    for N, K, span, want in ((64, 32, 1 << 14, 4), (64, 32, 100, 2), (48, 32, 6145, 3)):  # 4,096 / 3,072 B a copy
        ws = copies(N, K, span)
        assert len(ws) == want and all(w.shape == (N, K) and w.dtype == torch.bfloat16 for w in ws)
        assert sum(w.numel() * 2 for w in ws) >= span > sum(w.numel() * 2 for w in ws[1:]) or want == 2
        assert not torch.equal(ws[0], ws[1])
    assert all(torch.equal(a, b) for a, b in zip(copies(64, 32, 1 << 14), copies(64, 32, 1 << 14)))
    assert not torch.equal(copies(64, 32, 100)[0], copies(64, 32, 100, seed=2)[0])


def _calls_tickets(value) -> bool:
    """`tickets(...)`, or `tickets(...) if cond else unused` (a launch that reads them only when it merges)."""
    if isinstance(value, ast.IfExp):
        value = value.body
    return isinstance(value, ast.Call) and ast.unparse(value.func) == "tickets"


def test_every_ticketed_launch_takes_its_tickets_from_launch_tickets():
    """The kernels whose last-arriving program finishes the work share one rule for their arrival tickets: a zeroed
    buffer per (device, stream), made by `launch.tickets` (which also makes the default capture stream's outside
    any capture: a buffer first made inside a capture is zeroed only when that graph replays). A launch site that
    made its own buffer would escape the rule, so every launch that passes a ticket argument passes
    `tickets(...)`, or a name bound to it."""
    found = 0
    for name, tree in _sources().items():
        bound = {  # local names assigned from tickets(...)
            t.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Assign) and _calls_tickets(node.value)
            for t in node.targets if isinstance(t, ast.Name)
        }  # fmt: skip
        kernels = {fn.name: [a.arg for a in fn.args.args] for fn in _jit_functions(tree)}
        ticketed = {k: next(i for i, p in enumerate(ps) if p.startswith("TICKET")) for k, ps in kernels.items()
                    if any(p.startswith("TICKET") for p in ps)}  # fmt: skip
        for kernel, call in _launches(tree):
            if call.args and isinstance(call.args[0], ast.Starred) and ticketed:  # *args: the tuple built before
                packed = next(
                    node.value for node in ast.walk(tree)
                    if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == ast.unparse(call.args[0].value)
                )  # fmt: skip
                arg = packed.elts[ticketed.get(kernel, min(ticketed.values()))]  # the kernel may be picked at run time
            elif kernel in ticketed:
                arg = call.args[ticketed[kernel]]
            else:
                continue
            ok = _calls_tickets(arg) or (isinstance(arg, ast.Name) and arg.id in bound)
            assert ok, f"{name}: {kernel}'s tickets are {ast.unparse(arg)}, not launch.tickets(device)"
            found += 1
    assert found >= 6  # tree attention, masked attention, stream linear, beam select, head select, greedy accept


def test_tickets_are_one_zeroed_buffer_per_device_and_stream():
    a, b = launch.tickets("cpu"), launch.tickets(torch.device("cpu"))
    assert a is b and a.dtype == torch.int32 and a.numel() == launch.TICKET_SLOTS and not a.any()
