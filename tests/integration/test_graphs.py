"""The graph path runs the eager loop's own stage functions: twin tests per stage, then end to end.

* Twin stages: each stage of `steps.greedy_stages` runs eagerly on one copy of a mid-generation
  state and through `torch.compile(fullgraph=True)` on another; every buffer must come out identical
  (aot_eager: the same ATen ops, so bit for bit; this also proves each stage traces without a graph
  break, which capture on the GPU needs). One stage also goes through Inductor's CPU code generation.
* End to end: `GraphDecoder` (graphs and compilation off on the CPU) gives `SpecDecoder`'s tokens,
  accepted lengths and acceptance statistics on held-out prompts, stops at EOS, refuses what it
  cannot do with a clear error, and records traces.
"""

import copy

import pytest
import torch

from longspec_lab.decoding import steps
from longspec_lab.decoding.eager import SpecDecoder
from longspec_lab.decoding.graphs import GraphDecoder
from longspec_lab.models.config import PRESETS
from longspec_lab.models.glide import DraftConfig, Glide
from longspec_lab.models.target import Target
from longspec_lab.paths import load_prompts
from longspec_lab.spec.tree import TreeShape

CASES = [
    ("ar", {}),
    ("chain", {"gamma": 4}),
    ("tree", {}),
    ("tree", {"tree_shape": [1, 3, 9]}),
    ("tree", {"tree_shape": [2, 2, 2, 2, 2, 2, 2, 2]}),
]


def _tensors(obj, prefix=""):
    """Every tensor reachable from a DecodeState (its buffers, tree, ring and cache), by name."""
    out = {}
    for name, val in vars(obj).items():
        if isinstance(val, torch.Tensor):
            out[prefix + name] = val
        elif hasattr(val, "__dict__") and not isinstance(val, torch.nn.Module) and name != "shape":
            out.update(_tensors(val, prefix + name + "."))
    return out


def _clone_state(st):
    twin = copy.copy(st)
    for name in ("tree", "ring", "tcache"):
        if hasattr(st, name):
            setattr(twin, name, copy.copy(getattr(st, name)))
    for name, t in _tensors(st).items():
        obj = twin
        *path, leaf = name.split(".")
        for p in path:
            obj = getattr(obj, p)
        setattr(obj, leaf, t.clone())
    return twin


@pytest.fixture(scope="module")
def tiny_pair():
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    target = Target(cfg).eval()
    draft = Glide(DraftConfig.from_target(cfg, window=16), target).eval()
    with torch.no_grad():  # sharper weights so that trees differ from step to step
        for p in list(target.parameters()) + list(draft.parameters()):
            p.mul_(4.0)
    return target, draft


