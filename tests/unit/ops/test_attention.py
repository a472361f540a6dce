"""ops/attention.py: the draft's window attention in each of its forms against float64, and the half-precision
matmul helper the written-out form uses."""

import pytest
import torch

from longspec_lab.ops import attention


def _reference(q, k, v, mask):
    """float64 softmax attention with grouped KV heads: q [B, Hq, T, D], k/v [B, Hkv, S, D], mask [T, S]."""
    G = q.shape[1] // k.shape[1]
    k64, v64 = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    s = q.double() @ k64.transpose(-1, -2) / q.shape[-1] ** 0.5  # [B, Hq, T, S]
    return torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v64


@pytest.mark.parametrize("form", attention.MASKED_CHOICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("Hq", "Hkv", "T", "S"), [(4, 2, 16, 40), (2, 2, 1, 9), (8, 1, 5, 70)])
def test_masked_forms_give_the_float64_answer(form, dtype, Hq, Hkv, T, S, monkeypatch):
    """Every LONGSPEC_MASKED_ATTN form on random masks (each row sees >= 1 key), within the dtype's rounding."""
    if form == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("Triton's CPU interpreter miscomputes bf16 dots; the kernel's tests use float16 and float32")
    monkeypatch.setattr(attention, "MASKED_ATTN", form)
    g = torch.Generator().manual_seed(Hq * 100 + T + S)
    q, k, v = (torch.randn(1, h, n, 32, generator=g).to(dtype) for h, n in ((Hq, T), (Hkv, S), (Hkv, S)))
    mask = torch.rand(T, S, generator=g) < 0.4
    mask[torch.arange(T), torch.randint(0, S, (T,), generator=g)] = True
    got = attention.masked_sdpa(q, k, v, mask)
    assert got.dtype == dtype and got.shape == q.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), _reference(q, k, v, mask), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("a_shape", "b_shape"), [((2, 3, 5, 8), (2, 3, 8, 7)), ((2, 1, 5, 8), (1, 3, 8, 4))])
def test_mm_f32_multiplies_exactly_representable_inputs_exactly(dtype, a_shape, b_shape):
    """`_mm_f32` keeps the inputs' values and sums in float32 over broadcast batch dims: on small integers
    (exact in every dtype and in float32 sums) it equals float64 matmul, and its result is float32."""
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-8, 9, a_shape, generator=g).to(dtype)
    b = torch.randint(-8, 9, b_shape, generator=g).to(dtype)
    got = attention._mm_f32(a, b)
    assert got.dtype == torch.float32
    assert torch.equal(got.double(), a.double() @ b.double())


def test_auto_is_one_sdpa_call_on_the_cpu(monkeypatch):
    """ "auto" writes the attention out only on CUDA; on the CPU it is exactly the "sdpa" form."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 4, 6, 16, generator=g), torch.randn(1, 2, 9, 16, generator=g)
    mask = torch.rand(6, 9, generator=g) < 0.5
    mask[:, 0] = True
    monkeypatch.setattr(attention, "MASKED_ATTN", "sdpa")
    want = attention.masked_sdpa(q, k, k, mask)
    monkeypatch.setattr(attention, "MASKED_ATTN", "auto")
    assert torch.equal(attention.masked_sdpa(q, k, k, mask), want)
