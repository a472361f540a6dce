"""The tuner's acceptance model against brute force and against real traces, and a CPU smoke run."""

import json

import pytest
import torch

from longspec_lab.bench.tune import candidate_shapes, expected_accept, fit_latency, path_ranks, tune
from longspec_lab.decoding.eager import SpecDecoder
from longspec_lab.paths import load_prompts


def test_expected_accept_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    ranks = torch.randint(0, 12, (200, 5), generator=g).float()
    ranks[ranks > 9] = float("inf")
    shapes = [[1], [4, 4], [16, 2, 8], [3, 3, 3, 3, 3], [10, 10, 10, 10, 10]]
    got = expected_accept(ranks, shapes)
    for s, v in zip(shapes, got):
        total = 0
        for row in ranks.tolist():
            n = 1
            for r, w in zip(row, s):
                if r < w:
                    n += 1
                else:
                    break
            total += n
        assert abs(v.item() - total / len(ranks)) < 1e-9


def test_probe_model_reproduces_real_acceptance(embedded_pair):
    """On the probe shape itself, the rank model must give exactly the accepted lengths observed."""
    target, draft, tok = embedded_pair
    ids = tok.encode(load_prompts(min_tokens=1000)[0]["text"])[:400]
    shape = [4, 8, 8, 8]
    res = SpecDecoder(target, draft).generate(ids, tree_shape=shape, max_new_tokens=40, trace=True, stop_at_eos=False)
    ranks = path_ranks(res.trace, 4)
    real = [len(r.result.emitted) for r in res.trace]
    assert abs(expected_accept(ranks, [shape]).item() - sum(real) / len(real)) < 1e-9


def test_latency_fit_recovers_a_linear_model():
    shapes = [[1], [4], [16], [1, 1, 1], [4, 4, 4, 4], [2, 4, 8, 16], [1, 1, 1, 1, 1, 1], [16, 32], [4, 8, 8, 16]]
    true = torch.tensor([2e-3, 5e-4, 1e-5, 3e-6, 4e-5, 2e-5], dtype=torch.float64)
    from longspec_lab.bench.tune import features

    times = {json.dumps(s): float(torch.tensor(features(s), dtype=torch.float64) @ true) for s in shapes}
    assert torch.allclose(fit_latency(times), true, rtol=1e-6, atol=1e-12)
    assert all(sum(s) + 1 <= 30 and len(s) <= 2 for s in candidate_shapes(2, 30, (8, 8)))


def test_tune_smoke_cpu(embedded_pair):
    target, draft, tok = embedded_pair
    prompts = [tok.encode(p["text"])[:300] for p in load_prompts(min_tokens=1000)[:1]]
    rep = tune(
        target,
        draft,
        prompts,
        probe_shape=(4, 8, 8),
        max_depth=3,
        max_nodes=40,
        n_tokens=12,
        top=2,
        progress=False,
        calibration=([1], [4], [4, 4], [2, 4, 8]),
    )
    assert rep["best_shape"] in [json.loads(k) for k in rep["validated"]]
    assert json.dumps(rep["default_shape"]) in rep["validated"]
    assert rep["searched_shapes"] == len(candidate_shapes(3, 40, (4, 8, 8)))