def _mid_state(target, draft, shape, steps_before=3):
    st = steps.DecodeState(target, draft, shape, 160, "torch")
    prompt = torch.randint(0, target.config.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        steps.prefill(st, prompt)
        for _ in range(steps_before):
            for _, fn in steps.greedy_stages(st):
                fn()
    return st


@pytest.mark.parametrize(
    ("shape", "masked"),
    [
        (None, "sdpa"),
        ((1, 1, 1), "sdpa"),
        ((3, 4, 2), "sdpa"),
        ((3, 4, 2), "math"),
        ((3, 4, 2), "efficient"),
        ((3, 4, 2), "triton"),
    ],
    ids=["ar", "chain3", "tree342", "tree342-masked-math", "tree342-masked-efficient", "tree342-masked-triton"],
)
def test_twin_stages_compiled_equal_eager(tiny_pair, shape, masked, monkeypatch):
    """Each stage, eager and compiled (fullgraph) on twin states: identical buffers. The last case writes
    the draft's window attention out (LONGSPEC_MASKED_ATTN=math), the next holds SDPA to one kernel (efficient),
    the last runs it as the registered masked-attention op (triton, the interpreter here): all must compile as a
    whole too."""
    from longspec_lab.ops import attention

    monkeypatch.setattr(attention, "MASKED_ATTN", masked)
    _twin_stages(*tiny_pair, shape)


@pytest.mark.parametrize("shape", [None, (3, 4, 2)], ids=["ar", "tree342"])
def test_twin_stages_with_the_rope_tables_kernel(tiny_pair, shape, monkeypatch):
    """LONGSPEC_ROPE_TABLES=on: the target's static-shape passes take their RoPE tables and cache slots from the
    registered op (the interpreter here), which must trace as a whole and leave every buffer as eager does."""
    from longspec_lab.kernels import rope as kernel
    from longspec_lab.ops import rope

    monkeypatch.setattr(rope, "ROPE_TABLES", "on")
    calls, real = [], kernel.rope_tables
    monkeypatch.setattr(kernel, "rope_tables", lambda *a: calls.append(1) or real(*a))
    _twin_stages(*tiny_pair, shape)
    assert calls  # the kernel made the tables (eagerly, and when traced)


@pytest.mark.parametrize("shape", [(3, 4, 2), (1, 1, 1)], ids=["tree342", "chain3"])
def test_twin_stages_with_the_greedy_accept_kernel(tiny_pair, shape, monkeypatch):
    """LONGSPEC_GREEDY_ACCEPT=on: the verify stage's acceptance is one registered op that writes the state's buffers
    in place (the interpreter here); the stage must trace whole and leave every buffer as eager does."""
    from longspec_lab.kernels import greedy_accept as kernel
    from longspec_lab.ops import accept

    monkeypatch.setattr(accept, "GREEDY_ACCEPT", "on")
    calls, real = [], kernel.greedy_accept
    monkeypatch.setattr(kernel, "greedy_accept", lambda *a: calls.append(1) or real(*a))
    _twin_stages(*tiny_pair, shape)
    assert calls  # the kernel accepted (eagerly, and when traced)


def test_twin_stages_with_the_level_written_by_its_selection(tiny_pair, monkeypatch):
    """LONGSPEC_BEAM_SELECT=on and LONGSPEC_BEAM_WRITE=on: levels after the first are selected and written into the
    tree's buffers by one registered op (the interpreter here); each stage must trace whole and leave every buffer
    as eager does."""
    from longspec_lab.kernels import beam_select as kernel
    from longspec_lab.ops import topk

    monkeypatch.setattr(topk, "BEAM_SELECT", "on")
    monkeypatch.setattr(topk, "BEAM_WRITE", "on")
    calls, real = [], kernel.beam_select_into
    monkeypatch.setattr(kernel, "beam_select_into", lambda *a: calls.append(1) or real(*a))
    _twin_stages(*tiny_pair, (3, 4, 2))
    assert calls


def test_twin_stages_with_every_fused_projection(monkeypatch):
    """Head dim 32 and fused projections, LONGSPEC_QKV_ROPE=on and LONGSPEC_ROPE_TABLES=on: the target's layers
    and the draft's self-attention write their caches (the draft's ring) from the fused kernel, a registered op
    that mutates them; every stage must still trace whole and leave every buffer as eager does."""
    from longspec_lab.models import layers
    from longspec_lab.models.config import ModelConfig
    from longspec_lab.models.layers import fuse_projections
    from longspec_lab.ops import linear, rope

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32,
                      intermediate_size=128, max_position_embeddings=512)  # fmt: skip
    target = Target(cfg).eval().fuse()
    draft = fuse_projections(Glide(DraftConfig.from_target(cfg, window=16), target).eval())
    with torch.no_grad():
        for p in list(target.parameters()) + list(draft.parameters()):
            p.mul_(4.0)
    monkeypatch.setattr(linear, "QKV_ROPE", "on")
    monkeypatch.setattr(rope, "ROPE_TABLES", "on")
    shapes, real = [], layers.qkv_rope_cache
    monkeypatch.setattr(layers, "qkv_rope_cache", lambda x, *a, **k: shapes.append(x.shape[1]) or real(x, *a, **k))
    _twin_stages(target, draft, (2, 3))
    assert {2, 3, 6} <= set(shapes)  # the draft: levels of 2 and 3 nodes, 3 pending rows; the target: 6 rows


def _twin_stages(target, draft, shape):
    st = _mid_state(target, draft, TreeShape(shape) if shape else None)
    with torch.inference_mode():
        for i, (name, _) in enumerate(steps.greedy_stages(st)):
            a, b = _clone_state(st), _clone_state(st)
            eager_fn = steps.greedy_stages(a)[i][1]
            compiled = torch.compile(steps.greedy_stages(b)[i][1], fullgraph=True, dynamic=False, backend="aot_eager")
            eager_fn()
            compiled()
            ta, tb = _tensors(a), _tensors(b)
            for key in ta:
                assert torch.equal(ta[key], tb[key]), f"stage {name}: buffer {key} differs"
            st = a  # walk on through the step, so later stages see this step's state
            torch._dynamo.reset()


