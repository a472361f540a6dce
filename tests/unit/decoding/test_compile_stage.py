"""decoding/graphs.py's compile_stage: Inductor's description of an op call is the short one while a stage
compiles (torch 2.11 built the long one for every fallback op, and it took minutes for the greedy tail)."""

import logging

import pytest
import torch
from torch._inductor import config as inductor_config
from torch._inductor import exc as inductor_exc

from longspec_lab.decoding import graphs


class _Node:
    """An IR-like argument: a buffer name, and a str that must never be asked for."""

    def __init__(self, name):
        self.name = name

    def get_name(self):
        return self.name

    def __str__(self):
        raise AssertionError("the argument was printed")

    __repr__ = __str__


class _Unnamed(_Node):
    def get_name(self):
        raise NotImplementedError("no buffer yet")


def test_the_short_description_names_each_argument_without_printing_it():
    text = graphs.brief_operator_str(
        "longspec.greedy_accept.default", [_Node("buf7"), [1, 2], 3, None, _Unnamed("x")], {"D": 5, "h": _Node("buf2")}
    )
    assert text.split("\n") == [
        "  target: longspec.greedy_accept.default",
        "  args[0]: _Node(buf7)",
        "  args[1]: list of 2",
        "  args[2]: 3",
        "  args[3]: None",
        "  args[4]: _Unnamed",
        "  kwargs['D']: 5",
        "  kwargs['h']: _Node(buf2)",
    ]


def test_compile_stage_uses_it_only_while_the_stage_runs(monkeypatch):
    original = inductor_exc.OperatorIssue.operator_str
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: lambda: seen.append(inductor_exc.OperatorIssue.operator_str))
    graphs.compile_stage(lambda: None, "default")()
    assert seen == [graphs.brief_operator_str] and inductor_exc.OperatorIssue.operator_str is original


@torch.library.custom_op("longspec_test::plus_one_compile_stage", mutates_args=())
def _plus_one(x: torch.Tensor) -> torch.Tensor:
    return x + 1


@_plus_one.register_fake
def _(x):
    return torch.empty_like(x)


def test_inductor_describes_a_fallback_op_the_short_way(caplog):
    """A custom op without a lowering of its own is lowered by Inductor's implicit fallback on its first compile,
    which logs a description of the call: through compile_stage, that is the short one."""
    x = torch.arange(6.0).reshape(2, 3)
    fn = graphs.compile_stage(lambda: torch.ops.longspec_test.plus_one_compile_stage(x * 2) * 3, "default")
    with caplog.at_level(logging.INFO, logger="torch._inductor.graph"), inductor_config.patch(fx_graph_cache=False):
        out = fn()  # lowered, not taken from Inductor's cache of an earlier run
    torch._dynamo.reset()
    torch.testing.assert_close(out, (x * 2 + 1) * 3)
    said = [r.getMessage() for r in caplog.records if "implicit fallback" in r.getMessage()]
    if not said:
        pytest.skip("this PyTorch's Inductor does not log its implicit fallbacks")
    assert "target: longspec_test.plus_one_compile_stage.default" in said[0]
    # named, not printed: the full form is TensorBox(StorageBox(Pointwise(...))) with the inner function's code
    assert said[0].split("\n")[-1] == "  args[0]: TensorBox"
