"""No black image returned as a success: a non-finite network output in bfloat16 or float16 reruns
that network in float32 (recorded as the info's nan_fallback), and in float32 it is an error
naming the network and the step, from the Python API, the CLI and the server alike.

NaN is injected with forward hooks, in the reduced precision only or always."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import diffuse
import diffuse.loader
from diffuse.models.clip import CLIPTextEncoder
from diffuse.models.unet import UNet
from diffuse.models.vae import AutoencoderKL
from diffuse.numerics import Fallback, NonFiniteError, all_finite, in_float32
from diffuse.runtime import inference_layout
from diffuse.speedups import Speedups
from diffuse.tokenizer import CLIPTokenizer
from diffuse.train.presets import TINY

REDUCED = (torch.bfloat16, torch.float16)
ALL_DTYPES = (torch.float32, *REDUCED)
NETWORKS = ("text_encoder", "unet", "vae")
RUN = {"steps": 4, "guidance_scale": 5.0, "sampler": "Euler", "seed": 3}


def tiny_pipe(dtype: torch.dtype) -> diffuse.Pipeline:
    """The training preset's architecture with random weights, stored as the loader stores them:
    in `dtype`, convolution kernels channels-last."""
    torch.manual_seed(0)
    networks = {
        "text_encoder": CLIPTextEncoder(TINY.text_encoder),
        "unet": UNet(TINY.unet),
        "vae": AutoencoderKL(TINY.vae),
    }
    with torch.no_grad():
        for net in networks.values():
            net.eval()
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.05)  # off the zero-initialised outputs: a real image
                p.data = inference_layout(p.data.to(dtype))
    return diffuse.Pipeline(
        tokenizer=CLIPTokenizer.from_bpe_gz(pad_token_id=TINY.pad_token_id),
        config=TINY,
        source=Path("in-memory"),
        **networks,
    )


@pytest.fixture(scope="module")
def pipes() -> dict[torch.dtype, diffuse.Pipeline]:
    return {dtype: tiny_pipe(dtype) for dtype in ALL_DTYPES}


def poison(module: nn.Module, *, reduced_only: bool, from_call: int = 0, last_item_only: bool = False):
    """A forward hook that turns the module's output to NaN (from its `from_call`-th call on; only in
    bf16/fp16 with `reduced_only`; only the batch's last item with `last_item_only`)."""
    calls = 0

    def hook(_module, _args, out):
        nonlocal calls
        calls += 1
        tensor = out[0] if isinstance(out, tuple) else out
        if calls <= from_call or (reduced_only and tensor.dtype not in REDUCED):
            return None
        poisoned = tensor.clone()
        (poisoned[-1:] if last_item_only else poisoned).fill_(float("nan"))
        return (poisoned, *out[1:]) if isinstance(out, tuple) else poisoned

    return module.register_forward_hook(hook)


def snapshot(pipe: diffuse.Pipeline) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()} for name in NETWORKS}


def assert_restored(pipe: diffuse.Pipeline, before: dict[str, dict[str, torch.Tensor]]) -> None:
    """Every weight back in its own dtype, bit for bit, channels-last kernels still channels-last."""
    for name in NETWORKS:
        for key, now in getattr(pipe, name).state_dict().items():
            was = before[name][key]
            assert now.dtype == was.dtype and torch.equal(now, was), f"{name}.{key}"
            assert now.stride() == was.stride(), f"{name}.{key}: layout changed"


def pixels(result) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in result.images])


# ---- the pieces -------------------------------------------------------------------------------


def test_all_finite_sees_nan_and_either_infinity_in_any_dtype():
    for dtype in ALL_DTYPES:
        x = torch.randn(2, 4, 8, 8).to(dtype)
        assert all_finite(x) and all_finite(x, x[:0])
        for bad in (float("nan"), float("inf"), float("-inf")):
            y = x.clone()
            y[1, 3, 7, 7] = bad
            assert not all_finite(y) and not all_finite(x, y), (dtype, bad)


def test_in_float32_is_a_lossless_round_trip_even_on_error(pipes):
    pipe = pipes[torch.bfloat16]
    before = snapshot(pipe)
    weight = pipe.unet.out[2].weight
    assert weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="inside"), in_float32(pipe.unet):
        assert {p.dtype for p in pipe.unet.parameters()} == {torch.float32}
        assert pipe.unet.out[2].weight is weight and weight.is_contiguous(memory_format=torch.channels_last)
        raise RuntimeError("inside")
    assert_restored(pipe, before)
    # A parameter kept in float32 on purpose stays float32.
    mixed = nn.Sequential(nn.Linear(2, 2).to(torch.float16), nn.Linear(2, 2))
    with in_float32(mixed):
        pass
    assert [p.dtype for p in mixed.parameters()] == [torch.float16] * 2 + [torch.float32] * 2