@pytest.mark.parametrize("greedy_accept", ["off", "on"])
def test_inductor_compiled_step_matches_eager(tiny_pair, greedy_accept, monkeypatch):
    """The verification stage through Inductor's generated CPU code: the same predictions and path; also with the
    acceptance as one op that writes the state's buffers in place (LONGSPEC_GREEDY_ACCEPT=on), which Inductor must
    keep writing into those buffers."""
    from longspec_lab.ops import accept

    monkeypatch.setattr(accept, "GREEDY_ACCEPT", greedy_accept)
    target, draft = tiny_pair
    st = _mid_state(target, draft, TreeShape((2, 3)))
    with torch.inference_mode():
        for name, fn in steps.greedy_stages(st):
            if name == "verify":
                break
            fn()  # draft the tree of the next step
        a, b = _clone_state(st), _clone_state(st)
        steps.verify(a)
        torch.compile(steps.verify, fullgraph=True, dynamic=False)(b)
        steps.commit(a)
        steps.commit(b)
    for key in ("preds", "verified", "accepted", "path", "n_acc", "emitted", "out", "P", "pend", "stats"):
        assert torch.equal(_tensors(a)[key], _tensors(b)[key]), key
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def decoders(embedded_pair):
    target, draft, tok = embedded_pair
    return SpecDecoder(target, draft), GraphDecoder(target, draft, capacity=1400), tok


