"""The int8 path (diffuse.runtime.int8, quantize="int8") against float32 references.

Tolerances come from the 8-bit steps themselves. An input quantized per tensor over
[min(x, 0), max(x, 0)] in 255 steps is off by at most half a step, s_x / 2, in each value; a
weight row quantized symmetrically in 127 steps of s_w = max|w| / 127 is off by at most
s_w / 2. So a product's output o = sum_i w_i x_i is off by at most
sum_i |w_i| s_x / 2 + s_w / 2 * sum_i |x_i'| (x' the quantized input), plus one bf16
rounding of the output (2^-8 of it); `product_bound` computes that per output value in
float64. It is a worst case (the rounding errors would have to line up), so the tests also
check that the int8 output is further from float32 than bf16's, which shows the int8 product
really ran. Weights and inputs are made bf16-exact first, so the float32 reference sees the
very values the int8 layer was given. The UNets are tiny random ones with every weight
perturbed, so that a mis-mapped tensor cannot hide behind an initial constant.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RUNTIME_UNET
from torch import Tensor, nn

from diffuse import kernels
from diffuse.models import unet, vae
from diffuse.models.configs import VAEConfig
from diffuse.models.unet import UNet, Upsample
from diffuse.models.vae import AutoencoderKL
from diffuse.runtime import QUANTIZE_CHOICES, int8, prepare

# The exact gelu's steepest slope, reached near x = 1.41: how far an error in the gate can grow.
GELU_SLOPE = 1.13
BF16_ROUNDING = 2.0**-8


def int8_refusal() -> str | None:
    """Why prepare refuses quantize="int8" on this machine (no AVX512-VNNI, no kernel), or None."""
    try:
        int8.check_quantize("int8", "cpu", torch.bfloat16)
    except ValueError as refused:
        return str(refused)
    return None


needs_kernel = pytest.mark.skipif(not kernels.quantize_available(), reason=kernels.status())
needs_int8 = pytest.mark.skipif(int8_refusal() is not None, reason=f"{int8_refusal()}; {kernels.status()}")


def is_int8(layer: nn.Module) -> bool:
    return type(layer).__module__ == int8.__name__


def bf16_exact(t: Tensor) -> Tensor:
    return t.bfloat16().float()


def tiny_unet(seed: int = 0, linear_projection: bool = False) -> UNet:
    """A UNet with two levels (attention on both), every weight perturbed and bf16-exact."""
    cfg = replace(TINY_RUNTIME_UNET, use_linear_projection=linear_projection)
    torch.manual_seed(seed)
    net = UNet(cfg).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(bf16_exact(p + 0.05 * torch.randn_like(p)))
    return net


def quantized_copy(net: UNet) -> UNet:
    return prepare(copy.deepcopy(net), "cpu", torch.bfloat16, quantize="int8")


def unet_inputs(seed: int = 1, size: int = 16) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    latents = bf16_exact(torch.randn(2, 4, size, size, generator=g))
    return latents, torch.tensor([10, 700]), bf16_exact(torch.randn(2, 7, 16, generator=g))


def input_step(x: Tensor, error: Tensor | float = 0.0) -> float:
    """The per-tensor asymmetric step for an input known to within `error` of x."""
    extra = float(torch.as_tensor(error).max())
    return (float(x.max().clamp_min(0)) - float(x.min().clamp_max(0)) + 2 * extra) / 255


def weight_steps(weight: Tensor) -> Tensor:
    return weight.double().flatten(1).abs().amax(dim=1) / 127


def product_bound(x: Tensor, weight: Tensor, error: Tensor | float = 0.0) -> Tensor:
    """The most x @ weight.T can be off in int8 (the module docstring), for an input already
    off by up to `error` (broadcast as x) before it is quantized."""
    x, weight = x.double(), weight.double()
    step_x = input_step(x, error)
    near = torch.as_tensor(error, dtype=torch.float64) + step_x / 2  # each input's error once quantized
    from_inputs = (near * torch.ones_like(x)) @ weight.abs().T
    from_weights = ((x.abs() + near) @ torch.ones_like(weight).T) * weight_steps(weight) / 2
    exact = x @ weight.T
    total = from_inputs + from_weights
    return total + BF16_ROUNDING * (exact.abs() + total)


def conv_bound(x: Tensor, conv: nn.Conv2d, split: int | None = None) -> Tensor:
    """product_bound for a convolution: the sums run over each output's receptive field. With
    `split`, input channels before and after it are quantized with a step each."""
    x, weight = x.double(), conv.weight.double()
    parts = [(0, x.shape[1])] if split is None else [(0, split), (split, x.shape[1])]
    steps = torch.cat([torch.full((b - a,), input_step(x[:, a:b]), dtype=torch.float64) for a, b in parts])
    window = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
    ones = torch.ones(1, *weight.shape[1:], dtype=torch.float64)
    from_inputs = (weight.abs().flatten(2).sum(2) @ (steps / 2)).view(1, -1, 1, 1)
    field = F.conv2d(x.abs() + steps.view(1, -1, 1, 1) / 2, ones, **window)  # sum of |x'| over each field
    from_weights = field * weight_steps(weight).view(1, -1, 1, 1) / 2
    exact = F.conv2d(x, weight, **window)
    total = from_inputs + from_weights
    return total + BF16_ROUNDING * (exact.abs() + total)


def assert_int8_within(got: Tensor, exact: Tensor, bf16: Tensor, bound: Tensor) -> None:
    """got within the bound of exact everywhere, and further from it than bf16 gets (by root mean
    square, which one lucky rounding cannot move): the product really ran in 8 bits."""
    error = (got.double() - exact.double()).abs()
    assert got.dtype == torch.bfloat16 and got.shape == exact.shape
    assert (error <= bound).all(), f"worst error/bound {float((error / bound).max()):.3f}"
    rms, bf16_rms = error.pow(2).mean().sqrt(), (bf16.double() - exact.double()).pow(2).mean().sqrt()
    assert rms > 2 * bf16_rms, f"int8 error {float(rms):.3g} rms, bf16's {float(bf16_rms):.3g}"


@pytest.fixture(scope="module")
def pair() -> tuple[UNet, UNet]:
    """A tiny UNet in float32 and its int8 copy."""
    net = tiny_unet()
    return net, quantized_copy(net)


def layer_pair(pair, name: str) -> tuple[nn.Module, nn.Module]:
    net, quantized = pair
    return net.get_submodule(name), quantized.get_submodule(name)


# ---- each int8 layer against float32 ----------------------------------------------------------


@needs_int8
@torch.no_grad()
@pytest.mark.parametrize("shape", [(5, 64), (2, 77, 64), (1, 3, 4, 64)])
def test_linear_is_float32s_within_the_8_bit_steps(pair, shape):
    exact_layer, layer = layer_pair(pair, "middle_block.1.transformer_blocks.0.attn1.to_out.0")
    assert isinstance(layer, int8.Int8Linear)
    x = bf16_exact(torch.randn(shape) * 3 + 1)  # off-centre: the zero point is not at the middle
    exact = exact_layer(x)
    bound = product_bound(x, exact_layer.weight) + exact_layer.bias.double().abs() * BF16_ROUNDING
    bf16 = F.linear(x.bfloat16(), layer.weight, layer.bias)
    assert_int8_within(layer(x.bfloat16()), exact, bf16, bound)


@needs_int8
@torch.no_grad()
@pytest.mark.parametrize(
    "name, stride, kernel",
    [
        ("input_blocks.1.0.in_layers.2", 1, 3),  # a ResBlock's 3x3
        ("input_blocks.3.0.op", 2, 3),  # the stride-2 downsampling
        ("input_blocks.4.0.skip_connection", 1, 1),  # a 1x1 on the residual
        ("input_blocks.1.1.proj_in", 1, 1),  # SD1's 1x1 transformer projection
    ],
)
@pytest.mark.parametrize("channels_last", [True, False])
def test_convolution_is_float32s_within_the_8_bit_steps(pair, name, stride, kernel, channels_last):
    exact_layer, layer = layer_pair(pair, name)
    assert isinstance(layer, int8.Int8Conv2d) and layer.stride == (stride, stride)
    assert layer.kernel_size == (kernel, kernel)
    x = bf16_exact(torch.randn(2, layer.in_channels, 9, 10) * 2 + 0.5)  # odd sides for the stride
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    exact = exact_layer(x)
    bound = conv_bound(x, exact_layer) + exact_layer.bias.double().abs().view(1, -1, 1, 1) * BF16_ROUNDING
    bf16 = F.conv2d(x.bfloat16(), layer.weight, layer.bias, layer.stride, layer.padding)
    assert_int8_within(layer(x.bfloat16()), exact, bf16, bound)


@needs_int8
@torch.no_grad()
@pytest.mark.parametrize("name", ["output_blocks.0.0.in_layers.2", "output_blocks.3.0.skip_connection"])
def test_an_up_path_join_is_quantized_part_by_part(pair, name):
    """Where the up path's features meet a skip's (channels joined), each part is quantized with a
    step of its own: the error stays within the bound of two ranges (tighter than one range's
    when the parts' magnitudes differ as much as here), and below what one range over both gives."""
    net = pair[0]
    exact_layer, layer = net.get_submodule(name), quantized_copy(net).get_submodule(name)
    width = layer.split
    assert isinstance(layer, int8.Int8Conv2d) and 0 < width < layer.in_channels
    x = torch.randn(2, layer.in_channels, 8, 8)
    x[:, width:] *= 0.02  # a quiet skip beside loud features
    x = bf16_exact(x).contiguous(memory_format=torch.channels_last)
    exact = exact_layer(x).double()
    bias = exact_layer.bias.double().abs().view(1, -1, 1, 1) * BF16_ROUNDING
    bound = conv_bound(x, exact_layer, split=width) + bias
    assert (bound < conv_bound(x, exact_layer) + bias).all()
    bf16 = F.conv2d(x.bfloat16(), layer.weight, layer.bias, layer.stride, layer.padding)
    got = layer(x.bfloat16())
    assert_int8_within(got, exact, bf16, bound)
    layer.split, layer.packed = None, None  # one range over both parts
    one_range = layer(x.bfloat16()).double()
    assert (got.double() - exact).pow(2).mean() < (one_range - exact).pow(2).mean()


@needs_int8
@torch.no_grad()
def test_self_attention_stacks_queries_keys_and_values(pair):
    """One product of the stacked weights gives each of q, k, v within its own layer's bound;
    cross-attention keeps its keys and values (from the text) in bf16."""
    name = "input_blocks.1.1.transformer_blocks.0"
    exact_layer, layer = layer_pair(pair, f"{name}.attn1")
    assert isinstance(layer, int8.Int8Attention)
    cross = pair[1].get_submodule(f"{name}.attn2")
    assert isinstance(cross, int8.Int8CrossAttention) and isinstance(cross.to_q, int8.Int8Linear)
    assert not is_int8(cross.to_k) and not is_int8(cross.to_v)
    x = bf16_exact(torch.randn(2, 50, 32))
    exact = exact_layer.qkv(x, None)
    got = layer.qkv(x.bfloat16(), None)
    for i, weight in enumerate((exact_layer.to_q.weight, exact_layer.to_k.weight, exact_layer.to_v.weight)):
        bound = product_bound(x, weight).unflatten(-1, (layer.heads, -1)).transpose(1, 2)
        bf16 = F.linear(x.bfloat16(), weight.bfloat16()).unflatten(-1, (layer.heads, -1)).transpose(1, 2)
        assert_int8_within(got[i], exact[i], bf16, bound)
    # The whole layer: softmax and the output projection on top keep it close.
    whole, reference = layer(x.bfloat16()).double(), exact_layer(x).double()
    assert F.cosine_similarity(whole.flatten(), reference.flatten(), dim=0) > 0.999


@needs_int8
@torch.no_grad()
def test_feed_forward_is_float32s_within_the_propagated_steps(pair):
    """GEGLU (value * gelu(gate), from one quantized input) and the output projection: the value's
    and the gate's bounds carried through the product (the gelu's slope at most GELU_SLOPE, three
    bf16 roundings), then the output layer's bound for a hidden input off by that much."""
    exact_ff, ff = layer_pair(pair, "output_blocks.1.1.transformer_blocks.0.ff")
    assert is_int8(ff) or is_int8(ff.net[0])
    proj, out = exact_ff.net[0].proj, exact_ff.net[2]
    x = bf16_exact(torch.randn(2, 30, proj.in_features) * 2)
    value, gate = F.linear(x, proj.weight, proj.bias).double().chunk(2, dim=-1)
    value_w, gate_w = proj.weight.chunk(2)
    value_bound, gate_bound = product_bound(x, value_w), product_bound(x, gate_w)
    gelu = F.gelu(gate)
    hidden = value * gelu
    hidden_bound = (
        gelu.abs() * value_bound
        + (value.abs() + value_bound) * GELU_SLOPE * gate_bound
        + 3 * BF16_ROUNDING * (hidden.abs() + value_bound * (gelu.abs() + GELU_SLOPE * gate_bound))
    )
    bound = product_bound(hidden, out.weight, hidden_bound) + out.bias.double().abs() * BF16_ROUNDING
    exact = exact_ff(x)
    bf16 = copy.deepcopy(exact_ff).bfloat16()(x.bfloat16())
    assert_int8_within(ff(x.bfloat16()), exact, bf16, bound)


@needs_int8
@torch.no_grad()
@pytest.mark.parametrize("shape", [(5, 64), (2, 77, 64)])
def test_linear_adds_onto_a_residual_as_it_writes(pair, shape):
    """add_onto: the product plus a residual, the sum made in the product's epilogue: within the
    product's bound of float32's sum (one bf16 rounding of the sum beside it); the residual is left
    as it was (with `into`, the same sum in the residual's memory), and one laid out otherwise takes
    the plain sum."""
    exact_layer, layer = layer_pair(pair, "middle_block.1.transformer_blocks.0.attn1.to_out.0")
    x = bf16_exact(torch.randn(shape) * 3 + 1)
    residual = bf16_exact(torch.randn(shape) * 4)
    exact = exact_layer(x) + residual
    bound = product_bound(x, exact_layer.weight) + (exact_layer.bias.double().abs() + residual.abs()) * BF16_ROUNDING
    kept = residual.bfloat16()
    bf16 = F.linear(x.bfloat16(), layer.weight, layer.bias) + kept
    got = layer.add_onto(x.bfloat16(), kept)
    assert_int8_within(got, exact, bf16, bound)
    assert torch.equal(kept, residual.bfloat16())
    assert torch.equal(layer.add_onto(x.bfloat16(), kept, into=True), got)  # summed in kept's memory
    strided = torch.randn(shape[-1], *shape[:-1]).bfloat16().movedim(0, -1)
    assert torch.equal(layer.add_onto(x.bfloat16(), strided), layer(x.bfloat16()) + strided)


@needs_int8
@torch.no_grad()
def test_transformer_block_quantizes_its_norms_and_adds_in_the_products(pair, monkeypatch):
    """Int8TransformerBlock quantizes each norm's output straight from the C kernel and adds each
    residual in the product before it: from float32 its output is no further than the int8 block
    that writes those out in bf16 (the same products, only the roundings between them gone), and
    further than bf16's, so the int8 products ran."""
    name = "middle_block.1.transformer_blocks.0"
    exact_block, block = layer_pair(pair, name)
    assert isinstance(block, int8.Int8TransformerBlock)
    calls = []
    fused = kernels.layer_norm_quantize_bf16
    monkeypatch.setattr(kernels, "layer_norm_quantize_bf16", lambda *a, **k: calls.append(1) or fused(*a, **k))
    bf16_block = prepare(copy.deepcopy(exact_block), "cpu", torch.bfloat16)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x, context = (
            bf16_exact(torch.randn(2, 50, 64, generator=g) * 2 + 0.5),
            bf16_exact(torch.randn(2, 7, 16, generator=g)),
        )
        exact = exact_block(x, context).double()
        given = x.bfloat16()
        got = block(given, context.bfloat16())
        assert torch.equal(given, x.bfloat16())  # only the block's own tensors are summed into
        block.__class__ = unet.BasicTransformerBlock  # the same int8 sublayers, each writing bf16
        try:
            unfused = block(x.bfloat16(), context.bfloat16())
        finally:
            block.__class__ = int8.Int8TransformerBlock
        rms = {k: float((v.double() - exact).pow(2).mean().sqrt()) for k, v in (("got", got), ("unfused", unfused))}
        rms["bf16"] = float((bf16_block(x.bfloat16(), context.bfloat16()).double() - exact).pow(2).mean().sqrt())
        assert got.dtype == torch.bfloat16 and rms["got"] <= 1.05 * rms["unfused"], rms
        assert rms["got"] > 1.5 * rms["bf16"], rms
    assert len(calls) == 3 * 3


@needs_int8
@torch.no_grad()
@pytest.mark.parametrize("name", ["input_blocks.1.0", "input_blocks.4.0", "output_blocks.0.0"])
def test_resblock_quantizes_its_norms_and_adds_onto_the_skip(pair, name, monkeypatch):
    """Int8ResBlock quantizes each GroupNorm-SiLU straight from the C kernel (the second with the
    timestep embedding added first; an up-path join's first norm keeps the part-by-part quantizing)
    and adds the residual in the second convolution: from float32 no further than the ResBlock
    that writes those out in bf16, further than bf16's."""
    exact_block, block = layer_pair(pair, name)
    assert isinstance(block, int8.Int8ResBlock)
    calls = []
    fused = kernels.group_norm_silu_quantize_bf16
    monkeypatch.setattr(kernels, "group_norm_silu_quantize_bf16", lambda *a, **k: calls.append(a[-1]) or fused(*a, **k))
    bf16_block = prepare(copy.deepcopy(exact_block), "cpu", torch.bfloat16)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x = bf16_exact(torch.randn(2, exact_block.in_layers[0].num_channels, 8, 8, generator=g) * 2 + 0.3)
        emb = bf16_exact(torch.randn(2, exact_block.emb_layers[1].in_features, generator=g))
        exact = exact_block(x, emb).double()
        x, emb = x.bfloat16().contiguous(memory_format=torch.channels_last), emb.bfloat16()
        before = x.clone()
        got = block(x, emb)
        assert torch.equal(x, before)  # the identity skip's input is never summed into
        block.__class__ = unet.ResBlock  # the same int8 convolutions, norms and SiLUs in bf16
        try:
            unfused = block(x, emb)
        finally:
            block.__class__ = int8.Int8ResBlock
        rms = {k: float((v.double() - exact).pow(2).mean().sqrt()) for k, v in (("got", got), ("unfused", unfused))}
        rms["bf16"] = float((bf16_block(x, emb).double() - exact).pow(2).mean().sqrt())
        assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
        assert rms["got"] <= 1.05 * rms["unfused"] and rms["got"] > 1.5 * rms["bf16"], rms
    # Each call: the first norm (no shift) unless the block joins a skip, then the second (shifted).
    expected = [True] * 3 if block.in_layers[2].split is not None else [False, True] * 3
    assert [shift is not None for shift in calls] == expected


@needs_int8
@torch.no_grad()
def test_spatial_transformer_adds_the_residual_in_its_output_projection():
    """With linear projections the output projection adds the block's input as it writes: the
    plain class's answer to within its bf16 roundings, in the channels-last layout it came in."""
    quantized = quantized_copy(tiny_unet(linear_projection=True))
    layer = quantized.get_submodule("middle_block.1")
    assert isinstance(layer, int8.Int8SpatialTransformer) and layer.linear
    x = torch.randn(2, 64, 5, 6).bfloat16().contiguous(memory_format=torch.channels_last)
    context = torch.randn(2, 7, 16).bfloat16()
    got = layer(x, context)
    layer.__class__ = unet.SpatialTransformer
    plain = layer(x, context)
    assert got.shape == plain.shape and got.is_contiguous(memory_format=torch.channels_last)
    # The product p = plain - x was rounded once more in the plain class: |p| <= |plain| + |x|.
    assert (
        (got.double() - plain.double()).abs() <= 2 * BF16_ROUNDING * (plain.double().abs() + x.double().abs())
    ).all()
    assert F.cosine_similarity(got.double().flatten(), plain.double().flatten(), dim=0) > 0.99999


@needs_int8
@torch.no_grad()
@pytest.mark.parametrize("linear_projection", [False, True])
def test_whole_unet_stays_close_to_float32(linear_projection):
    """Every error above, through a whole tiny UNet: the output's cosine similarity to float32's
    at least 0.995 (bf16 alone gets about 0.9999), on both projection styles."""
    net = tiny_unet(seed=2, linear_projection=linear_projection)
    quantized, bf16 = quantized_copy(net), prepare(copy.deepcopy(net), "cpu", torch.bfloat16)
    latents, t, context = unet_inputs()
    exact = net(latents, t, context).double().flatten()
    got = quantized(latents.bfloat16(), t, context.bfloat16())
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    half = bf16(latents.bfloat16(), t, context.bfloat16()).double().flatten()
    int8_cos = F.cosine_similarity(got.double().flatten(), exact, dim=0)
    bf16_cos = F.cosine_similarity(half, exact, dim=0)
    assert int8_cos > 0.995
    assert 1 - int8_cos > 2 * (1 - bf16_cos)  # the int8 products ran


@needs_int8
def test_vae_decoder_goes_int8_and_stays_close_to_float32():
    """The decoder's ResnetBlock and attention convolutions run int8; its first and last
    convolutions, the upsampling and the whole encoder stay bf16. The decoded image stays within
    a few 8-bit steps of float32's (bf16 alone is well inside one)."""
    torch.manual_seed(3)
    net = AutoencoderKL(VAEConfig(base_channels=32, channel_mult=(1, 2), norm_groups=8)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(bf16_exact(p + 0.05 * torch.randn_like(p)))
    quantized = prepare(copy.deepcopy(net), "cpu", torch.bfloat16, quantize="int8")
    convs = {name: layer for name, layer in quantized.named_modules() if isinstance(layer, nn.Conv2d)}
    int8_convs = {name for name, layer in convs.items() if is_int8(layer)}
    upsampling = {name for name in convs if name.endswith("upsample.conv")}
    assert int8_convs == {
        name
        for name in convs
        if name.startswith("decoder.")
        and name not in ("decoder.conv_in", "decoder.conv_out")
        and name not in upsampling
    }
    assert upsampling and all(name.startswith("decoder.") for name in int8_convs)
    z = bf16_exact(torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4)))
    bf16 = prepare(copy.deepcopy(net), "cpu", torch.bfloat16)
    with torch.no_grad():
        exact = net.decode(z).clamp(-1, 1)
        got = quantized.decode(z.bfloat16()).float().clamp(-1, 1)
        half = bf16.decode(z.bfloat16()).float().clamp(-1, 1)
    int8_error, bf16_error = ((got - exact).abs() * 127.5).mean(), ((half - exact).abs() * 127.5).mean()
    assert int8_error < 4 and int8_error > 1.5 * bf16_error  # in 0-255 steps; the int8 products ran


