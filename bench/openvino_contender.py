"""OpenVINO as a contender in bench/speed.py: diffusers' own SD1.5 UNet and VAE decoder, converted
by `ov.convert_model` and run by OpenVINO's CPU plugin, as a CPU user deploying Stable Diffusion
with OpenVINO runs them.

The conversion is done once, in a process of its own, and saved as OpenVINO IR (float32 weights,
dynamic shapes) into bench/cache/openvino-sd15, beside the random-weights folder it was made from
(bench/sd15.py; delete the IR folder when that one is rebuilt). Each contender's process reads the
IR, fixes its shapes to the size being timed (static shapes, as OpenVINO's Stable Diffusion
pipelines compile) and compiles it for the CPU with INFERENCE_PRECISION_HINT f32 or bf16 and as
many threads as the process may use. The UNet and the VAE decoder stay compiled side by side, as
a pipeline holds them, so a process's peak resident memory is that of both networks, each at the
size last timed, like diffuse's process, which holds its whole pipeline.

The int8 UNet is post-training quantization by NNCF (`nncf.quantize`, transformer preset: 8-bit
weights per output channel and 8-bit activations with static scales at the convolutions and
matmuls, SmoothQuant and bias correction as NNCF applies them), calibrated on guided steps at
512x512: the random model's own text encoder on a few prompts (conditional and empty), random
unit-variance latents, timesteps spread over the schedule. It runs with the bf16 hint, so what is
not quantized runs in bf16. Saved as IR beside the others, once per calibration count.

Requires the `bench` extra: `.venv/bin/pip install -e '.[bench]'`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sd15 import CACHE

IR = CACHE / "openvino-sd15"
HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "bf16"}
CALIBRATION_PROMPTS = [
    "a photograph of an astronaut riding a horse on the moon",
    "a watercolor painting of a lighthouse at dusk",
    "a close-up portrait of an old fisherman, studio lighting",
    "a bowl of ripe fruit on a wooden table",
]


def version() -> str | None:
    """OpenVINO's version when it imports (the `bench` extra), else None."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino.get_version()


def nncf_version() -> str | None:
    try:
        import nncf
    except ImportError:
        return None
    return nncf.__version__


class _UNetStep(torch.nn.Module):
    """diffusers' UNet with plain tensor inputs and output, which the converter traces."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=c, return_dict=False)[0]


class _VAEDecode(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z, return_dict=False)[0]


def _save(model, path: Path) -> None:
    """IR written under temporary names and renamed, the .xml last: a present .xml is a whole model."""
    import openvino as ov

    partial = path.with_name(path.stem + ".partial.xml")
    ov.save_model(model, partial, compress_to_fp16=False)
    partial.with_suffix(".bin").rename(path.with_suffix(".bin"))
    partial.rename(path)


def int8_name(calibration: int) -> str:
    return f"unet-int8-calib{calibration}.xml"


def export(folder: Path, calibration: int = 8) -> Path:
    """The IR folder, converted from diffusers' modules in `folder` (and quantized) where missing."""
    IR.mkdir(parents=True, exist_ok=True)
    unet_xml, vae_xml, int8_xml = IR / "unet.xml", IR / "vae_decoder.xml", IR / int8_name(calibration)
    if not vae_xml.is_file():
        _convert_vae(folder, vae_xml)
    if not unet_xml.is_file():
        _convert_unet(folder, unet_xml)
    if calibration and nncf_version() and not int8_xml.is_file():
        _quantize_unet(folder, unet_xml, int8_xml, calibration)
    return IR


def _convert_unet(folder: Path, xml: Path) -> None:
    import openvino as ov
    from diffusers import UNet2DConditionModel

    start = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32).eval()
    # Traced at a small size: the inputs' shapes stay dynamic and each process fixes its own.
    example = (torch.randn(2, 4, 32, 32), torch.tensor([500, 500]), torch.randn(2, 77, 768))
    with torch.no_grad():
        model = ov.convert_model(_UNetStep(unet), example_input=example)
    del unet
    _save(model, xml)
    print(f"  OpenVINO UNet converted in {time.perf_counter() - start:.0f} s", file=sys.stderr)