def test_fallback_records_each_network_once_and_errors_in_float32():
    net = nn.Linear(3, 3).to(torch.bfloat16)
    taken: list[str] = []
    seen = []

    def compute():
        seen.append(net.weight.dtype)
        return torch.full((2,), float("nan")) if net.weight.dtype == torch.bfloat16 else torch.ones(2)

    with Fallback(taken) as fallback:
        fallback.run(net, "VAE decoder", compute)
        fallback.run(net, "VAE encoder", compute)
        assert net.weight.dtype == torch.bfloat16  # a one-call fallback is undone at once
        fallback.run(net, "UNet", compute, stay=True)
        assert net.weight.dtype == torch.float32  # the UNet stays float32 until the generation ends
    assert net.weight.dtype == torch.bfloat16 and taken == ["VAE float32", "UNet float32"]
    assert seen == [torch.bfloat16, torch.float32] * 3
    with pytest.raises(
        NonFiniteError,
        match=r"^the UNet's output had non-finite values at step 2 of 5 in float32 "
        r"\(as in bfloat16\); no image was made$",
    ):
        Fallback().run(net, "UNet", lambda: torch.full((2,), float("nan")), where=" at step 2 of 5")
    assert net.weight.dtype == torch.bfloat16


# ---- the pipeline: a NaN in reduced precision falls back to float32 ----------------------------


@pytest.mark.parametrize("dtype", REDUCED, ids=str)
def test_unet_nan_falls_back_to_float32_from_that_step_for_the_whole_batch(pipes, dtype):
    """NaN in the batch's last image from the third UNet call on, in reduced precision only: the same
    images as a run whose UNet was switched to float32 after its second step."""
    pipe = pipes[dtype]
    before = snapshot(pipe)
    handle = poison(pipe.unet.middle_block[0], reduced_only=True, from_call=2, last_item_only=True)
    try:
        result = pipe.txt2img("a red circle", batch_size=2, **RUN)
    finally:
        handle.remove()
    assert result.info["nan_fallback"] == "UNet float32"
    assert all("NaN fallback: UNet float32" in text for text in result.infotexts)
    assert_restored(pipe, before)

    def switch_after_second_step(step):
        if step.index == 1:
            pipe.unet.float()

    try:
        expected = pipe.txt2img("a red circle", batch_size=2, callback=switch_after_second_step, **RUN)
    finally:
        pipe.unet.to(dtype)
    assert np.array_equal(pixels(result), pixels(expected))
    assert pixels(result).std() > 5  # an image, not a flat black one
    plain = pipe.txt2img("a red circle", batch_size=2, **RUN)
    assert plain.info["nan_fallback"] is None and not np.array_equal(pixels(plain), pixels(result))


@pytest.mark.parametrize("dtype", REDUCED, ids=str)
@pytest.mark.parametrize(
    "network, block, label", [("vae", "decoder", "VAE float32"), ("text_encoder", None, "text encoder float32")]
)
def test_vae_and_text_encoder_nan_is_redone_in_float32(pipes, dtype, network, block, label):
    pipe = pipes[dtype]
    before = snapshot(pipe)
    module = getattr(pipe, network)
    handle = poison(getattr(module, block) if block else module, reduced_only=True)
    try:
        result = pipe.txt2img("a red circle", **RUN)
    finally:
        handle.remove()
    assert result.info["nan_fallback"] == label
    assert_restored(pipe, before)
    module.float()  # the reference: that one network in float32 throughout
    try:
        expected = pipe.txt2img("a red circle", **RUN)
    finally:
        module.to(dtype)
    assert np.array_equal(pixels(result), pixels(expected))
    assert pixels(result).std() > 5


def test_img2img_encoder_and_decoder_fall_back_as_one_vae_entry_beside_the_unet(pipes):
    pipe = pipes[torch.float16]
    before = snapshot(pipe)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    handles = [poison(m, reduced_only=True) for m in (pipe.unet.out, pipe.vae.encoder, pipe.vae.decoder)]
    try:
        result = pipe.img2img(picture, "a red circle", strength=0.5, **RUN)
    finally:
        for handle in handles:
            handle.remove()
    assert result.info["nan_fallback"] == "VAE float32, UNet float32"
    assert pixels(result).std() > 5
    assert_restored(pipe, before)


