"""The tuner's acceptance models (bench/tune.py) against brute force on synthetic probe trees: the nested beam
(`step_accepts_nested`) against building each narrower tree node by node, and the decoder's walk
(`renewal_tau`) against a plain loop over positions."""

import itertools
import random

import pytest
import torch

from longspec_lab.bench import tune


def _random_probe(rng, widths):
    """parents per level (index into the previous level, non-decreasing runs not required) and a path."""
    parents, prev = [], 1
    for w in widths:
        parents.append([rng.randrange(prev) for _ in range(w)])
        prev = w
    return parents


def _brute_accept(parents, path, shape):
    """Build the narrower tree level by level: keep the first w_l nodes (probe order) whose parent is kept; the
    path counts while its node is kept; 1 + levels on the path."""
    kept_prev, n = {0}, 1
    for l, w in enumerate(shape):
        alive = [c for c, p in enumerate(parents[l]) if p in kept_prev]
        kept = set(alive[:w])
        if path[l] < 0 or path[l] not in kept:
            return n
        n += 1
        kept_prev = kept
    return n


def test_nested_beam_equals_building_each_tree():
    rng = random.Random(0)
    widths = [4, 6, 6, 5]
    steps = [_random_probe(rng, widths) for _ in range(30)]
    paths = []
    for par in steps:
        path, node = [], 0
        for l, w in enumerate(widths):
            kids = [c for c, p in enumerate(par[l]) if p == node]
            if not kids or rng.random() < 0.15:
                path += [-1] * (len(widths) - l)
                break
            node = rng.choice(kids)
            path.append(node)
        paths.append(path)
    parents = [torch.tensor([par[l] for par in steps]) for l in range(len(widths))]
    ranks = torch.tensor(paths, dtype=torch.float).masked_fill(torch.tensor(paths) < 0, float("inf"))
    shapes = [[1], [1, 1, 1, 1], [2, 3], [4, 6, 6, 5], [1, 2, 3, 1], [3, 1, 4], [2, 2, 2, 2]]
    got = tune.step_accepts_nested(parents, ranks, shapes, chunk=3)  # several chunks
    want = torch.tensor([[_brute_accept(par, path, s) for par, path in zip(steps, paths)] for s in shapes])
    assert torch.equal(got, want)


def test_renewal_tau_equals_walking_the_positions():
    rng = random.Random(1)
    n = 40
    accepts = [torch.tensor([[rng.randint(1, 6) for _ in range(n - 1)] for _ in range(5)]) for _ in range(3)]
    got = tune.renewal_tau(accepts, n)
    for s in range(5):
        tokens = steps = 0
        for acc in accepts:
            out = 1
            while out < n:
                add = min(int(acc[s, out - 1]), n - out)
                tokens, steps, out = tokens + add, steps + 1, out + add
        assert float(got[s]) == tokens / steps


def test_acceptance_check_refuses_shapes_outside_the_probe(capsys, tmp_path):
    import pytest

    from longspec_lab.bench import acceptance_check

    with pytest.raises(SystemExit) as e:
        acceptance_check.main(["--probe-shape", "4,8", "--shapes", "1,1,1;2,16"])
    assert e.value.code == 2 and "do not fit inside --probe-shape" in capsys.readouterr().err
    out = tmp_path / "r.json"
    out.write_text("{}")
    with pytest.raises(SystemExit) as e:
        acceptance_check.main(["--out", str(out)])
    assert e.value.code == 2 and "exists" in capsys.readouterr().err


def test_neighbours_stay_inside_the_probe_and_the_caps():
    got = tune.neighbours([2, 4], probe_widths=(4, 4, 8), max_depth=3, max_nodes=12, grid=(1, 2, 4, 8))
    assert [1, 4] in got and [4, 4] in got and [2, 2] in got and [2] in got
    assert [2, 8] not in got  # wider than the probe's second level
    assert [2, 4, 1] in got and [2, 4, 4] in got and [2, 4, 8] not in got  # 15 nodes > 12
    assert all(len(s) <= 3 and sum(s) + 1 <= 12 for s in got)


def test_local_search_climbs_to_the_best_shape_of_a_unimodal_score():
    """A score peaked at [1, 2, 4, 4]: hill climbing from a far seed reaches it, and it is the brute-force best
    over every shape of the same search space."""
    target = [1, 2, 4, 4]
    grid = (1, 2, 4, 8)

    def score(shapes):
        def dist(s):
            padded = s + [0] * (4 - len(s))
            return sum(abs(a - b) for a, b in zip(padded, target)) + 3 * abs(len(s) - 4)

        return torch.tensor([-float(dist(s)) for s in shapes])

    found = tune.local_search(score, [[8, 8]], (8, 8, 8, 8), 4, 60, keep=2)
    best = max(found, key=found.get)
    assert best == "[1, 2, 4, 4]"
    space = [list(s) for d in range(1, 5) for s in itertools.product(grid, repeat=d)]
    assert max(space, key=lambda s: float(score([s])[0])) == target