def test_tune_every_position_rescores_the_shortlist(embedded_pair):
    """every_position with recorded step times: the shortlist, every chain and the default (when the probe holds
    it) are rescored by the exact acceptance, then hill climbing adds neighbours, and the report says which model
    ranked them."""
    target, draft, tok = embedded_pair
    prompts = [tok.encode(p["text"])[:200] for p in load_prompts(min_tokens=1000)[:1]]
    times = {json.dumps(s): 1e-3 * (1 + len(s)) + 1e-5 * sum(s) for s in ([1], [1, 1], [4], [2, 4], [4, 8, 8])}
    rep = tune(target, draft, prompts, probe_shape=(4, 8, 8), max_depth=3, max_nodes=40, n_tokens=10, top=3,
               progress=False, step_times=times, every_position=True, shortlist=5)  # fmt: skip
    assert rep["acceptance_model"].startswith("every position") and rep["validated"] is None
    chains = [s for s in candidate_shapes(3, 40, (4, 8, 8)) if set(s) == {1}]
    local = rep["local_search_shapes"]
    assert 5 < rep["rescored_shapes"] - local <= 5 + len(chains) and rep["searched_shapes"] > rep["rescored_shapes"]
    assert all("rank_model_accept" in v for v in rep["model_top"].values()) and len(rep["model_top"]) == 3
    # the recorded shapes under the same models: the fit's step times (exact here: the times are linear in the
    # features) and the exact acceptance, which is the tau the decoder measures running each shape
    assert set(rep["recorded_predicted"]) == set(times)
    dec = SpecDecoder(target, draft)
    for key, pred in rep["recorded_predicted"].items():
        assert pred["predicted_step_s"] == pytest.approx(times[key], rel=1e-9)
        r = dec.generate(prompts[0], method="tree", tree_shape=json.loads(key), max_new_tokens=10, stop_at_eos=False)
        assert pred["expected_accept"] == pytest.approx((len(r.new_tokens) - 1) / (r.target_calls - 1), abs=1e-12)


def test_latency_fit_is_scipys_non_negative_least_squares():
    """Noisy, collinear step times (the kind that made plain least squares predict negative costs): the
    fit equals scipy.optimize.nnls, and every coefficient is >= 0."""
    from scipy.optimize import nnls

    from longspec_lab.bench.tune import features, recorded_step_times

    g = torch.Generator().manual_seed(0)
    shapes = [[1] * 5, [1] * 6, [1] * 7, [4, 16, 16, 16, 16], [2, 4, 8, 8, 8, 8], [1, 2, 4, 4, 4, 4, 4], [2, 4, 8, 8]]
    X = torch.tensor([features(s) for s in shapes], dtype=torch.float64)
    y = X @ torch.tensor([9e-4, 9e-5, -2e-5, 1e-5, 5e-5, 3e-5], dtype=torch.float64)
    y = y + 2e-5 * torch.randn(len(shapes), generator=g, dtype=torch.float64)
    got = fit_latency({json.dumps(s): float(t) for s, t in zip(shapes, y)})
    want, _ = nnls(X.numpy(), y.numpy())
    assert bool((got >= 0).all())
    assert torch.allclose(got, torch.from_numpy(want), rtol=1e-6, atol=1e-10)
    rep = {"results": {"ar": {"seconds": 1.0, "tokens": 10, "tau": 1.0}} | {
        ("chain-g%d" % len(s) if max(s) == 1 else "tree-" + "-".join(map(str, s))): {
            "seconds": float(t) * 20, "tokens": 100, "tau": 5.0} for s, t in zip(shapes, y)}}  # fmt: skip
    steps = recorded_step_times(rep)
    assert set(steps) == {json.dumps(s) for s in shapes}
    assert all(abs(steps[json.dumps(s)] - float(t)) < 1e-15 for s, t in zip(shapes, y))
    with pytest.raises(ValueError, match="at least 4"):
        recorded_step_times({"results": {"ar": {"seconds": 1.0, "tokens": 10, "tau": 1.0}}})


def test_recorded_shapes_outside_the_probe_are_left_unpredicted(embedded_pair):
    """A probe narrower and shallower than every recorded shape records nothing about how they accept: the report's
    `recorded_predicted` is empty rather than a guess, and the search still runs."""
    target, draft, tok = embedded_pair
    prompts = [tok.encode(load_prompts(min_tokens=1000)[0]["text"])[:120]]
    times = {json.dumps(s): 1e-3 * (1 + len(s)) + 1e-5 * sum(s) for s in ([1] * 5, [1] * 6, [4, 16, 16], [2, 4, 8, 8])}
    rep = tune(target, draft, prompts, probe_shape=(2, 2), max_depth=2, max_nodes=10, n_tokens=6, top=2,
               progress=False, step_times=times)  # fmt: skip
    assert rep["recorded_predicted"] == {} and rep["searched_shapes"] == len(candidate_shapes(2, 10, (2, 2)))
