"""The inference speed-ups that must not change the answer: the dtype choice, the
channels-last layout, the upsample convolution computed at low resolution, linear layers
as 1x1 convolutions, prepare() swapping them in, and malloc keeping freed memory."""

import ast
import contextlib
import copy
import ctypes
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RUNTIME_UNET

import diffuse.kernels
import diffuse.models
import diffuse.runtime.attention
from diffuse.models.clip import CLIPTextEncoder
from diffuse.models.configs import TextEncoderConfig, VAEConfig
from diffuse.models.unet import UNet
from diffuse.models.vae import AutoencoderKL
from diffuse.runtime import auto_dtype, cpu_has_bf16, inference_layout, layers, prepare, resolve_device, resolve_dtype
from diffuse.runtime.attention import attention
from diffuse.runtime.layers import OneDNNLinear
from diffuse.runtime.upsample import phase_kernels, upsample_conv


def plain_upsample_conv(x, conv):
    return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (2, 8, 5, 7), (1, 16, 12, 12)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_conv_is_the_plain_map(monkeypatch, shape, channels_last):
    """The folded path, taken here even on maps this small, is the plain map."""
    monkeypatch.setattr(diffuse.runtime.upsample, "MIN_SOURCE_PIXELS", 0)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(shape[1], 6, 3, padding=1).double()
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    got = upsample_conv(x, conv)
    assert got.shape == (shape[0], 6, 2 * shape[2], 2 * shape[3])
    torch.testing.assert_close(got, plain_upsample_conv(x, conv), rtol=0, atol=1e-12)
    if shape[2] * shape[3] > 1:  # a 1x1 map is in both layouts at once
        assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_conv_in_bf16_packs_its_kernels_and_keeps_the_values(monkeypatch, channels_last):
    """Outside autograd a bf16 CPU upsampling with the runtime's channels-last weights keeps its
    phase kernels packed for oneDNN: the same values, bit for bit, as the plain kernels give (used
    where autograd is on), for either layout of the input, and packed again once the weight
    changes in place (a LoRA merged)."""
    monkeypatch.setattr(diffuse.runtime.upsample, "MIN_SOURCE_PIXELS", 0)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 48, 3, padding=1).bfloat16().requires_grad_(False).to(memory_format=torch.channels_last)
    x = torch.randn(2, 32, 9, 7).bfloat16()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        with torch.no_grad():
            got = upsample_conv(x, conv)
        assert conv._phase_cache.kernels.is_mkldnn
        with torch.enable_grad():  # frozen weights: the plain kernels, kept
            plain = upsample_conv(x, conv)
        assert not conv._phase_cache.kernels.is_mkldnn
        assert torch.equal(got, plain)
        exact = plain_upsample_conv(x.float(), copy.deepcopy(conv).float())
        assert (got.float() - exact).norm() / exact.norm() < 0.01  # bf16's rounding, and the values are these
        twin = copy.deepcopy(conv)  # a copy starts without the cache, which cannot be copied
        assert twin._phase_cache is None and torch.equal(upsample_conv(x, twin), plain)
        conv.weight.add_(0.5)  # an in-place change: packed again at the next call


@pytest.mark.parametrize("amx", [False, True])
def test_small_maps_fold_with_packed_kernels_where_the_cpu_has_no_amx(monkeypatch, amx):
    """Packed bf16 kernels folded faster than the plain path at every size on a CPU without AMX
    (bench/RESULTS.md), so there small maps fold too; AMX hosts keep MIN_SOURCE_PIXELS."""
    monkeypatch.setattr(diffuse.runtime.upsample, "cpu_has_amx", lambda: amx)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 8, 3, padding=1).bfloat16().to(memory_format=torch.channels_last)
    x = torch.randn(2, 16, 4, 4).bfloat16().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = upsample_conv(x, conv)
        plain = plain_upsample_conv(x, conv)
    assert (getattr(conv, "_phase_cache", None) is not None) == (not amx)
    assert (got.float() - plain.float()).norm() / plain.float().norm() < 0.01