def test_the_search_is_counted_before_it_is_listed():
    """count_shapes (a table over levels and nodes left) equals the number of shapes candidate_shapes lists and
    a brute-force filter of every width tuple; check_search_size refuses a search above MAX_SEARCH_SHAPES and
    names the deepest one that fits."""
    import itertools

    import pytest

    from longspec_lab.bench import tune

    for depth, nodes, probe in [(3, 40, (4, 8, 16)), (4, 60, (16, 32, 32, 32)), (2, 10, (64, 64)), (3, 2, (8, 8, 8))]:
        brute = [list(ws) for d in range(1, depth + 1) for ws in itertools.product(tune.WIDTH_GRID, repeat=d)
                 if sum(ws) + 1 <= nodes and all(w <= p for w, p in zip(ws, probe))]  # fmt: skip
        assert tune.candidate_shapes(depth, nodes, probe) == brute
        assert tune.count_shapes(depth, nodes, probe) == len(brute)
    probe = (16,) + (32,) * 7
    assert tune.check_search_size(6, 160, probe) == 888_850  # the default search
    assert tune.count_shapes(8, 160, probe) == 88_560_768
    with pytest.raises(ValueError, match=r"88,560,768 shapes .* use --max-depth 7, a smaller --max-nodes"):
        tune.check_search_size(8, 160, probe)


def _brute_expected_accept(ranks, shape):
    """1 + the mean over steps of how many leading levels keep the path (rank < width), one step at a time."""
    total = 0
    for r in ranks.tolist():
        n = 0
        while n < len(shape) and r[n] < shape[n]:
            n += 1
        total += 1 + n
    return total / len(ranks)


def test_the_tensor_search_lists_the_same_shapes_with_the_same_scores():
    """search_space gives candidate_shapes' shapes in its order, with expected_accept's values bit for bit (and a
    per-step loop's), and features_matrix (and features, one shape) the features counted by hand: the fast search
    scores what the lists did. Seeded ranks with paths that leave the probe (inf), a shallow cap (nodes), a probe
    narrower than the grid."""
    g = torch.Generator().manual_seed(11)
    for depth, nodes, probe, steps in [(3, 40, (4, 8, 8), 50), (4, 60, (16, 16, 16, 16), 30), (2, 10, (64, 64), 7),
                                       (3, 2, (8, 8, 8), 5), (5, 30, (2, 3, 4, 4, 6), 40)]:  # fmt: skip
        ranks = torch.randint(0, 12, (steps, len(probe)), generator=g).float()
        ranks[torch.rand(steps, len(probe), generator=g) < 0.2] = float("inf")
        shapes = tune.candidate_shapes(depth, nodes, probe)
        W, acc = tune.search_space(depth, nodes, probe, ranks)
        assert [tune.shape_of(row) for row in W] == shapes and len(shapes) > 0
        assert torch.equal(acc, tune.expected_accept(ranks, shapes))
        for i in range(0, len(shapes), max(1, len(shapes) // 25)):
            assert abs(acc[i].item() - _brute_expected_accept(ranks, shapes[i])) < 1e-12
        # the features counted from each shape by hand: 1, depth, nodes with the root, nodes drafted from, beams,
        # past one verify tile (more than 32 nodes for the embedded model; 16 here as well, for a GQA group of 4)
        for tile in (32, 16):
            want = [[1, len(s), 1 + sum(s), sum(s[:-1]), sum(w > 1 for w in s), int(1 + sum(s) > tile)] for s in shapes]
            assert torch.equal(tune.features_matrix(W, tile), torch.tensor(want, dtype=torch.float64))
            every = max(1, len(shapes) // 25)
            assert [tune.features(s, tile) for s in shapes[::every]] == want[::every]


def test_verify_tile_nodes_follows_the_gqa_group():
    """64 packed rows a row tile: 32 nodes for the embedded model's 2 query heads a KV head, 16 for 4, 64 for MHA."""
    from longspec_lab.models.config import PRESETS

    assert [tune.verify_tile_nodes(g) for g in (1, 2, 4, 8)] == [64, 32, 16, 8]
    assert tune.verify_tile_nodes(PRESETS["embedded"].group_size) == 32  # 4 query heads on 2 KV heads
    assert tune.DEFAULT_TILE_NODES == 32  # the default of features / fit_latency / latency_loo: the embedded model's
    assert tune.verify_tile_nodes(PRESETS["llama3-8b"].group_size) == 16  # 32 on 8
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="group_size must be a positive integer"):
            tune.verify_tile_nodes(bad)


def test_latency_loo_refits_without_each_shape():
    """latency_loo: step times that follow the model exactly are predicted exactly with any one shape left out (when
    the rest still pin the coefficients); a shape off the model is predicted by a fit to the others alone, which the
    test repeats by hand."""
    import json

    shapes = [[1] * 5, [1] * 7, [1] * 9, [4, 16, 16, 16, 16], [1, 2, 4, 4, 4, 4, 4], [3, 4, 6, 6, 3, 4, 3]]
    shapes += [[2, 4, 4, 4, 4, 4, 4, 4, 4], [4, 8, 8, 8, 8, 8, 8], [1, 2, 3, 4, 2, 1, 12], [3, 6, 6, 6, 8, 4, 4]]
    true = torch.tensor([150e-6, 30e-6, 0.5e-6, 0.3e-6, 1.5e-6, 18e-6], dtype=torch.float64)
    exact = {json.dumps(s): float(torch.tensor(tune.features(s), dtype=torch.float64) @ true) for s in shapes}
    loo = tune.latency_loo(exact)
    assert set(loo) == set(exact) and max(abs(v) for v in loo.values()) < 1e-9
    odd = dict(exact)
    key = json.dumps([3, 4, 6, 6, 3, 4, 3])
    odd[key] *= 1.10  # one shape 10% slower than the model
    coef = tune.fit_latency({k: t for k, t in odd.items() if k != key})
    by_hand = float(torch.tensor(tune.features(json.loads(key)), dtype=torch.float64) @ coef) / odd[key] - 1
    assert tune.latency_loo(odd)[key] == pytest.approx(by_hand) and by_hand < -0.05
    assert tune.latency_loo(dict(list(exact.items())[:2])) == {}