@pytest.mark.parametrize("method,kw", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_graph_decoder_equals_eager(decoders, method, kw):
    ref, fast, tok = decoders
    for p in load_prompts(min_tokens=1000)[:2]:
        ids = tok.encode(p["text"])[:1200]
        a = ref.generate(ids, method=method, max_new_tokens=33, stop_at_eos=False, **kw)
        b = fast.generate(ids, method=method, max_new_tokens=33, stop_at_eos=False, **kw)
        assert b.new_tokens == a.new_tokens
        assert b.accepted_lengths == a.accepted_lengths and b.target_calls == a.target_calls
        assert b.depth_accepted == a.depth_accepted and b.rank_tried == a.rank_tried


def test_graph_decoder_traces_like_the_eager_loop(decoders):
    ref, fast, tok = decoders
    ids = tok.encode(load_prompts(min_tokens=1000)[0]["text"])[:600]
    a = ref.generate(ids, max_new_tokens=20, stop_at_eos=False, trace=True, tree_shape=[2, 3, 3])
    b = fast.generate(ids, max_new_tokens=20, stop_at_eos=False, trace=True, tree_shape=[2, 3, 3])
    assert len(a.trace) == len(b.trace) > 1
    for x, y in zip(a.trace, b.trace):
        assert x.prefix_len == y.prefix_len and x.emitted == y.emitted
        assert torch.equal(x.tree.tokens, y.tree.tokens) and torch.equal(x.tree.parents, y.tree.parents)
        assert torch.equal(x.target_tokens, y.target_tokens) and torch.equal(x.result.path, y.result.path)
        assert torch.equal(x.result.verified, y.result.verified)


def test_graph_decoder_eos_capacity_and_refusals(decoders, embedded_pair):
    ref, fast, tok = decoders
    target = embedded_pair[0]
    ids = tok.encode(load_prompts(min_tokens=1000)[1]["text"])[:500]
    full = ref.generate(ids, max_new_tokens=20, stop_at_eos=False).new_tokens
    old = target.config.eos_token_id
    target.config.eos_token_id = full[6]
    try:
        res = fast.generate(ids, max_new_tokens=20)
    finally:
        target.config.eos_token_id = old
    assert res.stopped_at_eos and res.new_tokens == full[: full.index(full[6]) + 1]
    with pytest.raises(ValueError, match="the cache holds 1400 slots"):
        fast.generate(ids * 3, max_new_tokens=20)
    with pytest.raises(ValueError, match="use SpecDecoder"):
        fast.generate(ids, max_new_tokens=5, verify="rrs", temperature=1.0)
    with pytest.raises(ValueError, match="use SpecDecoder"):
        fast.generate(ids, method="chain", max_new_tokens=5, do_sample=True, temperature=1.0)
    assert fast.generate(ids, max_new_tokens=20, stop_at_eos=False).new_tokens == full  # still works


@pytest.mark.parametrize(
    "method,kw",
    [
        ("ar", {"verify": "target-sample"}),
        ("tree", {"verify": "target-sample", "tree_shape": [2, 3, 3]}),
        ("chain", {"verify": "target-sample", "gamma": 3}),
        ("tree", {"verify": "naive-topk", "tree_shape": [3, 3]}),
    ],
    ids=["ar", "tree", "chain", "naive-topk"],
)
def test_graph_decoder_samples_like_the_eager_loop(decoders, method, kw):
    """Sampled runs: the same seed gives the same tokens, lengths, statistics and trace on both paths
    (the draft and verification stages replayed, the rule's walk on the host in between)."""
    ref, fast, tok = decoders
    ids = tok.encode(load_prompts(min_tokens=1000)[0]["text"])[:700]
    common = dict(method=method, max_new_tokens=24, stop_at_eos=False, temperature=0.9, top_k=50, seed=11, **kw)
    a = ref.generate(ids, trace=method != "ar", **common)
    b = fast.generate(ids, trace=method != "ar", **common)
    assert b.new_tokens == a.new_tokens and b.accepted_lengths == a.accepted_lengths
    assert b.seed == a.seed == 11 and b.verify == kw["verify"] and b.temperature == 0.9
    assert b.depth_accepted == a.depth_accepted and b.rank_tried == a.rank_tried
    for x, y in zip(a.trace, b.trace):
        assert torch.equal(x.result.path, y.result.path) and x.emitted == y.emitted
    other = fast.generate(ids, **dict(common, seed=12))
    assert other.new_tokens != b.new_tokens  # the seed matters


class _FakeGraph:
    """Stands in for a CUDA graph on the CPU: replay calls the captured function and counts the replays."""

    replays: list = []

    def __init__(self, fn):
        self.fn = fn

    def replay(self):
        _FakeGraph.replays.append(self.fn)
        self.fn()


def test_step_graph_replays_one_graph_per_step_and_stage_graphs_when_timed(embedded_pair, monkeypatch):
    """The step graph's wiring without a GPU: `capture` records a fake graph per function. A greedy tree step
    must replay ONE graph (the stages in order) and give the eager loop's tokens; with stage timing requested
    (events need CUDA, so only the choice of graphs is checked) and with step_graph off, one graph per stage."""
    import longspec_lab.decoding.graphs as graphs

    target, draft, tok = embedded_pair
    monkeypatch.setattr(graphs, "capture", lambda fns, warmup=3: [_FakeGraph(fn) for fn in fns])
    ids = tok.encode(load_prompts(min_tokens=1000)[0]["text"])[:500]
    ref = SpecDecoder(target, draft).generate(ids, max_new_tokens=24, stop_at_eos=False, tree_shape=[2, 3, 3])
    for step_graph, per_step in ((True, 1), (False, 5)):  # draft1..draft3, verify, commit
        dec = GraphDecoder(target, draft, capacity=700, step_graph=step_graph)
        dec.graphs = True  # the fake capture stands in for CUDA's
        dec.generate(ids, max_new_tokens=4, stop_at_eos=False, tree_shape=[2, 3, 3])  # plan and capture
        _FakeGraph.replays.clear()
        res = dec.generate(ids, max_new_tokens=24, stop_at_eos=False, tree_shape=[2, 3, 3])
        assert res.new_tokens == ref.new_tokens and res.accepted_lengths == ref.accepted_lengths
        assert len(_FakeGraph.replays) == per_step * len(res.accepted_lengths)
        key = ("tree", (2, 3, 3), False, None)
        assert (key in dec._step_stages) == step_graph
    stages = dec._plans[key][1] + dec._plans[key][2]
    with_step = GraphDecoder(target, draft, capacity=700, step_graph=True)
    with_step.graphs = True
    with_step.plan("tree", TreeShape.of([2, 3, 3]))
    assert [s.name for s in stages] == ["draft1", "draft2", "draft3", "verify", "commit"]
    assert [s.name for s in with_step._step_stages[key]] == ["step"]


def test_step_graph_switch_is_checked(embedded_pair, monkeypatch):
    import longspec_lab.decoding.graphs as graphs

    monkeypatch.setattr(graphs, "STEP_GRAPH", "yes")
    with pytest.raises(ValueError, match="LONGSPEC_STEP_GRAPH='yes' is not one of on, off"):
        GraphDecoder(*embedded_pair[:2])


def test_a_stage_that_writes_nothing_raises_instead_of_spinning(tiny_pair, monkeypatch):
    """Every step emits at least one token, so a burst that leaves the output where it was means a stage wrote
    nothing (as a kernel that never reaches its last program would, on a GPU where a stale n = 0 wraps around
    instead of failing): the decoder says so instead of looping forever, and decodes again once the stage is back."""
    target, draft = tiny_pair
    dec = GraphDecoder(target, draft, capacity=300)
    ids = list(range(5, 25))
    want = dec.generate(ids, method="tree", tree_shape=[2, 2], max_new_tokens=12, stop_at_eos=False).new_tokens
    real = steps.advance
    monkeypatch.setattr(steps, "advance", lambda *a: None)  # the commit's bookkeeping writes nothing
    with pytest.raises(RuntimeError, match="emitted no token"):
        dec.generate(ids, method="tree", tree_shape=[2, 2], max_new_tokens=12, stop_at_eos=False)
    monkeypatch.setattr(steps, "advance", real)
    assert dec.generate(ids, method="tree", tree_shape=[2, 2], max_new_tokens=12, stop_at_eos=False).new_tokens == want
