"""The CPU count of a stage's GPU kernels (bench/fusion_proxy.py) on functions whose kernels are known: Inductor
fuses a pointwise chain into its reduction (one kernel), keeps a reduction that another reduction reads apart (two),
and the package's registered ops are counted as ours, not as generated kernels; nothing is executed."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # the row_topk op below runs nothing, but its module must not compile

import torch  # noqa: E402

from longspec_lab.bench import fusion_proxy  # noqa: E402
from longspec_lab.kernels import row_topk  # noqa: E402,F401 - registers torch.ops.longspec.row_topk


def test_a_pointwise_chain_fuses_into_its_reduction():
    x = torch.randn(64, 128)
    got = fusion_proxy.count_stage(lambda: (x.sin() * 2 + 1).sum(1))
    assert got == {"generated": 1, "combo_bound": 1, "ours": {}}


def test_a_softmax_then_a_matmul_reads_as_its_kernels():
    """softmax over rows (Inductor: one kernel), a matmul (an extern call: neither generated nor ours), then a
    pointwise epilogue on the matmul's output (one more generated kernel)."""
    x, w = torch.randn(32, 64), torch.randn(64, 16)
    got = fusion_proxy.count_stage(lambda: (torch.softmax(x, -1) @ w).relu())
    assert got == {"generated": 2, "combo_bound": 2, "ours": {}}  # the epilogue waits for the softmax


def test_the_packages_ops_are_counted_as_ours_and_nothing_runs(monkeypatch):
    keys = torch.arange(4 * 64, dtype=torch.int64).view(4, 64)
    calls = []
    monkeypatch.setattr(row_topk, "_launch", lambda *a: calls.append(a))  # would run the kernel
    got = fusion_proxy.count_stage(lambda: torch.ops.longspec.row_topk(keys * 3 + 1, 4, 4096) + 1)
    assert got["ours"] == {"longspec.row_topk.default": 1}
    assert got["generated"] == 2  # the keys' arithmetic before the op, the + 1 after it
    assert calls == []


def test_independent_writes_are_one_combo_group():
    """Three buffers of three sizes written from three inputs (a commit's bookkeeping): three kernels, which nothing
    orders, so combo kernels could launch them as one."""
    a, b, c = torch.zeros(8), torch.zeros(16), torch.zeros(4, dtype=torch.long)
    x, y, z = torch.randn(8), torch.randn(16), torch.arange(4)

    def bookkeeping():
        a.copy_(x * 2)
        b.copy_(y + 1)
        c.copy_(z * 3)

    assert fusion_proxy.count_stage(bookkeeping) == {"generated": 3, "combo_bound": 1, "ours": {}}


def test_launches_add_our_ops_launches_to_inductors():
    """Two launches for the tree kernel (split and merge) and for flat_topk (two passes), one for any other op."""
    counts = {"generated": 4, "combo_bound": 3, "ours": {"longspec.flat_topk.default": 1,
              "longspec.tree_attention_packed.default": 1, "longspec.norm_linear.default": 5}}  # fmt: skip
    assert fusion_proxy.launches(counts) == 4 + 2 + 2 + 5
    assert fusion_proxy.launches(counts, combo=True) == 3 + 2 + 2 + 5


def test_the_order_lists_each_launch_with_what_it_fuses(monkeypatch):
    keys = torch.arange(4 * 64, dtype=torch.int64).view(4, 64)
    monkeypatch.setattr(row_topk, "_launch", lambda *a: None)
    got = fusion_proxy.count_stage(lambda: torch.ops.longspec.row_topk(keys * 3 + 1, 4, 4096).relu(), order=True)
    kinds = [kind for kind, _ in got["order"]]
    assert kinds == ["generated", "ours", "generated"]
    assert got["order"][1][1] == "longspec.row_topk.default"
    assert {"mul", "add"} <= set(got["order"][0][1]) and "relu" in got["order"][2][1]