@needs_int8
@torch.no_grad()
@pytest.mark.parametrize("channels", [(32, 32), (64, 32)])
def test_decoder_resnet_block_quantizes_its_norms_and_adds_onto_the_shortcut(channels, monkeypatch):
    """Int8DecoderResnetBlock quantizes both GroupNorm-SiLUs straight from the C kernel and adds the
    residual (the input, or the 1x1 shortcut's output) as the second convolution writes: from
    float32 no further than the same int8 convolutions with the norms in bf16, further than bf16's."""
    torch.manual_seed(5)
    net = AutoencoderKL(VAEConfig(base_channels=32, channel_mult=(1, 2), norm_groups=8)).eval()
    net.decoder.mid.block_1 = vae.ResnetBlock(*channels, groups=8)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(bf16_exact(p + 0.05 * torch.randn_like(p)))
    exact_block = net.decoder.mid.block_1
    block = prepare(copy.deepcopy(net), "cpu", torch.bfloat16, quantize="int8").decoder.mid.block_1
    bf16_block = prepare(copy.deepcopy(exact_block), "cpu", torch.bfloat16)
    assert isinstance(block, int8.Int8DecoderResnetBlock) and is_int8(block.conv1) and is_int8(block.conv2)
    calls = []
    fused = kernels.group_norm_silu_quantize_bf16
    monkeypatch.setattr(kernels, "group_norm_silu_quantize_bf16", lambda *a, **k: calls.append(1) or fused(*a, **k))
    for seed in range(3):
        x = bf16_exact(torch.randn(2, channels[0], 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 + 0.3)
        exact = exact_block(x).double()
        x = x.bfloat16().contiguous(memory_format=torch.channels_last)
        before = x.clone()
        got = block(x)
        assert torch.equal(x, before)  # the identity shortcut's input is never summed into
        block.__class__ = vae.ResnetBlock  # the same int8 convolutions, norms and SiLUs in bf16
        try:
            unfused = block(x)
        finally:
            block.__class__ = int8.Int8DecoderResnetBlock
        rms = {k: float((v.double() - exact).pow(2).mean().sqrt()) for k, v in (("got", got), ("unfused", unfused))}
        rms["bf16"] = float((bf16_block(x).double() - exact).pow(2).mean().sqrt())
        assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
        assert rms["got"] <= 1.05 * rms["unfused"] and rms["got"] > 1.5 * rms["bf16"], rms
    assert len(calls) == 2 * 3


# ---- which layers go int8 ---------------------------------------------------------------------


@needs_int8
def test_the_outer_layers_and_the_texts_keys_stay_bf16(pair):
    """conv_in and the last conv (4 channels), the time and ResBlock embeddings (one row each),
    cross-attention's keys and values (77 text rows) and the upsampling convolutions keep their
    bf16 classes; every other convolution and linear layer inside the blocks is int8, self-
    attention's q/k/v through their stacked parent."""
    net, quantized = pair
    kept = {name for name, layer in quantized.named_modules() if isinstance(layer, (nn.Linear, nn.Conv2d))}
    kept = {name for name in kept if not is_int8(quantized.get_submodule(name))}
    stacked = {name for name in kept if name.rpartition(".")[2] in ("to_q", "to_k", "to_v") and ".attn1." in name}
    for name in stacked:
        assert isinstance(quantized.get_submodule(name.rpartition(".")[0]), int8.Int8Attention)
    # The GEGLU projection runs as two int8 halves inside its feed-forward, never on its own.
    in_ff = {name for name in kept if name.endswith("ff.net.0.proj")}
    for name in in_ff:
        assert isinstance(quantized.get_submodule(name.removesuffix(".net.0.proj")), int8.Int8FeedForward)
        assert getattr(quantized.get_submodule(name), "packed", None) is None  # no unused int8 copy
    stacked |= in_ff
    expected = {"input_blocks.0.0", "out.2", "time_embed.0", "time_embed.2", "output_blocks.2.2.conv"}
    for name, _ in net.named_modules():
        if name.endswith(("emb_layers.1", "attn2.to_k", "attn2.to_v")):
            expected.add(name)
    assert kept - stacked == expected
    assert isinstance(quantized.get_submodule("output_blocks.2.2"), Upsample)
    assert sum(is_int8(layer) for layer in quantized.modules()) > 40


# ---- where the int8 path steps aside ----------------------------------------------------------


def int8_layers(pair) -> list[tuple[str, nn.Module, nn.Module]]:
    names = ["input_blocks.1.0.in_layers.2", "middle_block.1.transformer_blocks.0.attn2.to_q"]
    return [(name, *layer_pair(pair, name)) for name in names]


@needs_int8
@torch.no_grad()
def test_a_float32_retry_runs_the_plain_layers(pair):
    """diffuse.numerics casts a network up to float32 in place for a retry: the int8 layers then
    compute float32's answer, and after the cast back down they quantize again."""
    net = pair[0]
    retried = quantized_copy(net)
    latents, t, context = unet_inputs()
    before = retried(latents.bfloat16(), t, context.bfloat16())
    retried.float()
    torch.testing.assert_close(retried(latents, t, context), net(latents, t, context), rtol=1e-4, atol=1e-4)
    retried.bfloat16()
    assert torch.equal(retried(latents.bfloat16(), t, context.bfloat16()), before)


@needs_int8
def test_autograd_runs_the_plain_bf16_layers(pair):
    for _, _, layer in int8_layers(pair):
        x = torch.randn(2, layer.weight.shape[1], 6, 6) if isinstance(layer, nn.Conv2d) else torch.randn(3, 64)
        x = x.bfloat16().requires_grad_()
        out = layer(x)
        plain = F.conv2d if isinstance(layer, nn.Conv2d) else F.linear
        extra = (layer.stride, layer.padding) if isinstance(layer, nn.Conv2d) else ()
        assert torch.equal(out, plain(x, layer.weight, layer.bias, *extra))
        out.float().sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()


@needs_int8
@torch.no_grad()
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_nan_or_infinity_takes_the_bf16_path_and_carries_on(pair, bad):
    for _, _, layer in int8_layers(pair):
        conv = isinstance(layer, nn.Conv2d)
        x = (torch.randn(2, layer.weight.shape[1], 6, 6) if conv else torch.randn(3, 64)).bfloat16()
        x.view(-1)[5] = bad
        plain = F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding) if conv else None
        plain = F.linear(x, layer.weight, layer.bias) if plain is None else plain
        got = layer(x)
        assert not torch.isfinite(got).all()
        torch.testing.assert_close(got, plain, rtol=0, atol=0, equal_nan=True)
    latents, t, context = unet_inputs()
    latents[0, 0, 3, 3] = bad
    out = pair[1](latents.bfloat16(), t, context.bfloat16())
    assert not torch.isfinite(out[0]).all()


