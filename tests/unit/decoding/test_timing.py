"""decoding.timing: the names timed runs go by, written and read back, and the stage timer."""

import pytest

from longspec_lab.bench.e2e import run_bench
from longspec_lab.decoding.timing import StageTimer, drafted_shape, method_name, parse_method


@pytest.mark.parametrize(
    "name,parsed",
    [
        ("ar", ([], None)),
        ("chain-g4", ([1, 1, 1, 1], None)),
        ("chain-g1-sdpa", ([1], "sdpa")),
        ("tree-4-16-16", ([4, 16, 16], None)),
        ("tree-2-4-sdpa", ([2, 4], "sdpa")),
        ("hf-greedy", None),
        ("hf-static-compiled", None),
        ("chain-gx", None),
        ("chain-g0", None),
        ("chain-g", None),
        ("tree-", None),
        ("tree-0-4", None),
        ("tree-2-sdpa-4", None),
        ("tree-2--4", None),
        ("tree", None),
        ("ar-sdpa", None),
    ],
)
def test_parse_method(name, parsed):
    assert parse_method(name) == parsed


@pytest.mark.parametrize(
    "name,shape",
    [("chain-g4", [1, 1, 1, 1]), ("tree-4-16-16", [4, 16, 16]), ("ar", None), ("tree-2-4-sdpa", None),
     ("chain-g1-sdpa", None), ("hf-greedy", None), ("tree-0-4", None)],
)  # fmt: skip
def test_drafted_shape_keeps_chains_and_trees_on_the_default_backend(name, shape):
    assert drafted_shape(name) == shape


@pytest.mark.parametrize(
    "kw",
    [
        dict(method="ar"),
        dict(method="chain", gamma=7),
        dict(method="tree", shape=[1, 2, 3, 4, 2, 1, 3]),
        dict(method="tree", shape=(4, 16), backend="sdpa"),
        dict(method="chain", gamma=5, backend="flex"),
    ],
)
def test_method_name_reads_back(kw):
    """Every name method_name writes, parse_method reads back to the run's widths and backend."""
    widths = {"ar": [], "chain": [1] * kw.get("gamma", 0), "tree": list(kw.get("shape", []))}[kw["method"]]
    assert parse_method(method_name(**kw)) == (widths, kw.get("backend"))


@pytest.mark.parametrize(
    "kw",
    [
        dict(method="beam"),
        dict(method="chain"),
        dict(method="chain", gamma=0),
        dict(method="tree"),
        dict(method="tree", shape=[]),
        dict(method="tree", shape=[4], backend="a-b"),
        dict(method="tree", shape=[4], backend="2x"),
        dict(method="tree", shape=[4], backend=""),
    ],
)
def test_method_name_rejects_what_it_could_not_read_back(kw):
    with pytest.raises(ValueError):
        method_name(**kw)


def test_a_benchmark_report_names_its_rows_by_method_name(embedded_pair):
    """The rows of a (tiny) `run_bench` report are the names method_name gives its runs, in order."""
    target, draft, tok = embedded_pair
    prompt = tok.encode("The quick brown fox jumps over the lazy dog. " * 4)
    rep = run_bench(target, draft, [prompt], 4, shapes=[[2, 2]], gammas=(2,), hf_model=None, progress=False)
    assert list(rep["results"]) == ["ar", method_name("chain", gamma=2), method_name("tree", shape=[2, 2])]
    assert [parse_method(n) for n in rep["results"]] == [([], None), ([1, 1], None), ([2, 2], None)]


def test_stage_timer_counts_only_when_disabled():
    timer = StageTimer(enabled=True)
    with timer.stage("draft"):
        pass
    off = StageTimer(enabled=False)
    with off.stage("draft"):
        pass
    assert set(timer.seconds) == {"draft"} and timer.seconds["draft"] >= 0.0 and dict(off.seconds) == {}


def test_fastest_form_takes_the_least_time_of_the_forms_recorded():
    from longspec_lab.decoding.timing import fastest_form

    row = {"triton_verify_ms": 5.0, "triton_verify_graph_ms": 6.0, "draft_step_graph_ms": 4.0}
    assert fastest_form(row, "triton_verify") == (5.0, "eager")  # eager beat the capture in this row
    assert fastest_form(row, "draft_step") == (4.0, "CUDA graph")
    row["draft_step_compiled_ms"] = 3.0
    assert fastest_form(row, "draft_step") == (3.0, "compiled + CUDA graph")
    row["triton_verify_compiled_ms"] = 5.0  # a tie goes to the form the decoder runs
    assert fastest_form(row, "triton_verify") == (5.0, "compiled + CUDA graph")
    assert fastest_form(row, "triton_decode") is None
    with pytest.raises(ValueError, match="names a form, not a step"):  # else "_graph" + "_ms" would read as eager
        fastest_form(row, "triton_verify_graph")
