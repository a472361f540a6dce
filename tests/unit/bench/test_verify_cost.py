"""The transformers-agreement check of bench/verify_cost.py on a small Llama-3-shaped model (CPU): in float32
our logits and every layer match stock `transformers`; in bf16 they differ by about what bf16 does to
transformers itself; and a difference planted in one layer is reported at that layer."""

import dataclasses

import pytest
import torch

pytest.importorskip("transformers")

from longspec_lab.bench import verify_cost as vc  # noqa: E402
from longspec_lab.models.config import PRESETS  # noqa: E402

SMALL = dataclasses.replace(
    PRESETS["llama3-8b"],  # keeps its rope (theta 500000, llama3 scaling) and GQA 4:1 ratio
    vocab_size=256,
    hidden_size=128,
    num_layers=3,
    num_heads=4,
    num_kv_heads=1,
    head_dim=32,
    intermediate_size=256,
    bos_token_id=None,
    eos_token_id=None,
)


def _run(monkeypatch=None, plant_layer=None):
    torch.manual_seed(0)
    target = vc.random_target(SMALL, torch.device("cpu"), torch.float32, seed=1)
    if plant_layer is not None:
        build = vc.build_hf

        def planted(t, device):
            hf = build(t, device)
            w = hf.model.layers[plant_layer].mlp.down_proj.weight
            hf.model.layers[plant_layer].mlp.down_proj.weight = torch.nn.Parameter(w.detach() * 1.01)  # not shared
            return hf

        monkeypatch.setattr(vc, "build_hf", planted)
    return vc.hf_agreement(target, torch.device("cpu"), context=40, n_prefill=12)


def test_fp32_matches_and_bf16_is_within_its_own_spread():
    r = _run()
    for stage in ("prefill_fp32", "tree_fp32"):
        assert r[stage]["first_layer_over_tol"] is None, r[stage]
        assert len(r[stage]["layer_max_rel_diff"]) == SMALL.num_layers
        assert r[stage]["logits_max_abs_diff"] <= 1e-4 * r[stage]["logits_max_abs"]
    for stage in ("prefill_bf16", "tree_bf16"):
        spread = r[stage]["hf_bf16_vs_hf_fp32"]["logits_max_abs_diff"]
        assert 0 < r[stage]["logits_max_abs_diff"] <= 4 * spread + 1e-2, r[stage]


def test_planted_difference_is_found_at_its_layer(monkeypatch):
    r = _run(monkeypatch, plant_layer=1)
    for stage in ("prefill_fp32", "tree_fp32"):
        assert r[stage]["first_layer_over_tol"] == 1, r[stage]["layer_max_rel_diff"]
        assert r[stage]["layer_max_rel_diff"][0] <= 1e-5


def test_bench_verify_module_is_the_verify_cost_command():
    """`python -m longspec_lab.bench_verify --help` runs verify_cost's parser (the same flags)."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "longspec_lab.bench_verify", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "--contexts" in out.stdout and "--agreement" in out.stdout and "--minimal-only" in out.stdout


def test_draft_step_runs_the_library_pieces_and_states_its_floor(monkeypatch):
    """The 8B draft-step measurement on the small shape, timings stubbed (no GPU): every level runs through
    the library (window attention, prefix_attention, beam_level), each level returns the beam's top
    `width` candidates, and the floor counts the draft's own weights, the LM head once per level and one
    layer of the target's KV at this context."""
    import triton.testing

    calls = []

    def one_call(fn, warmup=5, rep=40):
        calls.append(fn())
        return 1.0

    monkeypatch.setattr(vc, "graphed", lambda fn: fn)
    monkeypatch.setattr(triton.testing, "do_bench", one_call)
    torch.manual_seed(0)
    target = vc.random_target(SMALL, torch.device("cpu"), torch.float32, seed=1)
    P = 50
    mask, _ = vc.verify_block(4, device="cpu")
    cache = target.new_cache(P + mask.shape[0] + 8)
    rep = vc._draft_and_commit(target, cache, P, torch.float32, torch.device("cpu"))
    assert rep["draft_level_graph_ms"] == [1.0] * 5 and rep["draft_step_graph_ms"] == 1.0
    widths = [4, 16, 16, 16, 16]
    for (parent, token, score), w in zip(calls[:5], widths):  # beam_level's (parent rank, token, score)
        assert parent.shape == token.shape == score.shape == (w,)
        assert bool((score[:-1] >= score[1:]).all())  # best first
    from longspec_lab.models.glide import DraftConfig, Glide

    draft = Glide(DraftConfig.from_target(SMALL), target)
    own = sum(p.numel() * 4 for p in draft.parameters())
    head = SMALL.vocab_size * SMALL.hidden_size * 4
    kv = P * 2 * SMALL.num_kv_heads * SMALL.head_dim * 4
    assert rep["draft_floor_bytes"] == own + 5 * head + kv
    _, nbytes = vc.draft_levels(target, cache, P, torch.float32, torch.device("cpu"))
    assert nbytes["floor"] == rep["draft_floor_bytes"]
    matrices = sum(p.numel() * 4 for p in draft.parameters() if p.dim() == 2)
    assert nbytes["projections"] == matrices + 5 * head < own + 5 * head
    assert nbytes["levels"] == rep["draft_levels_floor_bytes"] == 5 * (own + head + kv)  # each level reads all three