def test_speedups_see_the_retried_call_as_the_first_try(pipes):
    """With the deep-feature cache and token merging on, the retry gets the same cached features,
    call count and merge corners: the images match a run switched to float32 at that step."""
    pipe = pipes[torch.bfloat16]
    run = {**RUN, "steps": 5, "speedups": Speedups(deep_cache_interval=2, token_merging=0.5)}
    handle = poison(pipe.unet.out, reduced_only=True, from_call=2)
    try:
        result = pipe.txt2img("a red circle", **run)
    finally:
        handle.remove()

    def switch_after_second_step(step):
        if step.index == 1:
            pipe.unet.float()

    try:
        expected = pipe.txt2img("a red circle", callback=switch_after_second_step, **run)
    finally:
        pipe.unet.to(torch.bfloat16)
    assert result.info["nan_fallback"] == "UNet float32"
    assert np.array_equal(pixels(result), pixels(expected))


# ---- ... and in float32 it is an error, in every precision -----------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize(
    "where, message",
    [
        ("unet", r"the UNet's output had non-finite values at step 3 of 4 in float32"),
        ("vae.decoder", r"the VAE decoder's output had non-finite values in float32"),
        ("vae.encoder", r"the VAE encoder's output had non-finite values in float32"),
        ("text_encoder", r"the text encoder's output had non-finite values in float32"),
    ],
)
def test_nan_in_float32_too_is_an_error_naming_the_network(pipes, dtype, where, message):
    pipe = pipes[dtype]
    before = snapshot(pipe)
    module = pipe
    for name in where.split("."):
        module = getattr(module, name)
    unet = where == "unet"
    handle = poison(module.out if unet else module, reduced_only=False, from_call=2 if unet else 0)
    picture = Image.new("RGB", (64, 64), (200, 30, 30))
    try:
        with pytest.raises(NonFiniteError, match=f"^{message}.*; no image was made$"):
            pipe.img2img(picture, "a red circle", strength=1.0, **RUN)
    finally:
        handle.remove()
    assert_restored(pipe, before)


def test_decode_latents_alone_is_checked_too(pipes):
    """The server decodes an interrupted job's latest estimate with decode_latents."""
    pipe = pipes[torch.bfloat16]
    latents = torch.randn(1, 4, 8, 8)
    taken: list[str] = []
    handle = poison(pipe.vae.decoder, reduced_only=True)
    try:
        assert all_finite(pipe.decode_latents(latents, taken)) and taken == ["VAE float32"]
    finally:
        handle.remove()
    handle = poison(pipe.vae.decoder, reduced_only=False)
    try:
        with pytest.raises(NonFiniteError, match="VAE decoder"):
            pipe.decode_latents(latents)
    finally:
        handle.remove()
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.bfloat16}


# ---- the CLI and the server write nothing --------------------------------------------------------

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "default"


def test_cli_exits_2_with_one_line_and_writes_no_file(tmp_path, monkeypatch, capsys):
    from diffuse.cli import main

    load = diffuse.loader.load_pipeline

    def load_poisoned(*args, **kwargs):
        pipe = load(*args, **kwargs)
        poison(pipe.unet.out, reduced_only=False, from_call=1)
        return pipe

    monkeypatch.setattr(diffuse.loader, "load_pipeline", load_poisoned)
    out = tmp_path / "out"
    code = main(["txt2img", "a red circle", "--steps", "3", "--seed", "5", "--dtype", "bfloat16", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    # One error line (the progress bar, left open, may share its terminal line).
    assert err.count("diffuse: error:") == 1
    assert err.split("diffuse: error: ")[1].splitlines()[0] == (
        "the UNet's output had non-finite values at step 2 of 3 in float32 (as in bfloat16); no image was made"
    )
    assert not out.exists() or not any(out.iterdir())


def test_server_answers_an_error_and_saves_nothing(tmp_path):
    pytest.importorskip("fastapi")
    from test_server import QUICK, Running, settings

    running = Running(settings(tmp_path))
    try:
        pipe = running.app.app.state.server.host.pipe
        poison(pipe.vae.decoder, reduced_only=False)
        status, body, _ = running.call("POST", "/sdapi/v1/txt2img", {**QUICK, "seed": 1})
        assert status == 500 and "images" not in body and "VAE" in body["detail"]
        assert body["error"] == "NonFiniteError" and body["detail"].startswith("the VAE decoder's output")

        status, body, _ = running.call("POST", "/diffuse/v1/jobs", {**QUICK, "seed": 2})
        assert status == 202
        with urllib.request.urlopen(f"{running.base}/diffuse/v1/jobs/{body['id']}/events", timeout=60) as stream:
            last = stream.read().decode().strip().split("\n\n")[-1]
        name, data = last.split("\n", 1)
        failed = json.loads(data.removeprefix("data: "))
        assert name == "event: failed" and failed["error"] == "NonFiniteError"
        assert "VAE decoder" in failed["detail"]
    finally:
        running.stop()
    outputs = tmp_path / "outputs"
    assert not outputs.exists() or not list(outputs.rglob("*.png"))
