"""diffuse's attention kernel for this CPU (diffuse/kernels/attention_amx.c with AMX,
attention_avx512.c with AVX512-BF16 and no AMX) against float32 attention.

Its output is rounded to bf16 like PyTorch's fused bf16 kernel's, and its softmax weights are
rounded to bf16 before they multiply the values, as that kernel's are; so the bound is PyTorch's
own bf16 error on the same inputs, with a quarter more room for the cubic exp (relative error
1.7e-4) and a different order of summation. A mis-packed key or value, a lost row, a block of
keys dropped or a wrong rescale moves the error by orders of magnitude, not by a quarter.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffuse import kernels
from diffuse.kernels import attention as attention_kernel
from diffuse.runtime import attention as runtime_attention

pytestmark = pytest.mark.skipif(kernels.attention_library() is None, reason=kernels.attention_status())


def relative_error(out: torch.Tensor, exact: torch.Tensor) -> float:
    return float((out.float() - exact).norm() / exact.norm())


def stacked_qkv(batch: int, tokens: int, heads: int, width: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Queries, keys and values as the UNet's stacked projection leaves them: strided views."""
    qkv = torch.randn(batch, tokens, 3, heads, width, generator=torch.Generator().manual_seed(seed)).bfloat16()
    return tuple(qkv[:, :, i].transpose(1, 2) for i in range(3))


def check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        assert attention_kernel.takes(q, k, v)
        out = attention_kernel.attention_bf16(q, k, v)
        exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        theirs = F.scaled_dot_product_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert relative_error(out, exact) <= 1.25 * relative_error(theirs, exact)
    return out


@pytest.mark.parametrize(
    "batch, tokens, heads, width",
    [
        (2, 1024, 2, 40),  # SD1.5's first level
        (1, 1024, 2, 64),  # SDXL's
        (1, 300, 3, 8),  # keys not a whole number of 32-key blocks, queries not of 16-row blocks
        (1, 257, 1, 33),  # an odd width, padded inside the kernel
        (1, 1024, 2, 80),  # SD1.5's second level: a fifth output tile, kept in memory
        (2, 320, 1, 160),  # as wide as its third: ten output tiles, six in memory
        (1, 3, 2, 1),  # fewer keys than one block, one value per head
        (1, 33, 1, 7),  # one key past a block, an odd width
    ],
)
def test_self_attention_matches_float32(batch, tokens, heads, width):
    check(*stacked_qkv(batch, tokens, heads, width))


def test_contiguous_inputs_and_more_queries_than_keys():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 500, 40, generator=g).bfloat16()
    k, v = (torch.randn(1, 2, 256, 40, generator=g).bfloat16() for _ in range(2))
    check(q, k, v)


def test_scores_that_rise_past_the_running_maximum_are_rescaled():
    """Keys growing along the sequence make each block's scores pass the first block's maximum
    by far more than the kernel's headroom, so rows are rescaled many times."""
    q, k, v = stacked_qkv(1, 512, 2, 64, seed=2)
    k = k * torch.linspace(0.1, 6.0, 512).view(1, 1, -1, 1).bfloat16()
    out = check(q * 4, k, v)
    assert torch.isfinite(out).all()


def test_a_nan_in_the_queries_reaches_the_output():
    q, k, v = stacked_qkv(1, 256, 1, 40)
    q = q.clone()
    q[0, 0, 5, 3] = float("nan")
    with torch.no_grad():
        out = attention_kernel.attention_bf16(q, k, v)
    assert torch.isnan(out[0, 0, 5]).all() and torch.isfinite(out[0, 0, :5]).all()


def kind() -> str:
    return kernels.attention_library().kind


@pytest.mark.parametrize(
    "change, why",
    [
        (lambda q, k, v: tuple(t.float() for t in (q, k, v)), "float32"),
        (lambda q, k, v: stacked_qkv(1, 256, 1, 192), "heads wider than 160"),
        (lambda q, k, v: (q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v), "rows not contiguous"),
        (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), "no keys"),
    ],
)
def test_what_the_kernel_leaves_to_pytorch(change, why):
    with torch.no_grad():
        assert not attention_kernel.takes(*change(*stacked_qkv(1, 256, 1, 40))), why
    with torch.enable_grad():
        assert not attention_kernel.takes(*stacked_qkv(1, 256, 1, 40)), "autograd"


def test_the_amx_kernel_leaves_small_heads_to_pytorch():
    """256 x 77 scores a head: faster in PyTorch's fused kernel on an AMX CPU, in the AVX512-BF16
    kernel on one without."""
    q, k, v = stacked_qkv(1, 256, 1, 40)
    with torch.no_grad():
        assert attention_kernel.takes(q, k[:, :, :77], v[:, :, :77]) == (kind() == "avx512")


def test_cross_attention_over_the_text():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, 1024, 40, generator=g).bfloat16()
    k, v = (torch.randn(2, 2, 77, 40, generator=g).bfloat16() for _ in range(2))
    check(q, k, v)


def test_the_runtime_uses_it_where_it_takes_the_shapes(monkeypatch):
    calls = []
    real = attention_kernel.attention_bf16
    monkeypatch.setattr(attention_kernel, "attention_bf16", lambda *qkv: calls.append(qkv) or real(*qkv))
    q, k, v = stacked_qkv(1, 1024, 2, 40)
    with torch.no_grad():
        runtime_attention.attention(q, k, v)
        runtime_attention.attention(q[:, :, :256], k[:, :, :256], v[:, :, :256])
    assert [call[1].shape[2] for call in calls] == ([1024] if kind() == "amx" else [1024, 256])