@needs_int8
@torch.no_grad()
def test_an_empty_input_gives_an_empty_output(pair):
    _, _, linear = int8_layers(pair)[1]
    assert linear(torch.empty(0, 64, dtype=torch.bfloat16)).shape == (0, 64)
    assert linear(torch.empty(2, 0, 64, dtype=torch.bfloat16)).shape == (2, 0, 64)
    _, _, conv = int8_layers(pair)[0]
    assert conv(torch.empty(0, 32, 6, 6, dtype=torch.bfloat16)).shape == (0, 32, 6, 6)


@needs_int8
@torch.no_grad()
@pytest.mark.parametrize(
    "name, weight",
    [
        ("input_blocks.1.0.in_layers.2", "weight"),
        ("middle_block.1.transformer_blocks.0.attn2.to_q", "weight"),
        ("middle_block.1.transformer_blocks.0.attn1", "to_k.weight"),  # one of the stacked three
        ("middle_block.1.transformer_blocks.0.ff", "net.0.proj.weight"),
        ("middle_block.1.transformer_blocks.0.ff", "net.2.weight"),
    ],
)
def test_a_weight_changed_in_place_is_packed_again(pair, name, weight):
    """A LoRA merged (or taken out) writes the bf16 weight in place: the next call quantizes the
    new weight, and the original comes back exactly when it is restored."""
    net = pair[0]
    layer = quantized_copy(net).get_submodule(name)
    x = torch.randn(2, 32, 6, 6) if isinstance(layer, nn.Conv2d) else torch.randn(2, 20, 64)
    x = x.bfloat16()
    before = layer(x)
    param = layer.get_parameter(weight)
    original = param.clone()
    param.add_(torch.randn_like(param) * 0.5)  # LoRA-sized or more: the output must move
    changed = layer(x)
    reference = copy.deepcopy(net.get_submodule(name))
    reference.get_parameter(weight).copy_(param)
    exact = reference(x.float())
    assert (changed.float() - exact).abs().max() < (before.float() - exact).abs().max() / 4
    param.copy_(original)
    assert torch.equal(layer(x), before)