def test_compiled_draft_step_traces_whole_and_selects_what_the_eager_step_selects(monkeypatch):
    """With compile_draft the whole draft step (every level: the layer, the LM head, the beam's selection) goes
    through torch.compile(fullgraph=True) without a graph break, and the compiled step picks the same parents,
    tokens and scores as the levels run one by one; its compile time is recorded apart."""
    import triton.testing

    import longspec_lab.decoding.graphs as graphs

    calls = []

    def one_call(fn, warmup=5, rep=40):
        calls.append(fn())
        return 1.0

    def aot_eager(fn, mode):  # Inductor's own code generation is the GPU run's business; the trace is tested here
        return torch.compile(fn, fullgraph=True, dynamic=False, backend="aot_eager")

    monkeypatch.setattr(vc, "graphed", lambda fn: fn)
    monkeypatch.setattr(triton.testing, "do_bench", one_call)
    monkeypatch.setattr(graphs, "compile_stage", aot_eager)
    target = vc.random_target(SMALL, torch.device("cpu"), torch.float32, seed=2)
    mask, _ = vc.verify_block(4, device="cpu")
    cache = target.new_cache(40 + mask.shape[0] + 8)
    with torch.inference_mode():
        rep = vc._draft_and_commit(target, cache, 40, torch.float32, torch.device("cpu"), compile_draft=True)
    assert "draft_compile_error" not in rep, rep.get("draft_compile_error")
    assert rep["draft_step_compiled_ms"] == 1.0 and rep["draft_compile_s"] > 0
    eager_levels, eager_step, compiled_step = calls[:5], calls[5], calls[6]
    for got, want_step, want_level in zip(compiled_step, eager_step, eager_levels):
        for g, w, lv in zip(got, want_step, want_level):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
            torch.testing.assert_close(g, lv, rtol=0, atol=0)


def test_ratios_use_the_fastest_form_of_each_step():
    row = {"floor_decode_ms": 2.0, "floor_verify_ms": 2.5, "draft_step_graph_ms": 1.0, "commit_graph_ms": 0.5}
    row.update(triton_decode_ms=9.0, triton_decode_graph_ms=4.0, triton_decode_compiled_ms=3.0)
    row.update(triton_verify_ms=5.0, triton_verify_graph_ms=6.0)  # eager beat the capture here
    row.update(sdpa_decode_ms=8.0, sdpa_verify_ms=16.0)  # eager only
    vc.add_ratios(row, ["triton", "sdpa"], tau=5.0)
    assert row["triton_decode_vs_floor"] == 3.0 / 2.0 and row["triton_verify_vs_floor"] == 5.0 / 2.5
    assert row["triton_verify_over_decode"] == 5.0 / 3.0 and row["sdpa_verify_over_decode"] == 2.0
    assert row["triton_projected_speedup"] == 5.0 * 3.0 / (1.0 + 5.0 + 0.5)
    assert row["sdpa_projected_speedup"] == 5.0 * 8.0 / (1.0 + 16.0 + 0.5)
    row["draft_step_compiled_ms"] = 0.25  # the compiled draft step, where recorded, is the one projected
    vc.add_ratios(row, ["triton"], tau=5.0)
    assert row["triton_projected_speedup"] == 5.0 * 3.0 / (0.25 + 5.0 + 0.5)


def test_random_target_is_fused_as_loaded_and_computes_the_same():
    """The 8B-shaped benchmark model has one q/k/v and one gate/up weight per layer, as a loaded checkpoint has
    (the step it times is the decoder's), and its logits equal the same random weights left unfused."""
    fused = vc.random_target(SMALL, torch.device("cpu"), torch.float32, seed=3)
    plain = vc.random_target(SMALL, torch.device("cpu"), torch.float32, seed=3, fuse=False)
    layer = fused.model.layers[0]
    assert hasattr(layer.self_attn, "qkv_proj") and hasattr(layer.mlp, "gate_up_proj")
    assert not hasattr(plain.model.layers[0].self_attn, "qkv_proj")
    x = torch.randint(0, SMALL.vocab_size, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), atol=1e-5, rtol=1e-5)


def test_floor_reads_an_untied_embedding_table_a_row_per_token():
    """read_weight_bytes counts every parameter once, except an untied input embedding table: a pass reads one
    row of it per token. With the table tied to the LM head, the head reads it whole."""
    t = vc.random_target(SMALL, torch.device("cpu"), torch.float32)
    every = sum(p.numel() * 4 for p in t.parameters())
    row = SMALL.hidden_size * 4
    assert vc.read_weight_bytes(t) == every - (SMALL.vocab_size - 1) * row
    assert vc.read_weight_bytes(t, rows=72) == every - (SMALL.vocab_size - 72) * row
    tied = vc.random_target(dataclasses.replace(SMALL, tie_word_embeddings=True), torch.device("cpu"), torch.float32)
    tied.lm_head.weight = tied.model.embed_tokens.weight
    assert vc.read_weight_bytes(tied) == sum(p.numel() * 4 for p in tied.parameters())


def test_an_existing_report_is_never_overwritten(tmp_path):
    """verify_cost refuses an --out that exists, before any measuring (the timing and the agreement alike), and
    leaves the file as it was; without --out it names the flag."""
    import subprocess
    import sys

    out = tmp_path / "verify.json"
    out.write_text("recorded\n")
    for extra in ([], ["--agreement", "--small"]):
        with pytest.raises(SystemExit) as e:
            vc.main(["--out", str(out), *extra])
        assert e.value.code == 2
    assert out.read_text() == "recorded\n"
    run = subprocess.run(
        [sys.executable, "-m", "longspec_lab.bench.verify_cost", "--out", str(out)], capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert run.returncode == 2 and "exists; pick another --out" in run.stderr and "Traceback" not in run.stderr
    run = subprocess.run([sys.executable, "-m", "longspec_lab.bench.verify_cost"], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert run.returncode == 2 and "--out" in run.stderr and "Traceback" not in run.stderr
