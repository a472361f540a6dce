"""bench.profile's time line of a replayed step (`step_timeline`), on kernel records written by hand: the profiler
itself needs a GPU, the arithmetic does not."""

import pytest

from longspec_lab.bench.profile import step_timeline


def test_increments_add_up_to_the_step_and_show_waits_and_overlaps():
    # a waits for nothing; b starts 1 us after a ends (a boundary it waited at); c starts 0.5 us before b ends (PDL)
    ks = [("c", 5.5, 8.0), ("a", 0.0, 2.0), ("b", 3.0, 6.0)]  # any order: sorted by start
    t = step_timeline(ks, {"draft1": 1, "verify": 2})
    assert [k[0] for k in t["kernels"]] == ["a", "b", "c"]
    assert [k[1] for k in t["kernels"]] == [0.0, 3.0, 5.5]  # starts, from the first
    assert [k[2] for k in t["kernels"]] == [2.0, 3.0, 2.5]  # durations
    assert [k[3] for k in t["kernels"]] == [2.0, 4.0, 2.0]  # increments: b waited 1 us, c overlapped b by 0.5
    assert t["total_us"] == pytest.approx(8.0)  # first start to last end
    assert t["stages"] == {
        "draft1": {"kernels": 1, "increment_us": 2.0, "duration_us": 2.0},
        "verify": {"kernels": 2, "increment_us": 6.0, "duration_us": 5.5},
    }


def test_a_kernel_inside_the_one_before_adds_nothing_and_counts_must_match():
    # b runs entirely inside a (started early, ended first): no increment of its own, and it never moves the end back
    t = step_timeline([("a", 0.0, 10.0), ("b", 1.0, 4.0), ("c", 9.0, 12.0)], {"s": 3})
    assert [k[3] for k in t["kernels"]] == [10.0, 0.0, 2.0] and t["total_us"] == pytest.approx(12.0)
    assert t["stages"] == {"s": {"kernels": 3, "increment_us": 12.0, "duration_us": 16.0}}
    assert step_timeline([("a", 0.0, 1.0)], {"s": 2})["stages"] is None  # the profiler saw another count
    assert step_timeline([], {}) == {"total_us": 0, "kernels": [], "stages": {}}  # nothing seen, nothing launched