def test_upsample_conv_gradients_match():
    """The VAE trains through it: weights, bias and input get the same gradients."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 5, 3, padding=1).double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    grads = []
    for fn in (upsample_conv, plain_upsample_conv):
        conv.zero_grad()
        x.grad = None
        (fn(x, conv) ** 2).sum().backward()
        grads.append([x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone()])
    for fast, plain in zip(*grads):
        torch.testing.assert_close(fast, plain, rtol=1e-10, atol=1e-10)


def test_phase_kernels_sum_the_taps_that_share_a_source_pixel():
    weight = torch.arange(9.0).reshape(1, 1, 3, 3)  # rows [0 1 2], [3 4 5], [6 7 8]
    kernels = phase_kernels(weight)
    # phase (0, 0): rows (w0, w1 + w2), columns likewise
    assert kernels[0, 0].tolist() == [[0.0, 1 + 2], [3 + 6, 4 + 5 + 7 + 8]]
    # phase (1, 1): rows (w0 + w1, w2), columns (c0 + c1, c2)
    assert kernels[3, 0].tolist() == [[0 + 1 + 3 + 4, 2 + 5], [6 + 7, 8]]


@torch.no_grad()
@pytest.mark.parametrize("max_scores", [diffuse.runtime.attention.MAX_SCORES, 2 * 50 * 24, 7 * 24])
@pytest.mark.parametrize("softmax_kernel", [True, False])
def test_bf16_attention_is_the_fused_kernels_within_bf16_rounding(monkeypatch, max_scores, softmax_kernel):
    """The explicit form (heads together while their scores fit max_scores, two of three here in
    the middle case, else one by one in query chunks; with the C softmax where this machine builds
    it, and with PyTorch's), on the transposed views the UNet hands it, against float64; float32
    is the fused kernel."""
    monkeypatch.setattr(diffuse.runtime.attention, "MAX_SCORES", max_scores)
    monkeypatch.setattr(diffuse.runtime.attention, "cpu_has_amx", lambda: False)
    monkeypatch.setattr(diffuse.runtime.attention.attention_kernel, "takes", lambda *qkv: False)
    if not softmax_kernel:
        monkeypatch.setattr(diffuse.kernels, "softmax_bf16_", lambda scores: False)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, n, 3 * 8).unflatten(-1, (3, 8)).transpose(1, 2) for n in (50, 24, 24))
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    got = attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert got.shape == (2, 3, 50, 8) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), exact, rtol=0, atol=3e-2)
    assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


@torch.no_grad()
@pytest.mark.parametrize("width", [8, 12])
def test_bf16_attention_with_padded_values_is_the_same(monkeypatch, width):
    """Values padded with zero columns for a faster product give the same attention, unpadded."""
    monkeypatch.setattr(diffuse.runtime.attention, "cpu_has_amx", lambda: False)
    monkeypatch.setattr(diffuse.runtime.attention.attention_kernel, "takes", lambda *qkv: False)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, n, 3 * width).unflatten(-1, (3, width)).transpose(1, 2).bfloat16() for n in (50, 24, 24))
    monkeypatch.setattr(diffuse.runtime.attention, "PADDED_VALUE_WIDTH", {})
    plain = attention(q, k, v)
    monkeypatch.setattr(diffuse.runtime.attention, "PADDED_VALUE_WIDTH", {width: 16})
    padded = attention(q, k, v)
    assert padded.shape == plain.shape == (2, 3, 50, width)
    torch.testing.assert_close(padded, plain, rtol=2**-7, atol=1e-3)


@torch.no_grad()
def test_bf16_attention_with_amx_is_the_fused_kernel(monkeypatch):
    """Where the CPU has AMX, what diffuse's kernel leaves goes to PyTorch's fused kernel, which
    runs on the tiles too, and the explicit form is not used."""
    monkeypatch.setattr(diffuse.runtime.attention, "cpu_has_amx", lambda: True)
    monkeypatch.setattr(diffuse.runtime.attention.attention_kernel, "takes", lambda *qkv: False)
    monkeypatch.setattr(diffuse.kernels, "softmax_bf16_", lambda scores: pytest.fail("explicit form used"))
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, n, 3 * 8).unflatten(-1, (3, 8)).transpose(1, 2).bfloat16() for n in (50, 24, 24))
    assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("shape", [(5, 24), (2, 77, 24), (3, 1, 4, 24), (24,), (0, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_as_a_convolution_is_the_linear_map(shape, bias):
    """Without autograd float32 rows go through a 1x1 convolution and come back in their shape,
    within summation-order rounding; bf16 is PyTorch's linear layer (oneDNN's matmul) exactly."""
    torch.manual_seed(0)
    layer, x = OneDNNLinear(24, 40, bias=bias), torch.randn(shape)
    with torch.no_grad():
        exact = F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
        got = layer(x)
        assert got.shape == (*shape[:-1], 40) and got.is_contiguous()
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)
        half = layer.to(torch.bfloat16)(x.bfloat16())
        assert half.dtype == torch.bfloat16
        assert torch.equal(half, F.linear(x.bfloat16(), layer.weight, layer.bias))


@torch.no_grad()
def test_fused_geglu_and_biased_bf16_linear_are_the_plain_layers_within_bf16_rounding():
    """oneDNN's epilogues (bias, gelu, the gate's product) give the plain layers' results to
    within bf16 rounding of the output; float32 and autograd take the plain layers."""
    from diffuse.models.unet import GEGLU
    from diffuse.runtime.layers import FusedGEGLU

    torch.manual_seed(0)
    plain = GEGLU(24, 40)
    plain.proj.bias.normal_()
    fused, x = FusedGEGLU(24, 40), torch.randn(2, 7, 24)
    fused.load_state_dict(plain.state_dict())
    assert torch.equal(fused(x), plain(x))
    exact = plain.double()(x.double())
    got = fused.bfloat16()(x.bfloat16())
    assert got.shape == (2, 7, 40) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), exact, rtol=2**-6, atol=2e-2)
    linear = OneDNNLinear(24, 40).bfloat16()
    exact = F.linear(x.double(), linear.weight.double(), linear.bias.double())
    torch.testing.assert_close(linear(x.bfloat16()).double(), exact, rtol=2**-6, atol=2e-2)


def test_linear_under_autograd_is_f_linear():
    """Training keeps PyTorch's own linear layer and its gradients."""
    torch.manual_seed(0)
    layer, x = OneDNNLinear(8, 3), torch.randn(4, 8, requires_grad=True)
    out = layer(x)
    assert torch.equal(out, F.linear(x, layer.weight, layer.bias))
    out.sum().backward()
    assert layer.weight.grad is not None and x.grad is not None


