"""Stage 1: the autoencoder, trained on the world's images alone (no captions).

Each step reconstructs a batch of images through a posterior sample (diffuse.train.objectives.
vae_loss). When training ends, the scaling factor that brings the latents to unit variance
is measured on the trained encoder (as SD measured 0.18215) and stored in the finished
VAE's config, where the UNet stage reads it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from diffuse.models.configs import VAEConfig
from diffuse.models.vae import AutoencoderKL
from diffuse.train.components import is_main_process, save_final, stage_inputs, starting_weights
from diffuse.train.loop import BatchRandom, LoopConfig, train
from diffuse.train.objectives import DEFAULT_KL_WEIGHT, scaling_factor_for, vae_loss
from diffuse.train.presets import TINY_VAE
from diffuse.train.worlds import DEFAULT_DATA, Dataset, WorldData, data_inputs, make_dataset


@dataclass(frozen=True)
class VAETrainConfig(LoopConfig):
    vae: VAEConfig = TINY_VAE
    data: WorldData = DEFAULT_DATA  # which world and how (diffuse.train.worlds); the shapes by default
    kl_weight: float = DEFAULT_KL_WEIGHT
    l1_weight: float = 1.0  # reconstruction terms; see diffuse.train.objectives.vae_loss for why both exist
    l2_weight: float = 0.0
    object_weight: float = 0.0  # extra weight on pixels on and near objects (see vae_loss)
    initial_logvar: float = 0.0  # the posterior's log-variance at step 0 (see build_models)
    scaling_samples: int = 256  # images the finished encoder's latent std is measured on
    # A finished VAE stage's folder to start from instead of random weights (its scaling
    # factor is measured again at the end). None: from scratch.
    init_from: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        f = self.vae.downsample_factor
        if self.data.image_size % f:
            raise ValueError(
                f"data.image_size {self.data.image_size} is not a multiple of the VAE's downsampling factor {f}"
            )
        if min(self.kl_weight, self.l1_weight, self.l2_weight, self.object_weight) < 0:
            raise ValueError(
                f"kl_weight, l1_weight, l2_weight and object_weight must not be negative, not "
                f"{self.kl_weight}, {self.l1_weight}, {self.l2_weight}, {self.object_weight}"
            )
        if self.l1_weight == 0 and self.l2_weight == 0:
            raise ValueError("l1_weight and l2_weight are both 0: nothing would teach the autoencoder to reconstruct")
        if self.scaling_samples < 2:
            raise ValueError(f"scaling_samples must be at least 2 (a std needs two values), not {self.scaling_samples}")


def build_models(config: VAETrainConfig) -> dict[str, nn.Module]:
    torch.manual_seed(config.seed)  # the same starting weights for every run of this config
    vae = AutoencoderKL(config.vae)
    if config.init_from is not None:
        start, _ = starting_weights(config.init_from, "vae", config.vae, measured=("scaling_factor",))
        vae.load_state_dict(start.state_dict())
        return {"vae": vae}
    # A fresh encoder's log-variance is about 0: its samples carry noise of std 1 on latents of
    # similar size, so the decoder first learns to ignore the latent and paint the average
    # image. Starting the log-variance low (e.g. -8, std 0.02) lets the decoder read the latent
    # from the first step; with so small a KL weight the posterior would shrink there anyway.
    with torch.no_grad():
        vae.quant_conv.bias[config.vae.latent_channels :] += config.initial_logvar
    return {"vae": vae}


def make_batch(dataset: Dataset, start: int, count: int) -> Tensor:
    images, _, _ = dataset.batch(start, count)
    return images


def loss_fn(
    config: VAETrainConfig, models: dict[str, nn.Module], images: Tensor, random: BatchRandom
) -> tuple[Tensor, dict[str, float]]:
    return vae_loss(
        models["vae"], images, random, config.kl_weight, config.l1_weight, config.l2_weight, config.object_weight
    )


@torch.no_grad()
def measure_scaling_factor(vae: AutoencoderKL, dataset: Dataset, samples: int, seed: int, chunk: int = 32) -> float:
    """1 / std of posterior samples of the first `samples` images: SD's scale_by_std, on a fixed set."""
    device = next(vae.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    latents = []
    for start in range(0, samples, chunk):
        images, _, _ = dataset.batch(start, min(chunk, samples - start))
        latents.append(vae.encode(images.to(device)).sample(generator).cpu())
    return scaling_factor_for(torch.cat(latents))


def train_vae(
    config: VAETrainConfig, out_dir: str | Path, *, resume: bool = True, progress: bool = True, data_workers: int = 0
) -> list[float]:
    """Train the autoencoder in `out_dir`, then write final.safetensors / final.json there; returns every step's loss."""
    models = build_models(config)
    dataset = make_dataset(config.data)
    inputs = data_inputs(config.data)
    if config.init_from is not None:
        inputs.update(stage_inputs("init_from", config.init_from, "vae"))
    losses = train(
        config,
        models,
        partial(loss_fn, config),
        partial(make_batch, dataset),
        out_dir,
        resume=resume,
        progress=progress,
        data_workers=data_workers,
        inputs=inputs,
    )
    if is_main_process():
        vae = models["vae"].eval()
        factor = measure_scaling_factor(vae, dataset, config.scaling_samples, config.seed)
        save_final(
            out_dir,
            "vae",
            vae,
            dataclasses.replace(config.vae, scaling_factor=factor),
            config,
            extra={"image_size": config.data.image_size},
        )
    return losses
