"""GliDe draft: the three forward paths against an independent float64 implementation, tree levels
against path ingestion, constant cache size, and checkpoint loading (reference names, bad inputs)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from longspec_lab.models.config import PRESETS
from longspec_lab.models.draft_io import load_draft, save_draft
from longspec_lab.models.glide import DraftConfig, Glide
from longspec_lab.models.target import Target
from longspec_lab.ops import attention

TINY = PRESETS["tiny"]


def make_pair(window, seed=0, cfg=TINY):
    torch.manual_seed(seed)
    target = Target(cfg).eval()
    draft = Glide(DraftConfig.from_target(cfg, window=window), target).eval()
    with torch.no_grad():  # sharper than the training init, so masking mistakes show in the logits
        for name, p in draft.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "layernorm" in name else 0.25 * torch.randn_like(p))
    return target, draft


def naive_logits(draft, target, ids, pos, tk, tv, cross_len, window):
    """The draft's equations written out in float64, one head at a time.
    Self-attn: i sees j iff j <= i and pos_i - pos_j < window. Cross: i sees target [0, cross_len[i])."""
    P = {k: v.double() for k, v in draft.state_dict().items()}
    E, Wout = target.model.embed_tokens.weight.double(), target.lm_head.weight.double()
    c, tc = draft.config, target.config
    D, Hq, Hkv = c.head_dim, c.num_heads, c.num_kv_heads
    inv = 1.0 / tc.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)

    def rope(x, p):  # x [T, H, D], p [T]
        ang = p.double()[:, None] * inv  # [T, D/2]
        cs, sn = ang.cos()[:, None], ang.sin()[:, None]
        x1, x2 = x[..., : D // 2], x[..., D // 2 :]
        return torch.cat([x1 * cs - x2 * sn, x2 * cs + x1 * sn], -1)

    def rms(x, w):
        return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps)

    def lin(x, name, bias=False):
        y = x @ P[name + ".weight"].T
        return y + P[name + ".bias"] if bias else y

    def softmax_attend(q, k, v, vis):  # q [D], k/v [N, D], vis [N] bool
        if not vis.any():
            return torch.zeros(D, dtype=torch.float64)
        s = (k @ q) / math.sqrt(D)
        s[~vis] = -math.inf
        return torch.softmax(s, 0) @ v

    out = []
    for b in range(ids.shape[0]):
        T, p = ids.shape[1], pos[b]
        h = E[ids[b]]
        x = rms(h, P["input_layernorm.weight"])
        q = rope(lin(x, "self_attn.q_proj", True).view(T, Hq, D), p)
        k = rope(lin(x, "self_attn.k_proj", True).view(T, Hkv, D), p)
        v = lin(x, "self_attn.v_proj", True).view(T, Hkv, D)
        o = torch.zeros(T, Hq, D, dtype=torch.float64)
        for i in range(T):
            vis = (torch.arange(T) <= i) & (p[i] - p < window)
            for hh in range(Hq):
                g = hh // (Hq // Hkv)
                o[i, hh] = softmax_attend(q[i, hh], k[:, g], v[:, g], vis)
        h = h + lin(o.reshape(T, -1), "self_attn.o_proj")
        x = rms(h, P["post_self_attention_layernorm.weight"])
        q = rope(lin(x, "cross_attn.q_proj", True).view(T, Hq, D), p)
        o = torch.zeros(T, Hq, D, dtype=torch.float64)
        for i in range(T):
            vis = torch.arange(tk.shape[2]) < cross_len[i]
            for hh in range(Hq):
                g = hh // (Hq // Hkv)
                o[i, hh] = softmax_attend(q[i, hh], tk[b, g].double(), tv[b, g].double(), vis)
        h = h + lin(o.reshape(T, -1), "cross_attn.o_proj")
        x = rms(h, P["post_cross_attention_layernorm.weight"])
        h = h + lin(F.silu(lin(x, "mlp.gate_proj")) * lin(x, "mlp.up_proj"), "mlp.down_proj")
        out.append(h @ Wout.T)
    return torch.stack(out)


def close(a, b, tol=2e-4):
    scale = b.abs().max().item()
    assert (a.double() - b).abs().max().item() <= tol * scale, (a.double() - b).abs().max().item()


def target_cache_with_random_kv(target, batch, max_len, seed=1):
    g = torch.Generator().manual_seed(seed)
    cache = target.new_cache(max_len, batch=batch)
    cache.k[-1] = torch.randn(cache.k[-1].shape, generator=g)
    cache.v[-1] = torch.randn(cache.v[-1].shape, generator=g)
    return cache


@pytest.mark.parametrize("staleness", [0, 3])
def test_forward_train_matches_naive_with_offset_positions(staleness):
    target, draft = make_pair(window=8)
    B, T = 2, 30
    ids = torch.randint(0, TINY.vocab_size, (B, T), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(T)[None].repeat(B, 1)
    pos[0, 3:] += 200  # anchor-offset: 3 sinks, the rest shifted (the sinks leave the window)
    pos[1] += 5
    cache = target_cache_with_random_kv(target, B, T)
    with torch.no_grad():
        got = draft.forward_train(ids, pos, cache.k[-1], cache.v[-1], staleness)
    want = naive_logits(draft, target, ids, pos, cache.k[-1], cache.v[-1], [max(0, i - staleness) for i in range(T)], 8)
    close(got, want)


def _ingest(draft, ring, tokens, tcache, P, pad_to=None):
    """draft.ingest on a block of real tokens [T], padded with zeros up to pad_to (as the decoder does)."""
    T = tokens.numel()
    block = torch.cat([tokens, torch.zeros((pad_to or T) - T, dtype=torch.long)])
    out = draft.ingest(block, torch.tensor([T]), ring, tcache.k[-1], tcache.v[-1], torch.tensor([P]))
    return out[:T]


@pytest.mark.parametrize("masked", ["sdpa", "efficient", "math", "triton"])
@pytest.mark.parametrize("chunks", [[1] * 30, [5, 1, 9, 3, 12]])
def test_ingest_matches_naive_one_by_one_and_in_chunks(chunks, masked, monkeypatch):
    """At ingest time the target cache holds the tokens before the chunk: cross_len = chunk start.
    Chunks of 1 are exactly forward_train with staleness 0; a chunk of 12 > W=8 overruns the window
    inside one block; every block is padded to 13 slots, so padding must stay invisible. Both forms of
    the window attention (LONGSPEC_MASKED_ATTN) give the float64 answer."""
    monkeypatch.setattr(attention, "MASKED_ATTN", masked)
    target, draft = make_pair(window=8)
    T = sum(chunks)
    ids = torch.randint(0, TINY.vocab_size, (1, T), generator=torch.Generator().manual_seed(3))
    tcache = target_cache_with_random_kv(target, 1, T)
    ring = draft.new_ring(max_pending=13)
    outs, cross_len, start = [], [], 0
    with torch.no_grad():
        for n in chunks:
            start_ = max(start, 1)  # the decoder always has >= 1 committed target token
            outs.append(_ingest(draft, ring, ids[0, start : start + n], tcache, start_, pad_to=13))
            cross_len += [start_] * n
            start += n
        got = torch.cat(outs, 0)[None]
        pos = torch.arange(T)[None]
        want = naive_logits(draft, target, ids, pos, tcache.k[-1], tcache.v[-1], cross_len, 8)
        close(got, want)
        assert int(ring.seen) == T


@pytest.mark.parametrize("prefill_len", [5, 8, 21])
def test_prefill_gives_the_ingested_state(prefill_len):
    """prefill fills the ring without computing outputs: later logits are the same as after ingesting
    the prompt (prefills shorter than, equal to and longer than the window W=8)."""
    target, draft = make_pair(window=8)
    ids = torch.randint(0, TINY.vocab_size, (prefill_len + 6,), generator=torch.Generator().manual_seed(9))
    tcache = target_cache_with_random_kv(target, 1, prefill_len + 6)
    with torch.no_grad():
        full, ring_only = draft.new_ring(max_pending=prefill_len), draft.new_ring(max_pending=prefill_len)
        _ingest(draft, full, ids[:prefill_len], tcache, prefill_len)
        draft.prefill(ids[:prefill_len], ring_only)
        assert int(ring_only.seen) == int(full.seen) == prefill_len
        a = _ingest(draft, full, ids[prefill_len:], tcache, prefill_len)
        b = _ingest(draft, ring_only, ids[prefill_len:], tcache, prefill_len)
    close(b[None], a[None].double(), tol=1e-6)


def random_tree(n_levels, gen):
    """Level-ordered parents of non-root nodes 1..N (0 = root) and their levels."""
    parents, levels, prev = [], [], [0]
    node = 1
    for lvl in range(n_levels):
        cur = []
        for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
            parents.append(prev[int(torch.randint(0, len(prev), (1,), generator=gen))])
            cur.append(node)
            node += 1
        levels.append(cur)
        prev = cur
    return parents, levels


@pytest.mark.parametrize("masked", ["sdpa", "efficient", "math", "triton"])
@pytest.mark.parametrize("window,backend", [(64, "torch"), (6, "torch"), (6, "sdpa")])
def test_tree_level_matches_ingesting_each_path(window, backend, masked, monkeypatch):
    monkeypatch.setattr(attention, "MASKED_ATTN", masked)
    target, draft = make_pair(window=window, seed=4)
    gen = torch.Generator().manual_seed(5)
    ctx = 20
    parents, levels = random_tree(4, gen)
    N = len(parents)
    tokens = torch.randint(0, TINY.vocab_size, (N + 1,), generator=gen)  # index 0 unused (root)
    ids = torch.randint(0, TINY.vocab_size, (ctx,), generator=gen)
    tcache = target_cache_with_random_kv(target, 1, 64)
    P = ctx - 3  # cross-attn target length fixed for the whole step
    ring = draft.new_ring(max_pending=ctx, max_tree_nodes=N + 1)
    anc = torch.zeros(N + 1, N + 1, dtype=torch.bool)  # anc[i, j]: j is i or an ancestor of i
    depth = [0] * (N + 1)
    for i in range(1, N + 1):
        anc[i, i] = True
        anc[i] |= anc[parents[i - 1]]
        depth[i] = depth[parents[i - 1]] + 1
    anc[:, 0] = False  # the root is the last ingested token, not in scratch
    with torch.no_grad():
        draft.prefill(ids[:-4], ring)
        _ingest(draft, ring, ids[-4:], tcache, P, pad_to=6)
        ring_before, seen = ring.k[:, :, : ring.R].clone(), int(ring.seen)
        got = {}
        for lvl in levels:
            idx = torch.tensor(lvl)
            qpos = torch.tensor([seen - 1 + depth[i] for i in lvl])
            out = draft.tree_level(
                tokens[idx], qpos, lvl[0] - 1, anc[idx][:, 1:], ring, tcache.k[-1], tcache.v[-1],
                torch.tensor([P]), backend,
            )  # fmt: skip
            got.update({i: out[j] for j, i in enumerate(lvl)})
        assert int(ring.seen) == seen and torch.equal(ring.k[:, :, : ring.R], ring_before)
        for i in range(1, N + 1):
            path = [j for j in range(1, N + 1) if anc[i, j]]  # ancestors in level order = root-to-node
            probe = draft.new_ring(max_pending=ctx)
            draft.prefill(ids, probe)
            ref = _ingest(draft, probe, tokens[path], tcache, P)[-1]
            close(got[i][None], ref[None].double(), tol=1e-5)


def test_unknown_masked_attention_form_is_named(monkeypatch):
    monkeypatch.setattr(attention, "MASKED_ATTN", "flash")
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 5, 8)
    with pytest.raises(ValueError, match="LONGSPEC_MASKED_ATTN='flash'"):
        attention.masked_sdpa(q, k, k, torch.ones(3, 5, dtype=torch.bool))


def test_draft_ring_bytes_constant_as_context_grows():
    target, draft = make_pair(window=64)
    tcache = target_cache_with_random_kv(target, 1, 256)  # the target's cache is not under test here
    ring = draft.new_ring(max_pending=6, max_tree_nodes=80)
    gen = torch.Generator().manual_seed(6)
    sizes = {}
    with torch.no_grad():
        while int(ring.seen) < 8192:
            n = int(torch.randint(1, 7, (1,), generator=gen))
            out = _ingest(draft, ring, torch.randint(0, TINY.vocab_size, (n,), generator=gen), tcache, 256, 6)
            sizes[int(ring.seen)] = ring.nbytes
    assert torch.isfinite(out).all()
    assert len(set(sizes.values())) == 1
    assert ring.nbytes == 2 * 2 * (64 + 6 + 79) * 16 * 4  # K and V, Hkv 2, ring + scratch slots, D 16, fp32


# ---------------------------------------------------------------------- checkpoints


def test_save_load_round_trip(tmp_path):
    target, draft = make_pair(window=8)
    save_draft(draft, tmp_path)
    loaded = load_draft(tmp_path, target)
    assert loaded.config == draft.config
    for k, v in draft.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert "target" not in dict(loaded.named_modules())  # the target is shared, not owned


@pytest.mark.parametrize("prefix", ["", "model.", "model.layers.0."])
def test_reference_names_load(tmp_path, prefix):
    target, draft = make_pair(window=512)
    state = {prefix + k: v.clone() for k, v in draft.state_dict().items()}
    kv = TINY.num_kv_heads * TINY.head_dim
    state[prefix + "cross_attn.k_proj.weight"] = torch.randn(kv, TINY.hidden_size)
    state[prefix + "cross_attn.v_proj.weight"] = torch.randn(kv, TINY.hidden_size)
    state["model.embed_tokens.weight"] = torch.randn(TINY.vocab_size, TINY.hidden_size)  # shared: skipped
    save_file(state, str(tmp_path / "model.safetensors"))
    with (
        pytest.warns(UserWarning, match="cross_attn.k_proj"),
        pytest.warns(UserWarning, match="no draft_config.json; inferred"),
    ):
        loaded = load_draft(tmp_path, target)
    assert loaded.config == draft.config
    for k, v in draft.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_mismatched_target_raises(tmp_path):
    _, draft = make_pair(window=8)
    save_draft(draft, tmp_path)
    for cfg, what in (
        (TINY.replace(hidden_size=32), "hidden size"),
        (TINY.replace(num_heads=2, num_kv_heads=1, head_dim=32), "head_dim"),
        (TINY.replace(vocab_size=80), "vocabulary"),
    ):
        with pytest.raises(ValueError, match=what):
            load_draft(tmp_path, Target(cfg))
    # config claims the right layout but the tensors show another head count
    raw = json.loads((tmp_path / "draft_config.json").read_text())
    (tmp_path / "draft_config.json").write_text(json.dumps(dict(raw, num_heads=8)))
    with pytest.raises(ValueError, match="has shape .* train a draft"):
        load_draft(tmp_path, Target(TINY))
    (tmp_path / "draft_config.json").write_text(json.dumps(dict(raw, vocab_size=99)))
    with pytest.raises(ValueError, match="vocabulary size 99"):
        load_draft(tmp_path, Target(TINY))


def test_missing_and_pickle_only_folders_refused(tmp_path):
    target = Target(TINY)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_draft(tmp_path / "nope", target)
    with pytest.raises(ValueError, match="no draft.safetensors"):
        load_draft(tmp_path, target)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ValueError, match="pickle"):
        load_draft(tmp_path, target)


def test_fused_residual_gives_the_readable_logits(monkeypatch):
    """LONGSPEC_FUSE_RESIDUAL=on (the interpreter here): a fused draft's cross-attention o_proj + residual and its
    norm + gate/up run as one kernel; ingest and a tree level give the logits of the two-launch path."""
    import os

    import longspec_lab.kernels.norm_linear as nl
    from longspec_lab.models.layers import fuse_projections
    from longspec_lab.ops import linear

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("the kernel runs on CUDA or under TRITON_INTERPRET=1")
    target, draft = make_pair(window=8, seed=6)
    fuse_projections(draft)
    assert draft.mlp.fused
    calls = []
    real = nl.residual_norm_linear
    monkeypatch.setattr(nl, "residual_norm_linear", lambda *a: calls.append(1) or real(*a))
    tcache = target_cache_with_random_kv(target, 1, 24)
    ids = torch.randint(0, TINY.vocab_size, (10,), generator=torch.Generator().manual_seed(7))
    outs = {}
    for value in ("off", "on"):
        monkeypatch.setattr(linear, "FUSE_RESIDUAL", value)
        ring = draft.new_ring(max_pending=10, max_tree_nodes=3)
        with torch.no_grad():
            ing = draft.ingest(ids, torch.tensor([10]), ring, tcache.k[-1], tcache.v[-1], torch.tensor([9]))
            anc = torch.tensor([[True, False], [False, True]])
            lvl = draft.tree_level(ids[:2], ring.seen - 1 + 1 + torch.zeros(2, dtype=torch.long), 0, anc, ring,
                                   tcache.k[-1], tcache.v[-1], torch.tensor([10]))  # fmt: skip
        outs[value] = (ing, lvl)
    assert calls  # the "on" run took the kernel (ingest and the tree level, once each)
    for a, b in zip(outs["off"], outs["on"]):  # float32 sums blocked differently, through sharp random weights
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_fused_qkv_rope_writes_the_ring_as_the_readable_path(monkeypatch):
    """LONGSPEC_QKV_ROPE=on with a fused draft of head dim 32: ingest and every tree level run the norm, q/k/v
    (with biases), RoPE and the ring write as one kernel (the interpreter here) and give the readable path's
    logits, ring keys and values, slot positions and `seen`, for a padded ingest block and a random tree."""
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")
    from longspec_lab.models import glide, layers
    from longspec_lab.models.config import ModelConfig
    from longspec_lab.ops import linear

    cfg = ModelConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32,
                      intermediate_size=128, max_position_embeddings=512)  # fmt: skip
    target, draft = make_pair(window=6, seed=6, cfg=cfg)
    layers.fuse_projections(draft)
    calls, real, cross, real_cross = [], layers.qkv_rope_cache, [], glide.linear_rope
    monkeypatch.setattr(layers, "qkv_rope_cache", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(glide, "linear_rope", lambda *a, **k: cross.append(1) or real_cross(*a, **k))
    gen = torch.Generator().manual_seed(7)
    parents, levels = random_tree(3, gen)
    N = len(parents)
    tokens = torch.randint(0, cfg.vocab_size, (N + 1,), generator=gen)
    ids = torch.randint(0, cfg.vocab_size, (16,), generator=gen)
    anc = torch.zeros(N + 1, N + 1, dtype=torch.bool)
    depth = [0] * (N + 1)
    for i in range(1, N + 1):
        anc[i, i] = True
        anc[i] |= anc[parents[i - 1]]
        depth[i] = depth[parents[i - 1]] + 1
    tcache = target_cache_with_random_kv(target, 1, 64)
    runs = {}
    for value in ("off", "on"):
        monkeypatch.setattr(linear, "QKV_ROPE", value)
        calls.clear()
        cross.clear()
        ring = draft.new_ring(max_pending=6, max_tree_nodes=N + 1)
        with torch.no_grad():
            draft.prefill(ids[:-4], ring)
            outs = [_ingest(draft, ring, ids[-4:], tcache, 13, pad_to=6)]
            seen = int(ring.seen)
            for lvl in levels:
                idx = torch.tensor(lvl)
                qpos = torch.tensor([seen - 1 + depth[i] for i in lvl])
                outs.append(draft.tree_level(tokens[idx], qpos, lvl[0] - 1, anc[idx][:, 1:], ring, tcache.k[-1],
                                             tcache.v[-1], torch.tensor([13])))  # fmt: skip
        runs[value] = outs, ring
        assert len(calls) == (1 + len(levels) if value == "on" else 0)  # one kernel per ingest and per level
        assert len(cross) == len(calls)  # and one for the cross-attention's query with its RoPE
    (a, ra), (b, rb) = runs["off"], runs["on"]
    for x, y in zip(a, b):  # float32 sums in another order: within 1e-5 of the largest logit
        close(y, x.double(), tol=1e-5)
    close(rb.cache_k, ra.cache_k.double(), tol=1e-5)
    close(rb.cache_v, ra.cache_v.double(), tol=1e-5)
    assert torch.equal(rb.pos, ra.pos) and torch.equal(rb.seen, ra.seen)
