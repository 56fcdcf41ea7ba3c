"""What the add-on stages (lora, embedding) share: a frozen base model, its training data and its
diffusion loss, and the add-on file they write.

The base is any model load_pipeline reads (the shipped one by default), in float32 with every
weight frozen; an add-on trains beside it. The stage's run depends on the base's files and on
every image and caption of the data folder: their sha256 goes into each checkpoint, so a run
resumed on other weights or other data is refused (state.check_inputs).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from diffuse.checkpoints.safetensors_header import TORCH_DTYPES
from diffuse.loader import load_pipeline
from diffuse.metadata import atomic_write
from diffuse.pipeline import Pipeline
from diffuse.prompts import TokenVectors, encode_prompts
from diffuse.samplers.schedule import NoiseSchedule
from diffuse.train.captioned_folder import CaptionedFolder
from diffuse.train.loop import BatchRandom, LoopConfig, train
from diffuse.train.objectives import drop_captions, encode_latents, unet_loss
from diffuse.train.unpack import noise_schedule

DEFAULT_MODEL = str(Path(__file__).resolve().parents[3] / "models" / "default")


@dataclass(frozen=True)
class FrozenBase:
    """The base model's networks (float32, no gradients to their weights) and how it was trained."""

    pipe: Pipeline
    schedule: NoiseSchedule
    image_size: int

    @property
    def base_version(self) -> str:
        """sd-scripts' ss_base_model_version for this base."""
        return "sd_v2" if self.pipe.config.pad_token_id == 0 else "sd_v1"


def load_base(model: str | Path, image_size: int | None) -> FrozenBase:
    """The frozen base at `model` and the side its training images get (None: the model's own)."""
    pipe = load_pipeline(model, dtype="float32")
    for network in (pipe.unet, pipe.text_encoder, pipe.vae):
        network.eval().requires_grad_(False)
    size = pipe.config.image_size if image_size is None else image_size
    factor = pipe.config.vae.downsample_factor
    if size < factor or size % factor:
        raise ValueError(f"image_size {size} must be a positive multiple of the autoencoder's {factor}")
    return FrozenBase(pipe, NoiseSchedule(**noise_schedule(pipe)), size)


def model_files(model: str | Path) -> dict[str, Path]:
    """The files of the base model (a single file, or every file of a model folder), by name."""
    path = Path(model)
    if path.is_file():
        return {"model": path}
    return {f"model {p.relative_to(path)}": p for p in sorted(path.rglob("*")) if p.is_file()}


def run_inputs(model: str | Path, data: CaptionedFolder) -> dict[str, Path]:
    """Everything besides the config that decides a run's result: the base's files and the data's."""
    return {**model_files(model), **data.files()}


def train_beside_base(
    config: LoopConfig,
    base: FrozenBase,
    data: CaptionedFolder,
    trained: tuple[str, nn.Module],
    loss_fn: Callable,
    out_dir: Path,
    **loop_options,
) -> None:
    """The training loop for an add-on, `trained` (its name in the checkpoints, the module), on the
    frozen base's networks, which the checkpoints list beside it; `loop_options` are train's
    resume, progress and data_workers."""
    name, module = trained
    pipe = base.pipe
    models = {name: module, "unet": pipe.unet, "text_encoder": pipe.text_encoder, "vae": pipe.vae}
    train(config, models, loss_fn, data.batch, out_dir, inputs=run_inputs(config.model, data), **loop_options)


def diffusion_loss(
    base: FrozenBase,
    denoiser: nn.Module,
    batch: dict,
    random: BatchRandom,
    caption_dropout: float,
    min_snr_gamma: float | None,
    embeddings: Mapping[str, TokenVectors] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The UNet stage's loss (objectives.unet_loss) through `denoiser`, the captions encoded as
    prompts are at generation (diffuse.prompts, with `embeddings`), gradients flowing into the
    context wherever something before it trains. Draws: caption drops, posterior noise,
    timesteps, noise, as the UNet stage draws them."""
    pipe = base.pipe
    captions = drop_captions(batch["captions"], caption_dropout, random)
    context = encode_prompts(pipe.tokenizer, pipe.text_encoder, captions, embeddings=embeddings)
    latents = encode_latents(pipe.vae, batch["images"], random, pipe.config.vae.scaling_factor)
    loss, logs = unet_loss(denoiser, context, latents, base.schedule, random, min_snr_gamma)
    logs["captions_dropped"] = sum(caption == "" for caption in captions) / len(captions)
    return loss, logs


_DTYPES = {TORCH_DTYPES[name]: name for name in ("F32", "F16", "BF16")}  # the ones trained add-ons hold


def write_safetensors(path: str | Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> Path:
    """A .safetensors file with its keys and metadata in sorted order, so the same tensors always
    make the same bytes (the safetensors writer orders the metadata differently from run to run)."""
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"{name}: cannot write a {tensor.dtype} tensor")
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {
            "dtype": _DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the tensors' data starts 8-byte aligned
    payload = struct.pack("<Q", len(text)) + text + b"".join(blobs)
    return atomic_write(Path(path), lambda f: f.write(payload))