# ---- prepare's checks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "device, dtype, message",
    [
        ("cpu", torch.float32, "runs on the CPU with dtype bfloat16, not cpu torch.float32"),
        ("cpu", torch.float16, "dtype bfloat16"),
        ("meta", torch.bfloat16, "runs on the CPU with dtype bfloat16, not meta"),
    ],
)
def test_prepare_refuses_int8_off_the_bf16_cpu_in_one_line(device, dtype, message):
    net = UNet(TINY_RUNTIME_UNET)
    with pytest.raises(ValueError, match=message) as refused:
        prepare(net, device, dtype, quantize="int8")
    assert "\n" not in str(refused.value)
    # Refused before anything moved or changed class.
    assert net.out[2].weight.dtype == torch.float32 and not any(is_int8(m) for m in net.modules())


@pytest.mark.parametrize(
    "missing, message",
    [("cpu_has_vnni", "needs a CPU with AVX512-VNNI"), ("quantize_available", "needs diffuse's C quantize kernel")],
)
def test_prepare_refuses_int8_where_it_would_not_run_in_int8(monkeypatch, missing, message):
    """Refused, not quietly run in bf16, where the CPU or the kernel is missing: images made so
    would be recorded as int8."""
    monkeypatch.setattr(int8, "cpu_has_vnni", lambda: missing != "cpu_has_vnni")
    if missing == "quantize_available":
        monkeypatch.setattr(kernels, missing, lambda: False)
    net = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=message) as refused:
        prepare(net, "cpu", torch.bfloat16, quantize="int8")
    assert "\n" not in str(refused.value) and net.weight.dtype == torch.float32


