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


@pytest.mark.parametrize("chunks", [[1] * 30, [5, 1, 9, 3, 12]])
def test_ingest_matches_naive_one_by_one_and_in_chunks(chunks):
    """At ingest time the target cache holds the tokens before the chunk: cross_len = chunk start.
    Chunks of 1 are exactly forward_train with staleness 0; a chunk of 12 > W=8 exercises the split."""
    target, draft = make_pair(window=8)
    B, T = 2, sum(chunks)
    ids = torch.randint(0, TINY.vocab_size, (B, T), generator=torch.Generator().manual_seed(3))
    tcache = target_cache_with_random_kv(target, B, T)
    dcache = draft.new_cache(batch=B)
    outs, cross_len, start = [], [], 0
    with torch.no_grad():
        for n in chunks:
            tcache.length = start
            outs.append(draft.ingest(ids[:, start : start + n], dcache, tcache))
            cross_len += [start] * n
            start += n
        got = torch.cat(outs, 1)
        pos = torch.arange(T)[None].expand(B, T)
        want = naive_logits(draft, target, ids, pos, tcache.k[-1], tcache.v[-1], cross_len, 8)
        close(got, want)
        assert dcache.seen == T
        if chunks[0] == 1:
            close(got, draft.forward_train(ids, pos, tcache.k[-1][:, :, :T], tcache.v[-1][:, :, :T], 0).double())


@pytest.mark.parametrize("prefill_len", [5, 8, 21])
def test_ring_only_prefill_gives_the_same_state(prefill_len):
    """ingest(..., logits=False) fills the ring without computing outputs: later logits are the same
    as after a full ingest (prefills shorter than, equal to and longer than the window W=8)."""
    target, draft = make_pair(window=8)
    B = 2
    ids = torch.randint(0, TINY.vocab_size, (B, prefill_len + 6), generator=torch.Generator().manual_seed(9))
    tcache = target_cache_with_random_kv(target, B, prefill_len + 6)
    with torch.no_grad():
        full, ring_only = draft.new_cache(batch=B), draft.new_cache(batch=B)
        tcache.length = prefill_len
        draft.ingest(ids[:, :prefill_len], full, tcache)
        assert draft.ingest(ids[:, :prefill_len], ring_only, tcache, logits=False) is None
        assert ring_only.seen == full.seen == prefill_len
        a = draft.ingest(ids[:, prefill_len:], full, tcache)
        b = draft.ingest(ids[:, prefill_len:], ring_only, tcache)
    close(b, a.double(), tol=1e-6)


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


@pytest.mark.parametrize("window,backend", [(64, "torch"), (6, "torch"), (6, "sdpa")])
def test_tree_forward_matches_ingesting_each_path(window, backend):
    target, draft = make_pair(window=window, seed=4)
    gen = torch.Generator().manual_seed(5)
    B, ctx = 1, 20
    parents, levels = random_tree(4, gen)
    N = len(parents)
    tokens = torch.randint(0, TINY.vocab_size, (B, N + 1), generator=gen)  # index 0 unused (root)
    ids = torch.randint(0, TINY.vocab_size, (B, ctx), generator=gen)
    tcache = target_cache_with_random_kv(target, B, 64)
    tcache.length = ctx - 3  # cross-attn target length fixed for the whole step
    dcache = draft.new_cache(batch=B, max_tree_nodes=16)
    anc = torch.zeros(N + 1, N + 1, dtype=torch.bool)  # anc[i, j]: j is i or an ancestor of i
    depth = [0] * (N + 1)
    for i in range(1, N + 1):
        anc[i, i] = True
        anc[i] |= anc[parents[i - 1]]
        depth[i] = depth[parents[i - 1]] + 1
    anc[:, 0] = False  # the root is the last ingested token, not in scratch
    with torch.no_grad():
        draft.ingest(ids, dcache, tcache)
        ring_before, seen = dcache.k.clone(), dcache.seen
        got = {}
        for lvl in levels:
            m = lvl[-1]
            idx = torch.tensor(lvl)
            out = draft.tree_forward(
                tokens[:, idx],
                idx - 1,
                torch.tensor([seen - 1 + depth[i] for i in lvl]),
                anc[idx][:, 1 : m + 1],
                dcache,
                tcache,
                backend=backend,
            )
            got.update({i: out[:, j] for j, i in enumerate(lvl)})
        assert dcache.seen == seen and torch.equal(dcache.k, ring_before)
        for i in range(1, N + 1):
            path = [j for j in range(1, N + 1) if anc[i, j]]  # ancestors in level order = root-to-node
            ref = draft.ingest(tokens[:, path], dcache.clone(), tcache)[:, -1]
            close(got[i], ref.double(), tol=1e-5)


def test_tree_forward_rejects_too_many_nodes():
    target, draft = make_pair(window=16)
    tcache = target_cache_with_random_kv(target, 1, 8)
    dcache = draft.new_cache(max_tree_nodes=4)
    draft.ingest(torch.tensor([[1, 2]]), dcache, tcache)
    with pytest.raises(ValueError, match="max_tree_nodes"):
        draft.tree_forward(
            torch.ones(1, 5, dtype=torch.long),
            torch.arange(5),
            torch.full((5,), 2),
            torch.eye(5, dtype=torch.bool),
            dcache,
            tcache,
        )


def test_draft_cache_bytes_constant_as_context_grows():
    target, draft = make_pair(window=64)
    tcache = target_cache_with_random_kv(target, 1, 256)  # the target's cache is not under test here
    tcache.length = 256
    dcache = draft.new_cache(max_tree_nodes=80)
    gen = torch.Generator().manual_seed(6)
    sizes = {}
    with torch.no_grad():
        while dcache.seen < 8192:
            out = draft.ingest(torch.randint(0, TINY.vocab_size, (1, 512), generator=gen), dcache, tcache)
            sizes[dcache.seen] = dcache.nbytes
    assert torch.isfinite(out).all()
    assert sizes[1024] == sizes[8192] == 2 * 2 * 64 * 16 * 4 + 2 * 2 * 80 * 16 * 4


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
