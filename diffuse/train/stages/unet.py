"""Stage 3: the noise predictor, conditioned on the two finished stages, both frozen.

Each step, as latent diffusion trains:
  1. a caption is replaced by "" with probability caption_dropout (what classifier-free
     guidance later steers away from), then tokenized;
  2. the frozen text encoder turns the ids into its final hidden states, the UNet's context
     (the per-token states SD conditions on, not CLIP's pooled embedding);
  3. the frozen autoencoder encodes the image to a posterior sample, times its measured
     scaling factor (unit-variance latents);
  4. the latent is noised to a random timestep and the UNet predicts the noise (unet_loss).
Every draw (drops, posterior noise, timesteps, noise) comes from the loop's BatchRandom, in
that order, so a resumed or data-parallel run draws what a single uninterrupted one does.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from diffuse.models.configs import UNetConfig
from diffuse.models.unet import UNet
from diffuse.samplers.schedule import NoiseSchedule
from diffuse.tokenizer import CLIPTokenizer
from diffuse.train.components import (
    is_main_process,
    load_final,
    save_final,
    stage_inputs,
    starting_weights,
    weights_sha256,
)
from diffuse.train.loop import BatchRandom, LoopConfig, train
from diffuse.train.objectives import drop_captions, encode_latents, unet_loss
from diffuse.train.presets import TINY_UNET
from diffuse.train.worlds import DEFAULT_DATA, Dataset, WorldData, data_inputs, make_dataset


@dataclass(frozen=True)
class UNetTrainConfig(LoopConfig):
    unet: UNetConfig = TINY_UNET
    vae_dir: str = "runs/vae"  # a finished VAE stage's folder (its final.safetensors / final.json)
    text_encoder_dir: str = "runs/clip"  # a finished CLIP stage's folder
    data: WorldData = DEFAULT_DATA  # which world and how (diffuse.train.worlds); the shapes by default
    caption_dropout: float = 0.1  # SD's rate of empty prompts
    min_snr_gamma: float | None = None  # Min-SNR loss weighting (see objectives.unet_loss); None: SD's plain MSE
    schedule: NoiseSchedule = NoiseSchedule()
    # A finished UNet stage's folder (e.g. one diffuse.train.unpack wrote) to start from instead
    # of random weights. None: from scratch.
    init_from: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], not {self.caption_dropout}")
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be positive or null, not {self.min_snr_gamma}")


@dataclass(frozen=True)
class Conditioning:
    """The frozen stages the UNet learns to work with, and how to use them."""

    vae: nn.Module
    scaling_factor: float
    text_encoder: nn.Module
    tokenizer: CLIPTokenizer
    fingerprints: dict[str, str]  # sha256 of each stage's weights file, recorded with the UNet for assembly to check


def load_conditioning(config: UNetTrainConfig) -> Conditioning:
    """The finished VAE and text encoder, checked to fit the UNet and the images."""
    vae, vae_config, _ = load_final(config.vae_dir, "vae")
    text_encoder, text_config, text_extra = load_final(config.text_encoder_dir, "text_encoder")
    if config.unet.in_channels != vae_config.latent_channels or config.unet.out_channels != vae_config.latent_channels:
        raise ValueError(
            f"the UNet's in/out channels ({config.unet.in_channels}, {config.unet.out_channels}) must "
            f"be the VAE's {vae_config.latent_channels} latent channels ({config.vae_dir})"
        )
    if config.unet.context_dim != text_config.width:
        raise ValueError(
            f"unet.context_dim {config.unet.context_dim} must be the text encoder's width "
            f"{text_config.width} ({config.text_encoder_dir})"
        )
    if config.data.image_size % vae_config.downsample_factor:
        raise ValueError(
            f"data.image_size {config.data.image_size} is not a multiple of the VAE's "
            f"downsampling factor {vae_config.downsample_factor}"
        )
    tokenizer = CLIPTokenizer.from_bpe_gz(pad_token_id=text_extra["pad_token_id"])
    fingerprints = {
        "vae_sha256": weights_sha256(config.vae_dir, "vae"),
        "text_encoder_sha256": weights_sha256(config.text_encoder_dir, "text_encoder"),
    }
    return Conditioning(vae, vae_config.scaling_factor, text_encoder, tokenizer, fingerprints)


def unet_inputs(config: UNetTrainConfig) -> dict[str, Path]:
    """The files this stage reads besides its config: the frozen VAE and text encoder, init_from, the world's data."""
    inputs = {
        **stage_inputs("vae_dir", config.vae_dir, "vae"),
        **stage_inputs("text_encoder_dir", config.text_encoder_dir, "text_encoder"),
        **data_inputs(config.data),
    }
    if config.init_from is not None:
        inputs.update(stage_inputs("init_from", config.init_from, "unet"))
    return inputs


def build_models(config: UNetTrainConfig, conditioning: Conditioning) -> dict[str, nn.Module]:
    torch.manual_seed(config.seed)  # the same starting weights for every run of this config
    unet = UNet(config.unet)
    if config.init_from is not None:
        unet.load_state_dict(starting_weights(config.init_from, "unet", config.unet)[0].state_dict())
    # The loop trains only models with trainable parameters; these two pass through as they are.
    return {"unet": unet, "vae": conditioning.vae, "text_encoder": conditioning.text_encoder}


def make_batch(dataset: Dataset, start: int, count: int) -> dict:
    # Captions stay text here: dropping them needs the step's random draws, which loss_fn holds.
    images, captions, _ = dataset.batch(start, count)
    return {"images": images, "captions": captions}


def loss_fn(
    config: UNetTrainConfig, conditioning: Conditioning, models: dict[str, nn.Module], batch: dict, random: BatchRandom
) -> tuple[Tensor, dict[str, float]]:
    images = batch["images"]
    captions = drop_captions(batch["captions"], config.caption_dropout, random)
    ids = conditioning.tokenizer(captions).to(images.device)
    with torch.no_grad():
        context = models["text_encoder"](ids)
    latents = encode_latents(models["vae"], images, random, conditioning.scaling_factor)
    loss, logs = unet_loss(models["unet"], context, latents, config.schedule, random, config.min_snr_gamma)
    logs["captions_dropped"] = sum(caption == "" for caption in captions) / len(captions)
    return loss, logs


def train_unet(
    config: UNetTrainConfig, out_dir: str | Path, *, resume: bool = True, progress: bool = True, data_workers: int = 0
) -> list[float]:
    """Train the UNet in `out_dir` on the frozen stages, then write final.safetensors / final.json; returns every loss."""
    conditioning = load_conditioning(config)
    models = build_models(config, conditioning)
    dataset = make_dataset(config.data)
    losses = train(
        config,
        models,
        partial(loss_fn, config, conditioning),
        partial(make_batch, dataset),
        out_dir,
        resume=resume,
        progress=progress,
        data_workers=data_workers,
        inputs=unet_inputs(config),
    )
    if is_main_process():
        save_final(
            out_dir,
            "unet",
            models["unet"].eval(),
            config.unet,
            config,
            extra={
                "prediction_type": config.schedule.prediction_type,
                "sample_size": config.data.image_size // conditioning.vae.cfg.downsample_factor,
                "vae_dir": config.vae_dir,
                "text_encoder_dir": config.text_encoder_dir,
                **conditioning.fingerprints,
            },
        )
    return losses