def test_prepare_names_the_choices_for_an_unknown_quantize():
    assert QUANTIZE_CHOICES == ("int8",)
    net = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="int8") as refused:
        prepare(net, "cpu", torch.bfloat16, quantize="int4")
    assert "'int4'" in str(refused.value) and "\n" not in str(refused.value)
    assert prepare(net, "cpu", torch.bfloat16, quantize=None).weight.dtype == torch.bfloat16


# ---- the C quantize kernel --------------------------------------------------------------------


@needs_kernel
@pytest.mark.parametrize("n", [1, 15, 16, 17, 1000, 4099])
@pytest.mark.parametrize("asymmetric", [True, False])
@pytest.mark.parametrize("offset", [0.0, 2.5, -2.5])
def test_quantize_round_trip_is_within_half_a_step(n, asymmetric, offset):
    torch.manual_seed(n)
    x = (torch.randn(n) * 3 + offset).bfloat16()
    q, scale, zero_point = kernels.quantize_bf16(x, asymmetric)
    assert q.dtype == (torch.uint8 if asymmetric else torch.int8) and q.shape == x.shape
    low, high = min(float(x.float().min()), 0.0), max(float(x.float().max()), 0.0)
    if asymmetric:
        assert scale == pytest.approx((high - low) / 255, rel=1e-6) and 0 <= zero_point <= 255
    else:
        assert scale == pytest.approx(max(high, -low) / 127, rel=1e-6) and zero_point == 0
        assert q.abs().max() <= 127
    back = (q.double() - zero_point) * scale
    assert ((back - x.double()).abs() <= scale / 2 * (1 + 1e-5)).all()


