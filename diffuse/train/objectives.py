"""The three training losses, one plain function each: no loops, no optimizers.

Each returns (loss, logs): the batch's mean loss as a scalar tensor to backpropagate,
and a dict of floats to print.

    vae_loss   the autoencoder: reconstruct images through a sampled latent, KL to N(0, I)
    clip_loss  the text encoder: captions and images pulled together in a joint space
    unet_loss  the noise predictor: noise a latent to a random step, predict that noise

plus the glue the training of each stage needs: `encode_latents` (images -> the
UNet's latents), `scaling_factor_for` (how SD picked 0.18215) and `drop_captions`
(the empty prompts that classifier-free guidance is later steered against).

Randomness. Every draw comes from the `random` passed in, in a documented order:
either a CPU `torch.Generator` (the whole batch is drawn from it) or a per-sample
source such as diffuse.train.loop.BatchRandom, which draws for the global batch
and hands this process its rows, so 2 processes with B/2 each draw exactly what
1 process with B draws. For one process with the whole batch, both give the same
numbers from the same generator state. Either way, a run resumed with the saved
generator state computes exactly the losses an uninterrupted run would have.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffuse.models.clip import CLIPTextEncoder
from diffuse.models.unet import UNet
from diffuse.models.vae import AutoencoderKL
from diffuse.samplers.schedule import NoiseSchedule, prediction_target
from diffuse.shapes.image_encoder import ImageEncoder, LogitScale, TextProjection

# SD's kl-f8 autoencoder weight. With reconstruction and KL both summed per image
# (as SD sums them), the balance depends only on the pixels-per-latent ratio, which
# f=8 and 3 -> 4 channels fix at 48 whatever the image size: 64x64 keeps SD's trade-off.
# So weak a KL barely regularises: latents stay sharp (what flat shapes need) and
# come out with a std far from 1, which scaling_factor_for then measures.
DEFAULT_KL_WEIGHT = 1e-6


class SampleRandom(Protocol):
    """Per-sample draws for the rows of the batch this process holds: [rows, *sample_shape]."""

    def randn(self, *sample_shape: int) -> Tensor: ...

    def rand(self, *sample_shape: int) -> Tensor: ...

    def randint(self, low: int, high: int, *sample_shape: int) -> Tensor: ...


@dataclass(frozen=True)
class WholeBatch:
    """A plain generator as a SampleRandom: every row of the batch is drawn here, in one draw."""

    generator: torch.Generator
    rows: int

    def randn(self, *sample_shape: int) -> Tensor:
        return torch.randn((self.rows, *sample_shape), generator=self.generator, device=self.generator.device)

    def rand(self, *sample_shape: int) -> Tensor:
        return torch.rand((self.rows, *sample_shape), generator=self.generator, device=self.generator.device)

    def randint(self, low: int, high: int, *sample_shape: int) -> Tensor:
        return torch.randint(
            low, high, (self.rows, *sample_shape), generator=self.generator, device=self.generator.device
        )


Random = torch.Generator | SampleRandom


def per_sample(random: Random, rows: int) -> SampleRandom:
    return WholeBatch(random, rows) if isinstance(random, torch.Generator) else random


def _checked(draw: Tensor, shape: tuple[int, ...], what: str) -> Tensor:
    # A per-sample source built for another batch size would otherwise broadcast silently.
    if tuple(draw.shape) != tuple(shape):
        raise ValueError(
            f"the random source gave {what} of shape {tuple(draw.shape)} for a batch needing {tuple(shape)}"
        )
    return draw


# ---------------------------------------------------------------- the autoencoder


OBJECT_THRESHOLD = 0.1  # in [-1, 1] units: a pixel this far from the background colour belongs to an object
OBJECT_MARGIN = 2  # pixels around an object that count as its own: its edge is where the shape is told apart


def object_pixels(images: Tensor) -> Tensor:
    """[B, 1, H, W] mask of the pixels on or near an object: those differing from the image's
    background colour (the median of its top two rows, which every scene keeps clear) by more
    than OBJECT_THRESHOLD in some channel, widened by OBJECT_MARGIN pixels."""
    background = images[:, :, :2, :].flatten(2).median(dim=2).values[:, :, None, None]
    on_object = ((images - background).abs().amax(dim=1, keepdim=True) > OBJECT_THRESHOLD).to(images.dtype)
    return F.max_pool2d(on_object, 2 * OBJECT_MARGIN + 1, stride=1, padding=OBJECT_MARGIN)


def vae_loss(
    vae: AutoencoderKL,
    images: Tensor,
    random: Random,
    kl_weight: float = DEFAULT_KL_WEIGHT,
    l1_weight: float = 1.0,
    l2_weight: float = 0.0,
    object_weight: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """Reconstruction of a posterior sample (l1_weight x L1 + l2_weight x squared error) plus
    kl_weight x KL(posterior || N(0, I)), all summed per image.

    L1 is what SD's autoencoder uses: on flat colour regions with hard edges it drives
    colours to exact values (its gradient does not fade near zero error as L2's does).
    But its gradient is the same +-1 for a pixel that is a little off as for a pixel of
    a missing object, so while the background fills most of the image, the background's
    small errors outvote the objects and the decoder learns an empty canvas first. The
    squared error pulls on a pixel in proportion to how wrong it is: with it the shapes
    (a few percent of the pixels here) form within a few hundred steps instead of
    staying blank (measured; see the default model's card).
    Left out of SD's recipe: the LPIPS perceptual term (it needs a pretrained VGG,
    which training from scratch cannot use) and the patch-GAN discriminator (SD
    switches it on only after 50k steps, far beyond a CPU budget). SD's learned
    output log-variance is left out too: its training code never gives it to the
    optimizer, so it stays 0 and changes nothing.

    The one draw is the posterior sample's noise, shaped like the latents (from a
    generator, the same numbers DiagonalGaussian.sample would take). It is drawn here
    and handed to the autoencoder's forward (the call a data-parallel wrapper needs),
    so with a BatchRandom a 2-process run samples exactly what a 1-process run does.
    """
    if min(kl_weight, l1_weight, l2_weight, object_weight) < 0:
        raise ValueError(
            f"kl_weight, l1_weight, l2_weight and object_weight must be >= 0, got {kl_weight}, "
            f"{l1_weight}, {l2_weight}, {object_weight}"
        )
    cfg = _unwrapped(vae).cfg
    f = cfg.downsample_factor
    latent_shape = (len(images), cfg.latent_channels, images.shape[2] // f, images.shape[3] // f)
    noise = _checked(per_sample(random, len(images)).randn(*latent_shape[1:]), latent_shape, "noise")
    reconstruction, posterior = vae(images, sample=True, noise=noise.to(images.device))
    abs_error = (reconstruction - images).abs()
    per_pixel = l1_weight * abs_error + l2_weight * abs_error.square()
    if object_weight:
        per_pixel = per_pixel * (1 + object_weight * object_pixels(images))
    rec = per_pixel.sum(dim=[1, 2, 3]).mean()  # per-image sum, batch mean: SD's scale, so kl_weight keeps its meaning
    kl = posterior.kl().mean()
    loss = rec + kl_weight * kl
    with torch.no_grad():
        logs = {
            "loss": loss.item(),
            "rec_l1": abs_error.mean().item(),  # per pixel value, in [-1, 1] units
            "rec_mse": abs_error.square().mean().item(),
            "kl": kl.item(),
            "latent_std": posterior.mean.std().item(),
        }
    return loss, logs


def encode_latents(vae: AutoencoderKL, images: Tensor, random: Random, scaling_factor: float) -> Tensor:
    """Images -> the latents the UNet trains on: a posterior sample times the scaling factor.

    A sample rather than the mean, as latent diffusion trains: the UNet then learns
    the whole small cloud each image maps to, not one point of it. One draw (the
    sample's noise; from a generator, the same numbers DiagonalGaussian.sample takes).
    No gradient: the autoencoder is frozen by the time the UNet trains.
    """
    with torch.no_grad():
        posterior = vae.encode(images)
        noise = _checked(
            per_sample(random, len(images)).randn(*posterior.mean.shape[1:]), posterior.mean.shape, "noise"
        )
        return posterior.sample(noise=noise) * scaling_factor


def scaling_factor_for(latents: Tensor) -> float:
    """1 / std of a batch of raw latents: what makes the UNet's latents unit-variance.

    This is how SD arrived at 0.18215 (its `scale_by_std`: 1 / std of the first
    batch's latents, all elements together), measured once after the autoencoder
    is trained and then fixed in the model's config.
    """
    std = latents.detach().float().flatten().std().item()
    if not (math.isfinite(std) and std > 0):
        raise ValueError(f"latents have std {std}; a scaling factor needs a finite, positive spread")
    return 1.0 / std


# ---------------------------------------------------------------- the text encoder


def contrastive_loss(
    image_embeds: Tensor,
    text_embeds: Tensor,
    scale: Tensor,
    ids: Tensor,
    negative_embeds: Tensor | None = None,
    has_negative: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Symmetric InfoNCE: each image must pick its caption among the batch's, and each caption its image.

    Logits are cosine similarities times `scale` (LogitScale's output). Split from
    clip_loss so a multi-process run can gather every process's embeddings and ids
    first and compute the loss over the global batch, as CLIP does.

    A procedural dataset repeats captions within a batch. The loss needs no special
    case for that: copies of a caption have identical text embeddings, so an image
    gives them equal probability and the loss is the same as if every copy were
    counted a match; it only cannot fall below log(copies). The accuracies do count
    a copy of the right caption (rows of identical `ids`) as right.

    `negative_embeds` [B, D] (row i: a wrong caption made from caption i's words, where
    `has_negative` [B] says there is one) join the captions every image chooses among, as
    hard negatives; captions still choose only among the images. "acc_vs_negative" logs
    how often an image scores its own caption above its own negative.
    """
    if image_embeds.shape != text_embeds.shape or image_embeds.ndim != 2:
        raise ValueError(
            f"image and text embeddings must both be [B, D], got {tuple(image_embeds.shape)} "
            f"and {tuple(text_embeds.shape)}"
        )
    if ids.shape[0] != image_embeds.shape[0]:
        raise ValueError(f"{ids.shape[0]} caption id rows for {image_embeds.shape[0]} embeddings")
    image_embeds = F.normalize(image_embeds.float(), dim=-1)
    text_embeds = F.normalize(text_embeds.float(), dim=-1)
    logits_per_image = scale.float() * image_embeds @ text_embeds.T  # [images, captions]
    labels = torch.arange(len(ids), device=logits_per_image.device)  # image i belongs with caption i
    image_choices, negative_logits = logits_per_image, None
    if negative_embeds is not None:
        if negative_embeds.shape != text_embeds.shape or has_negative is None or has_negative.shape != labels.shape:
            raise ValueError("hard negatives need one [D] row per caption and a has_negative flag per row")
        negative_embeds = F.normalize(negative_embeds.float(), dim=-1)
        negative_logits = scale.float() * image_embeds @ negative_embeds.T  # [images, negatives]
        negative_logits = negative_logits.masked_fill(~has_negative.to(negative_logits.device)[None, :], -torch.inf)
        image_choices = torch.cat([logits_per_image, negative_logits], dim=1)
    loss = (F.cross_entropy(image_choices, labels) + F.cross_entropy(logits_per_image.T, labels)) / 2
    return loss, _contrastive_logs(loss, logits_per_image, scale, ids, negative_logits, has_negative)


@torch.no_grad()
def _contrastive_logs(
    loss: Tensor,
    logits_per_image: Tensor,
    scale: Tensor,
    ids: Tensor,
    negative_logits: Tensor | None = None,
    has_negative: Tensor | None = None,
) -> dict[str, float]:
    """Retrieval accuracies both ways, counting a copy of the right caption (identical ids) as right,
    and with hard negatives how often an image ranks its own caption above its negative."""
    labels = torch.arange(len(ids), device=logits_per_image.device)
    matches = (ids[:, None, :] == ids[None, :, :]).all(dim=-1).to(labels.device)  # same caption, token for token
    logs = {
        "loss": loss.item(),
        "acc_image_to_text": matches[labels, logits_per_image.argmax(dim=1)].float().mean().item(),
        "acc_text_to_image": matches[labels, logits_per_image.argmax(dim=0)].float().mean().item(),
        "logit_scale": scale.item(),
        "duplicate_caption_pairs": (matches.sum().item() - len(ids)) / 2,
    }
    if negative_logits is not None and has_negative.any():
        own, against = logits_per_image.diagonal(), negative_logits.diagonal()
        rows = has_negative.to(own.device)
        logs["acc_vs_negative"] = (own[rows] > against[rows]).float().mean().item()
    return logs


def clip_loss(
    text_encoder: CLIPTextEncoder,
    text_projection: TextProjection,
    image_encoder: ImageEncoder,
    logit_scale: LogitScale,
    ids: Tensor,
    images: Tensor,
    eos_token_id: int = 49407,
) -> tuple[Tensor, dict[str, float]]:
    """CLIP's objective on one batch of (caption ids [B, T], images [B, 3, H, W]); no randomness.

    The text side is read where CLIP reads it: the final-layer-normed hidden state
    at the first end-of-text token, projected into the joint space. Each module is
    called once, through its forward, as a data-parallel wrapper requires.
    """
    if ids.shape[0] != images.shape[0]:
        raise ValueError(f"{ids.shape[0]} captions for {images.shape[0]} images")
    hidden = text_encoder(ids)
    # Picking the end-of-text state uses no weights: call it on the encoder itself, not
    # on a data-parallel wrapper, which does not pass methods through.
    pooled = _unwrapped(text_encoder).pooled(hidden, ids, eos_token_id)
    return contrastive_loss(image_encoder(images), text_projection(pooled), logit_scale(), ids)


def _unwrapped(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)


def drop_captions(captions: Sequence[str], p: float, random: Random) -> list[str]:
    """Replace each caption by "" with probability p (one uniform draw per caption, all drawn).

    Training on some empty prompts is what gives classifier-free guidance its
    unconditional prediction to steer away from. One draw per caption whatever p
    is, so the generator advances the same way at every p.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"caption drop probability must be in [0, 1], got {p}")
    draws = _checked(per_sample(random, len(captions)).rand(), (len(captions),), "caption draws")
    return ["" if drop else caption for caption, drop in zip(captions, (draws < p).tolist())]


# ---------------------------------------------------------------- the noise predictor


def unet_loss(
    unet: UNet,
    context: Tensor,
    latents: Tensor,
    schedule: NoiseSchedule,
    random: Random,
    min_snr_gamma: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Forward diffusion, then denoising: MSE between the UNet's prediction and its target.

    Draws, in this order: a timestep per latent, uniform in [0, T), then noise eps
    shaped like the latents. The latent is cut to the noise slice of its step,

        x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,

    and the UNet, told t and the text context, predicts eps (or, for a v-prediction
    schedule, v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0). `latents` are already
    scaled by the autoencoder's scaling factor (see encode_latents).

    With `min_snr_gamma` each sample's squared error is weighted by the Min-SNR rule
    (Hang et al., 2023): min(SNR_t, gamma) / SNR_t for epsilon targets and
    min(SNR_t, gamma) / (SNR_t + 1) for v, where SNR_t = abar_t / (1 - abar_t). The
    nearly clean steps, where predicting the noise is easy and its gradients large,
    stop crowding out the noisy ones that decide layout and colour; the paper measures
    several times faster convergence, which a CPU budget needs. None: SD's plain mean.
    """
    if latents.ndim != 4:
        raise ValueError(f"latents must be [B, C, h, w], got {tuple(latents.shape)}")
    if context.shape[0] != latents.shape[0]:
        raise ValueError(f"{context.shape[0]} text contexts for {latents.shape[0]} latents")
    batch = latents.shape[0]
    draws = per_sample(random, batch)
    timesteps = _checked(draws.randint(0, schedule.num_train_timesteps), (batch,), "timesteps").to(latents.device)
    noise = _checked(draws.randn(*latents.shape[1:]), latents.shape, "noise").to(latents.device, torch.float32)

    abar = schedule.alphas_cumprod().to(latents.device)[timesteps].view(batch, 1, 1, 1)
    x0 = latents.float()
    noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    target = prediction_target(x0, noise, abar.sqrt(), (1 - abar).sqrt(), schedule.prediction_type)

    dtype = next(unet.parameters()).dtype
    prediction = unet(noisy.to(dtype), timesteps, context.to(dtype)).float()
    if min_snr_gamma is None:
        loss = F.mse_loss(prediction, target)
    else:
        loss = _min_snr_loss(prediction, target, abar.flatten(), min_snr_gamma, schedule.prediction_type)
    with torch.no_grad():
        logs = {"loss": loss.item(), "mean_timestep": timesteps.float().mean().item()}
    return loss, logs


def _min_snr_loss(prediction: Tensor, target: Tensor, abar: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """The batch mean of each latent's squared error weighted by the Min-SNR rule (see unet_loss)."""
    if not gamma > 0:
        raise ValueError(f"min_snr_gamma must be positive, got {gamma}")
    snr = abar / (1 - abar)
    weight = snr.clamp(max=gamma) / (snr if prediction_type == "epsilon" else snr + 1)
    per_latent = (prediction - target).square().mean(dim=[1, 2, 3])
    return (weight * per_latent).mean()
