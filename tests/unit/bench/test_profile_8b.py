"""bench/profile_8b.py on the CPU: what it calls a projection, how it sums a step's time line per class of
kernel, the projection shapes of a Llama config and the bytes a step reads, each against a hand count."""

import dataclasses

import pytest
import torch

from longspec_lab.bench import profile_8b as p8
from longspec_lab.bench.verify_cost import random_target
from longspec_lab.models.config import PRESETS

SMALL = dataclasses.replace(PRESETS["llama3-8b"], vocab_size=96, hidden_size=64, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=16, intermediate_size=128)  # fmt: skip


@pytest.mark.parametrize(
    ("name", "cls"),
    [("nvjet_sm90_tst_64x8_64x16_2x1_v_bz_splitK_TNT", "projection"),
     ("void cublasLt::splitKreduce_kernel<32>", "projection"),
     ("sm90_xmma_gemm_bf16bf16_bf16f32", "projection"), ("_stream_linear_kernel", "projection"),
     ("_norm_linear_kernel", "projection"), ("_tree_attn_split_kernel", "attention"),
     ("flash_fwd_splitkv_kernel", "attention"), ("triton_red_fused__fused_rms_norm_0", "other"),
     ("void at::native::vectorized_elementwise_kernel<8>", "other")],
)  # fmt: skip
def test_kernel_class(name, cls):
    assert p8.kernel_class(name) == cls


def test_summarise_sums_per_class_and_rates_the_projections():
    kernels = [["gemv_a", 0.0, 4.0, 4.0], ["_tree_attn_split_kernel", 4.0, 2.0, 2.5], ["gemv_a", 6.5, 4.0, 4.0],
               ["triton_poi_fused_1", 10.5, 1.0, 1.5]]  # fmt: skip
    s = p8.summarise({"total_us": 12.0, "kernels": kernels}, projection_bytes=16_000_000, bw=8e12, top=2)
    assert s["kernels"] == 4 and s["total_us"] == 12.0
    assert s["classes"]["projection"] == {"kernels": 2, "duration_us": 8.0, "increment_us": 8.0}
    assert s["classes"]["attention"]["increment_us"] == 2.5 and s["classes"]["other"]["kernels"] == 1
    assert s["projection_TBps"] == pytest.approx(16e6 / 8e-6 / 1e12)  # 2 TB/s
    assert s["projection_vs_copy"] == pytest.approx(0.25)
    assert s["top"] == [["gemv_a", 2, 8.0, 8.0], ["_tree_attn_split_kernel", 1, 2.0, 2.5]]


def test_projection_shapes_are_the_fused_weights_of_the_model():
    t = random_target(SMALL, torch.device("cpu"), torch.float32)
    layer = t.model.layers[0]
    shapes = p8.projection_shapes(SMALL)
    assert shapes["qkv"] == tuple(layer.self_attn.qkv_proj.weight.shape)
    assert shapes["o_proj"] == tuple(layer.self_attn.o_proj.weight.shape)
    assert shapes["gate_up"] == tuple(layer.mlp.gate_up_proj.weight.shape)
    assert shapes["down"] == tuple(layer.mlp.down_proj.weight.shape)
    assert shapes["lm_head"] == tuple(t.lm_head.weight.shape)


def test_step_bytes_by_hand():
    """Projections: every 2-D weight but the embedding table; all: every weight, the embedding rows read and the
    KV cache of the context plus the step's own rows."""
    t = random_target(SMALL, torch.device("cpu"), torch.float32)
    emb = t.model.embed_tokens.weight
    mats = sum(p.numel() * 4 for p in t.parameters() if p.dim() == 2 and p is not emb)
    vecs = sum(p.numel() * 4 for p in t.parameters() if p.dim() == 1)
    for ctx, rows in ((100, 1), (50, 7)):
        kv = (ctx + rows) * SMALL.num_layers * 2 * SMALL.num_kv_heads * SMALL.head_dim * 4
        proj, total = p8.step_bytes(t, ctx, rows)
        assert proj == mats
        assert total == mats + vecs + rows * SMALL.hidden_size * 4 + kv


def test_main_needs_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("this checks the message on a machine without a GPU")
    with pytest.raises(SystemExit) as e:
        p8.main(["--out", "unused.json"])
    assert e.value.code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