@needs_kernel
@pytest.mark.parametrize("asymmetric", [True, False])
def test_zero_is_exactly_representable(asymmetric):
    """Padding and ReLU-like zeros must dequantize to exactly 0: zero is on the grid."""
    x = torch.tensor([0.0, 0.3, 1.7, 0.0, 5.1, -0.9, 0.0] * 5).bfloat16()
    q, scale, zero_point = kernels.quantize_bf16(x, asymmetric)
    assert ((q.double() - zero_point) * scale)[x == 0].eq(0).all()
    positive = torch.tensor([0.5, 2.0, 3.0]).bfloat16()  # the range still holds 0
    q, scale, zero_point = kernels.quantize_bf16(positive, True)
    assert zero_point == 0 and scale == pytest.approx(3.0 / 255, rel=1e-6)
    q, scale, zero_point = kernels.quantize_bf16(torch.zeros(40, dtype=torch.bfloat16), asymmetric)
    assert scale > 0 and q.eq(zero_point).all()


@needs_kernel
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 17, 39])
def test_a_nan_or_infinity_is_not_quantized(bad, where):
    x = torch.randn(40).bfloat16()
    x[where] = bad
    assert kernels.quantize_bf16(x, True) is None
    assert kernels.quantize_bf16(x, False) is None


@needs_kernel
def test_quantize_keeps_a_channels_last_layout():
    torch.manual_seed(0)
    x = torch.randn(2, 24, 5, 7).bfloat16()
    last = x.contiguous(memory_format=torch.channels_last)
    q_last, scale_last, zero_last = kernels.quantize_bf16(last, True)
    q, scale, zero = kernels.quantize_bf16(x, True)
    assert q_last.is_contiguous(memory_format=torch.channels_last) and not q_last.is_contiguous()
    assert (scale_last, zero_last) == (scale, zero) and torch.equal(q_last, q)