@torch.no_grad()
def test_layout_and_folding_are_cpu_choices():
    """On a GPU cuDNN ran neither channels-last weights nor the folded upsample faster
    (bench/RESULTS.md): off the CPU (the meta device stands in for a GPU here) weights keep
    the standard layout and the upsample takes the plain path."""
    assert inference_layout(torch.empty(8, 4, 3, 3)).is_contiguous(memory_format=torch.channels_last)
    assert inference_layout(torch.empty(8, 4, 3, 3, device="meta")).is_contiguous()
    for device, folds in (("cpu", True), ("meta", False)):
        conv = torch.nn.Conv2d(4, 8, 3, padding=1, device=device)
        out = upsample_conv(torch.zeros(1, 4, 16, 16, device=device), conv)
        assert out.shape == (1, 8, 32, 32)
        assert hasattr(conv, "_phase_cache") == folds


def test_unet_keeps_odd_sizes_on_the_plain_path():
    """A latent side that halves to an odd size upsamples to 2x-1: not the folded map's shape."""
    cfg = replace(TINY_RUNTIME_UNET, attention_levels=(False, True))
    torch.manual_seed(0)
    unet = prepare(UNet(cfg).eval(), "cpu", torch.float64)
    x, context = torch.randn(1, 4, 7, 9, dtype=torch.float64), torch.randn(1, 3, 16, dtype=torch.float64)
    with torch.no_grad():
        out = unet(x, torch.tensor([10]), context)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_channels_last_changes_nothing_but_the_layout():
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(base_channels=32, channel_mult=(1, 2), norm_groups=8)).eval()
    cfg = TINY_RUNTIME_UNET
    unet = UNet(cfg).eval()
    latents, image = torch.randn(2, 4, 8, 8), torch.rand(1, 3, 16, 16) * 2 - 1
    context = torch.randn(2, 5, 16)
    with torch.no_grad():
        before = unet(latents, torch.tensor([3, 700]), context), vae.decode(latents), vae.encode(image).mean
        for module in (unet, vae):  # as the loader lays out each weight it fills
            for param in module.parameters():
                param.data = inference_layout(param.data)
        assert unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
        after = unet(latents, torch.tensor([3, 700]), context), vae.decode(latents), vae.encode(image).mean
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_dtype_names_and_the_automatic_choice():
    assert resolve_dtype(None) == torch.float32
    assert resolve_dtype("bf16") == torch.bfloat16 and resolve_dtype(torch.float16) == torch.float16
    assert resolve_dtype("auto") == (torch.bfloat16 if cpu_has_bf16() else torch.float32)
    assert auto_dtype("cpu") == resolve_dtype("auto", "cpu")
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        resolve_dtype("int8")
    with pytest.raises(ValueError, match="unsupported dtype"):
        resolve_dtype(torch.int8)