def _convert_vae(folder: Path, xml: Path) -> None:
    import openvino as ov
    from diffusers import AutoencoderKL

    start = time.perf_counter()
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        model = ov.convert_model(_VAEDecode(vae), example_input=(torch.randn(1, 4, 32, 32),))
    del vae
    _save(model, xml)
    print(f"  OpenVINO VAE decoder converted in {time.perf_counter() - start:.0f} s", file=sys.stderr)


def calibration_inputs(folder: Path, count: int, size: int = 512) -> list[dict[str, np.ndarray]]:
    """Guided UNet inputs (batch 2: empty prompt, prompt) as the denoising loop feeds them."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    generator = torch.Generator().manual_seed(2024)
    inputs = []
    with torch.no_grad():
        for i, t in enumerate(np.linspace(999, 1, count).round().astype(np.int64)):
            prompt = CALIBRATION_PROMPTS[i % len(CALIBRATION_PROMPTS)]
            ids = tokenizer(["", prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
            context = encoder(ids)[0]
            latents = torch.randn(2, 4, size // 8, size // 8, generator=generator)
            inputs.append({"x": latents.numpy(), "t": np.array([t, t]), "c": context.numpy()})
    return inputs


def _quantize_unet(folder: Path, unet_xml: Path, int8_xml: Path, calibration: int) -> None:
    import nncf
    import openvino as ov

    start = time.perf_counter()
    data = calibration_inputs(folder, calibration)
    model = ov.Core().read_model(unet_xml)
    quantized = nncf.quantize(model, nncf.Dataset(data), model_type=nncf.ModelType.TRANSFORMER, subset_size=calibration)
    _save(quantized, int8_xml)
    print(f"  OpenVINO int8 UNet quantized by NNCF in {time.perf_counter() - start:.0f} s", file=sys.stderr)


def threads() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Contender:
    """One precision's networks in this process. call(what, size) compiles that network for that shape
    and keeps it beside the other network, as a pipeline holds its UNet and its VAE decoder at once
    (a network compiled again for another size replaces its own earlier compilation)."""

    def __init__(self, dtype_name: str, calibration: int = 8) -> None:
        import openvino as ov

        self.core, self.dtype_name = ov.Core(), dtype_name
        self.unet_xml = IR / (int8_name(calibration) if dtype_name == "int8" else "unet.xml")
        if not self.unet_xml.is_file():
            raise FileNotFoundError(f"{self.unet_xml} is missing: openvino_contender.export() builds it")
        self.config = {
            "INFERENCE_PRECISION_HINT": HINTS[dtype_name],
            "INFERENCE_NUM_THREADS": threads(),
            "PERFORMANCE_HINT": "LATENCY",
        }
        self.compiled: dict[str, tuple[int, object]] = {}  # network -> (size, infer request)

    def settings(self) -> str:
        return f"{self.unet_xml.name}, {self.config}"

    def call(self, what: str, size: int, inputs: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
        """A call of the network at this size on these inputs (float32), returning float32."""
        if self.compiled.get(what, (None,))[0] != size:
            self.compiled.pop(what, None)  # freed before it is compiled again
            names = ["z"] if what == "vae decode" else ["x", "t", "c"]
            model = self.core.read_model(IR / "vae_decoder.xml" if what == "vae decode" else self.unet_xml)
            model.reshape({name: list(tensor.shape) for name, tensor in zip(names, inputs)})
            self.compiled[what] = size, self.core.compile_model(model, "CPU", self.config).create_infer_request()
        request, arrays = self.compiled[what][1], [tensor.numpy() for tensor in inputs]
        return lambda: torch.from_numpy(request.infer(arrays, share_inputs=True)[0].copy())