@needs_kernel
def test_quantize_refuses_what_it_cannot_read():
    x = torch.randn(6, 8).bfloat16()
    with pytest.raises(ValueError, match="contiguous or channels-last"):
        kernels.quantize_bf16(x.t(), True)
    with pytest.raises(ValueError, match="contiguous or channels-last"):
        kernels.quantize_bf16(x[:, ::2], True)
    with pytest.raises(ValueError, match="bf16"):
        kernels.quantize_bf16(x.float(), True)
    with pytest.raises(ValueError, match="autograd"):
        kernels.quantize_bf16(x.clone().requires_grad_(), True)


@needs_kernel
@pytest.mark.parametrize("n", [7, 16, 1000])
def test_quantize_a_product_is_within_half_a_step_of_float32s(n):
    """GEGLU's value times gate quantized from the two bf16 factors: the product is float32's
    (never rounded to bf16 on the way), so the round trip is within half a step of it."""
    torch.manual_seed(n)
    value, gate = torch.randn(n).bfloat16(), (torch.rand(n) * 2).bfloat16()
    q, scale, zero_point = kernels.quantize_bf16(value, True, "product", gate)
    exact = value.double() * gate.double()
    low, high = min(float(exact.min()), 0.0), max(float(exact.max()), 0.0)
    assert scale == pytest.approx((high - low) / 255, rel=1e-6)
    assert (((q.double() - zero_point) * scale - exact).abs() <= scale / 2 * (1 + 1e-5)).all()
    huge = torch.full((n,), 1e30).bfloat16()
    assert kernels.quantize_bf16(huge, True, "product", huge) is None  # 1e60 overflows float32


@needs_kernel
def test_quantize_a_product_refuses_mismatched_factors():
    x = torch.randn(4, 6).bfloat16()
    with pytest.raises(ValueError, match="laid out as x"):
        kernels.quantize_bf16(x, True, "product", torch.randn(6, 4).bfloat16().t())
    with pytest.raises(ValueError, match="laid out as x"):
        kernels.quantize_bf16(x, True, "product", x.float())
    with pytest.raises(ValueError, match="op must be one of"):
        kernels.quantize_bf16(x, True, "product")
    with pytest.raises(ValueError, match="op must be one of"):
        kernels.quantize_bf16(x, True, "sum", x)


@needs_kernel
def test_quantize_a_channel_range_of_a_channels_last_map():
    """The up path's joins quantize each part of a channels-last map alone: the part's own range,
    into a channels-last tensor of the part's channels."""
    torch.manual_seed(0)
    x = torch.randn(2, 10, 3, 5)
    x[:, 6:] *= 0.01
    x = x.bfloat16().contiguous(memory_format=torch.channels_last)
    for start, stop in ((0, 6), (6, 10), (3, 4)):
        q, scale, zero_point = kernels.quantize_bf16(x, True, channels=(start, stop))
        assert q.shape == (2, stop - start, 3, 5) and q.is_contiguous(memory_format=torch.channels_last)
        whole = kernels.quantize_bf16(x[:, start:stop].contiguous(memory_format=torch.channels_last), True)
        assert (scale, zero_point) == whole[1:] and torch.equal(q, whole[0])
    with pytest.raises(ValueError, match="channels-last"):
        kernels.quantize_bf16(x.contiguous(), True, channels=(0, 6))
    with pytest.raises(ValueError, match="channels"):
        kernels.quantize_bf16(x, True, channels=(6, 11))


@needs_kernel
@pytest.mark.parametrize("rows, width", [(1, 1), (3, 15), (4, 16), (2, 17), (50, 64), (6, 1280)])
def test_layer_norm_quantized_is_within_half_a_step_of_float32s(rows, width):
    """The transformer block's norms quantized as they are computed: the LayerNorm in float32,
    never rounded to bf16, so the round trip is within half a step of float64's LayerNorm (and a
    float32 rounding of the statistics)."""
    torch.manual_seed(rows * width)
    x = (torch.randn(rows, width) * 3 + 1.5).bfloat16()
    weight, bias = (torch.randn(width) * 0.5 + 1).bfloat16(), (torch.randn(width) * 0.3).bfloat16()
    q, scale, zero_point = kernels.layer_norm_quantize_bf16(x, weight, bias, 1e-5, asymmetric=True)
    assert q.dtype == torch.uint8 and q.shape == x.shape
    exact = F.layer_norm(x.double(), (width,), weight.double(), bias.double(), 1e-5)
    low, high = min(float(exact.min()), 0.0), max(float(exact.max()), 0.0)
    assert scale == pytest.approx((high - low) / 255, rel=1e-4, abs=1e-6)
    back = (q.double() - zero_point) * scale
    assert ((back - exact).abs() <= scale / 2 + 1e-5 * exact.abs().max()).all()
    x3 = x.view(1, rows, width)
    assert torch.equal(kernels.layer_norm_quantize_bf16(x3, weight, bias, 1e-5, True)[0], q.view(1, rows, width))


@needs_kernel
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e38])
def test_layer_norm_quantized_declines_what_float32_cannot_hold(bad):
    """A NaN or an infinity, or a row whose variance overflows float32, is left to bf16."""
    x, weight, bias = torch.randn(4, 40).bfloat16(), torch.ones(40).bfloat16(), torch.zeros(40).bfloat16()
    x[2, 7] = bad
    if bad == 1e38:
        x[2, 8] = -bad
    assert kernels.layer_norm_quantize_bf16(x, weight, bias, 1e-5, True) is None


@needs_kernel
def test_layer_norm_quantized_refuses_what_it_cannot_read():
    x, weight, bias = torch.randn(4, 8).bfloat16(), torch.ones(8).bfloat16(), torch.zeros(8).bfloat16()
    with pytest.raises(ValueError, match="contiguous bf16"):
        kernels.layer_norm_quantize_bf16(x.t(), weight, bias, 1e-5, True)
    with pytest.raises(ValueError, match="contiguous bf16"):
        kernels.layer_norm_quantize_bf16(x.float(), weight, bias, 1e-5, True)
    with pytest.raises(ValueError, match="weight and bias"):
        kernels.layer_norm_quantize_bf16(x, weight[:4], bias, 1e-5, True)
    with pytest.raises(ValueError, match="autograd"):
        kernels.layer_norm_quantize_bf16(x.clone().requires_grad_(), weight, bias, 1e-5, True)