def test_load_pipeline_picks_the_dtype_automatically(reference_folders):
    import diffuse

    pipe = diffuse.load_pipeline(reference_folders["sd1"])
    assert pipe.dtype == auto_dtype("cpu")
    assert pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_devices_are_named_and_checked():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            resolve_device("cuda")
    else:
        with pytest.raises(ValueError, match="CUDA GPU\\(s\\) exist"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


# ---------------------------------------------------------------- prepare


def tiny_networks(linear_projection: bool = False) -> dict[str, torch.nn.Module]:
    """Plain networks of every kind prepare() touches, with random weights (SD1's conv
    projections or SD2's linear ones in the UNet's transformers)."""
    torch.manual_seed(0)
    unet_cfg = replace(TINY_RUNTIME_UNET, use_linear_projection=linear_projection)
    text_cfg = TextEncoderConfig(vocab_size=100, max_length=12, width=32, layers=3, heads=4, mlp_width=64)
    networks = {
        "unet": UNet(unet_cfg),
        "vae": AutoencoderKL(VAEConfig(base_channels=32, channel_mult=(1, 2), norm_groups=8)),
        "text": CLIPTextEncoder(text_cfg),
    }
    with torch.no_grad():  # no parameter left at an initial constant (zeroed biases, unit norms)
        for network in networks.values():
            for param in network.parameters():
                param.add_(torch.randn_like(param) * 0.05)
    return {name: network.eval() for name, network in networks.items()}


def run_all(networks: dict[str, torch.nn.Module], dtype: torch.dtype) -> list[torch.Tensor]:
    """Each network's inference outputs: the UNet at a size whose upsample folds (16x16 from
    a 32x32 latent) and at odd sides, the VAE both ways, the text encoder with clip skip."""
    generator = torch.Generator().manual_seed(1)
    latents, odd = torch.randn(2, 4, 32, 32, generator=generator), torch.randn(1, 4, 7, 9, generator=generator)
    context, image = torch.randn(2, 5, 16, generator=generator), torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1
    ids = torch.randint(100, (2, 12), generator=generator)
    unet, vae, text = networks["unet"], networks["vae"], networks["text"]
    with torch.no_grad():
        return [
            unet(latents.to(dtype), torch.tensor([3, 700]), context.to(dtype)),
            unet(odd.to(dtype), torch.tensor([500]), context[:1].to(dtype)),
            vae.decode(latents[:1, :, :16, :16].to(dtype)),
            vae.encode(image.to(dtype)).mean,
            text(ids),
            text(ids, clip_skip=2),
        ]


@pytest.mark.parametrize("linear_projection", [False, True], ids=["sd1-conv", "sd2-linear"])
def test_prepared_networks_compute_what_the_plain_ones_do(linear_projection):
    """float32: the prepared layers are the same maps summed in another order (oneDNN's 1x1
    convolutions, the folded upsample's summed taps, channels-last kernels), so they agree to
    rtol 1e-4 / atol 1e-5. bf16: within 3% of the output's range of the float32 answer, as
    the plain bf16 networks are."""
    plain = tiny_networks(linear_projection)
    exact = run_all(plain, torch.float32)
    prepared = {name: prepare(copy.deepcopy(network), "cpu", torch.float32) for name, network in plain.items()}
    for got, want in zip(run_all(prepared, torch.float32), exact):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for networks in (prepared, plain):
        half = {name: network.to(torch.bfloat16) for name, network in networks.items()}
        for got, want in zip(run_all(half, torch.bfloat16), exact):
            assert got.dtype == torch.bfloat16
            assert (got.float() - want).abs().max() <= 0.03 * want.abs().max()


def test_prepare_swaps_layers_in_place_and_keeps_every_weight():
    networks = tiny_networks()
    before = {name: {k: v.clone() for k, v in network.state_dict().items()} for name, network in networks.items()}
    for name, network in networks.items():
        assert prepare(network, "cpu", torch.float32) is network
        state = network.state_dict()
        assert list(state) == list(before[name])
        assert all(torch.equal(state[k], v) for k, v in before[name].items())
    unet, vae = networks["unet"], networks["vae"]
    assert type(unet.input_blocks[1][1].transformer_blocks[0].attn1) is layers.ChunkedAttention
    assert (
        type(unet.time_embed[0]) is layers.OneDNNLinear
        and type(networks["text"].final_layer_norm) is torch.nn.LayerNorm
    )
    assert type(vae.decoder) is layers.InPlaceDecoder and type(vae.decoder.up[1].upsample) is layers.FoldedVAEUpsample
    assert unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not any(type(m) in layers.FAST_LAYERS for network in networks.values() for m in network.modules())


def test_prepare_is_idempotent():
    networks = tiny_networks()
    for network in networks.values():
        prepare(network, "cpu", torch.bfloat16)
    classes = {name: [type(m) for m in network.modules()] for name, network in networks.items()}
    storage = {name: [p.data_ptr() for p in network.parameters()] for name, network in networks.items()}
    once = run_all(networks, torch.bfloat16)
    for name, network in networks.items():
        prepare(network, "cpu", torch.bfloat16)
        assert [type(m) for m in network.modules()] == classes[name]
        assert [p.data_ptr() for p in network.parameters()] == storage[name]  # nothing copied again
    for got, want in zip(run_all(networks, torch.bfloat16), once):
        assert torch.equal(got, want)


def test_a_prepared_network_cast_up_in_place_runs_the_float32_path():
    """diffuse.numerics retries a bf16 network in float32 by casting its weights in place: the
    swapped-in layers pick their path per call, so it then computes exactly what a network
    prepared in float32 from the same weights does (the folded upsample's kernels refolded)."""
    from diffuse.numerics import in_float32

    half = {name: prepare(network, "cpu", torch.bfloat16) for name, network in tiny_networks().items()}
    run_all(half, torch.bfloat16)  # folds the upsample kernels in bf16 first
    full = {name: prepare(copy.deepcopy(network), "cpu", torch.float32) for name, network in half.items()}
    with contextlib.ExitStack() as stack:
        for network in half.values():
            stack.enter_context(in_float32(network))
        for got, want in zip(run_all(half, torch.float32), run_all(full, torch.float32)):
            assert got.dtype == torch.float32 and torch.equal(got, want)


def test_plain_networks_train():
    """Training builds the plain networks and never prepares them: gradients reach every weight."""
    networks = {name: network.train() for name, network in tiny_networks().items()}
    generator = torch.Generator().manual_seed(2)
    latents, context = torch.randn(2, 4, 32, 32, generator=generator), torch.randn(2, 5, 16, generator=generator)
    image = torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1
    losses = [
        networks["unet"](latents, torch.tensor([3, 700]), context).square().mean(),
        networks["vae"](image)[0].square().mean(),
        networks["text"](torch.randint(100, (2, 12), generator=generator)).square().mean(),
    ]
    sum(losses).backward()
    for name, network in networks.items():
        # The VAE's forward decodes a sample: its encoder's and decoder's weights all take part.
        missing = [k for k, p in network.named_parameters() if p.grad is None or not p.grad.isfinite().all()]
        assert not missing, f"{name}: no gradient for {missing[:5]}"


MODELS = Path(diffuse.models.__file__).parent


@pytest.mark.parametrize("path", sorted(MODELS.glob("*.py")), ids=lambda p: p.name)
def test_no_model_file_imports_runtime_or_speedups(path):
    """The networks are plain PyTorch; how they run fast lives above them (read from the source,
    so an import under TYPE_CHECKING or inside a function counts too)."""
    imported = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "diffuse.models" if node.level == 1 else "diffuse" if node.level == 2 else ""
            module = ".".join(part for part in (base, node.module) if part)
            imported += [module] + [f"{module}.{alias.name}" for alias in node.names]
    forbidden = [
        name for name in imported if name.startswith(("diffuse.runtime", "diffuse.speedups", "diffuse.kernels"))
    ]
    assert not forbidden, f"{path.name} imports {forbidden}"


# Allocates and frees 64 MB twelve times in a worker thread (as the server generates),
# printing how many of those allocations page-faulted no memory in.
REFAULT_SCRIPT = """
import resource, threading, torch
from diffuse.runtime import keep_freed_memory
print(keep_freed_memory())
faults = []
def work():
    for _ in range(12):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(16 * 2**20)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(sum(count < 1000 for count in faults))
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"),
    reason="the malloc setting is for glibc",
)
@pytest.mark.parametrize("setting", ["1", "0"])
def test_freed_memory_is_reused_without_page_faults(setting):
    """A 64 MB tensor is 16384 pages of 4 KB: by default each allocation faults them all in
    again; with freed memory kept, most reuse earlier ones' pages (the first few grow the
    heap, and now and then one lands where the heap must grow again). In a fresh process,
    since the setting is process-wide."""
    env = {**os.environ, "DIFFUSE_KEEP_FREED_MEMORY": setting}
    done = subprocess.run([sys.executable, "-c", REFAULT_SCRIPT], capture_output=True, text=True, env=env, check=True)
    took_effect, without_faults = done.stdout.split()
    if setting == "1":
        assert took_effect == "True" and int(without_faults) >= 4
    else:
        assert took_effect == "False" and int(without_faults) == 0