@needs_kernel
@pytest.mark.parametrize("shape, groups", [((2, 64, 9, 10), 32), ((1, 48, 3, 5), 8), ((2, 24, 1, 1), 4)])
@pytest.mark.parametrize("shifted", [False, True])
def test_group_norm_silu_quantized_is_within_half_a_step_of_float32s(shape, groups, shifted):
    """The ResBlocks' GroupNorm-SiLUs quantized as they are computed, from a channels-last map, into
    a channels-last one: within half a step of float64's (plus the statistics' float32 rounding and
    the SiLU's exp, 2.6e-6 relative), the shift added per image and channel before the norm."""
    torch.manual_seed(shape[1])
    x = (torch.randn(shape) * 2 + 0.7).bfloat16().contiguous(memory_format=torch.channels_last)
    weight, bias = (torch.randn(shape[1]) * 0.5 + 1).bfloat16(), (torch.randn(shape[1]) * 0.3).bfloat16()
    shift = torch.randn(shape[0], shape[1]).bfloat16() if shifted else None
    q, scale, zero_point = kernels.group_norm_silu_quantize_bf16(x, weight, bias, groups, 1e-5, True, shift)
    assert q.dtype == torch.uint8 and q.shape == x.shape and q.is_contiguous(memory_format=torch.channels_last)
    moved = x.double() + (0 if shift is None else shift.double()[:, :, None, None])
    exact = F.silu(F.group_norm(moved, groups, weight.double(), bias.double(), 1e-5))
    low, high = min(float(exact.min()), 0.0), max(float(exact.max()), 0.0)
    assert scale == pytest.approx((high - low) / 255, rel=1e-5)
    back = (q.double() - zero_point) * scale
    assert ((back - exact).abs() <= scale / 2 + 1e-5 * exact.abs().max()).all()


@needs_kernel
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_group_norm_silu_quantized_declines_a_nan_or_infinity(bad):
    x = torch.randn(2, 16, 4, 4).bfloat16().contiguous(memory_format=torch.channels_last)
    x[1, 3, 2, 2] = bad
    ones, zeros = torch.ones(16).bfloat16(), torch.zeros(16).bfloat16()
    assert kernels.group_norm_silu_quantize_bf16(x, ones, zeros, 4, 1e-5, True) is None


@needs_kernel
def test_group_norm_silu_quantized_refuses_what_it_cannot_read():
    x = torch.randn(2, 16, 4, 4).bfloat16().contiguous(memory_format=torch.channels_last)
    ones, zeros = torch.ones(16).bfloat16(), torch.zeros(16).bfloat16()
    with pytest.raises(ValueError, match="channels-last"):
        kernels.group_norm_silu_quantize_bf16(x.contiguous(), ones, zeros, 4, 1e-5, True)
    with pytest.raises(ValueError, match="divisible"):
        kernels.group_norm_silu_quantize_bf16(x, ones, zeros, 5, 1e-5, True)
    with pytest.raises(ValueError, match="shift"):
        kernels.group_norm_silu_quantize_bf16(x, ones, zeros, 4, 1e-5, True, torch.zeros(2, 8))
    with pytest.raises(ValueError, match="bf16"):
        kernels.group_norm_silu_quantize_bf16(x.float(), ones, zeros, 4, 1e-5, True)


def float32_per_channel(weight: Tensor) -> tuple[Tensor, Tensor]:
    """The int8 weights as PyTorch's float32 operations make them (what per_channel computed before
    the C kernel): max|row| / 127 per output channel, values divided, rounded half to even, clamped."""
    scales = (weight.float().flatten(1).abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(weight.float() / scales.view(-1, *[1] * (weight.dim() - 1))).clamp_(-127, 127)
    return q.to(torch.int8), scales


@needs_kernel
@pytest.mark.parametrize(
    "shape, layout",
    [((40, 33), None), ((3, 1), None), ((64, 32, 3, 3), torch.channels_last), ((16, 8, 1, 1), None)],
)
def test_weights_quantized_per_channel_are_the_same_bytes(shape, layout):
    """per_channel's C kernel writes the very bytes and scales PyTorch's float32 chain wrote,
    halves (x.5 after the division) rounded to even, rows of zeros or of subnormals included, in
    the weight's layout; a slice of input channels (the up path's joins) too."""
    torch.manual_seed(len(shape))
    weight = torch.randn(shape) * torch.rand(shape[0]).view(-1, *[1] * (len(shape) - 1)) * 4
    weight[0] = 0.0
    weight[1] = 1e-39
    weight = weight.bfloat16()
    if weight.shape[1] > 2:
        weight.view(shape[0], -1)[2, :2] = torch.tensor([127.0, 62.5]).bfloat16()  # a half: to 62, even
    weight = weight if layout is None else weight.contiguous(memory_format=layout)
    q, scales = kernels.quantize_rows_bf16(weight)
    expected_q, expected_scales = float32_per_channel(weight)
    assert torch.equal(q, expected_q) and torch.equal(scales, expected_scales) and q.stride() == weight.stride()
    assert all(torch.equal(a, b) for a, b in zip(int8.per_channel(weight), (expected_q, expected_scales)))
    if weight.dim() == 4:
        part = weight[:, weight.shape[1] // 2 :]
        assert all(torch.equal(a, b) for a, b in zip(int8.per_channel(part), float32_per_channel(part)))
    with pytest.raises(ValueError, match="contiguous or channels-last"):
        kernels.quantize_rows_bf16(weight.float())


def test_a_range_too_narrow_for_a_normal_scale_is_left_to_bf16():
    """Values within about 1e-36 of zero give a subnormal scale whose inverse overflows (or which
    the CPU flushes to zero), so zero would leave the grid: the kernel declines instead."""
    if not kernels.quantize_available():
        pytest.skip(kernels.quantize_status())
    tiny = torch.tensor([0.0, 1e-38, -1e-38, 5e-39]).bfloat16()
    assert kernels.quantize_bf16(tiny, True) is None and kernels.quantize_bf16(tiny, False) is None
    narrow = torch.tensor([0.0, 1e-30, -1e-30]).bfloat16()
    q, scale, zero_point = kernels.quantize_bf16(narrow, True)
    assert q[0] == zero_point and ((q.float() - zero_point) * scale - narrow.float()).abs().max() <= scale / 2
