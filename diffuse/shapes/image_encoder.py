"""CLIP's other half, small: an image tower to train our text encoder against.

Stable Diffusion never runs an image encoder. It needs one only because its text
encoder was trained by CLIP: captions and images are embedded into one joint space
and pulled together when they belong to each other (diffuse.train.objectives.clip_loss).
To train our own text encoder from scratch we rebuild that arrangement:

    ids    -> CLIPTextEncoder -> pooled end-of-text state -> TextProjection -> text embedding
    images -> ImageEncoder                                                   -> image embedding

and generate with the text encoder alone. The image side (ImageTower) is kept only to
score that text encoder later (caption retrieval); generation never runs it.

Why a small conv net rather than a ViT: the training images are 64x64 flat-colour
shapes, and everything a caption says about them (colour, shape, where) is local
and translation-equivariant, which convolutions know from the start and a ViT
has to learn from data we have little CPU time to show it (the side-by-side run is
in bench/RESULTS.md). The head flattens the final 4x4 grid instead of averaging it,
so the embedding still knows WHERE each thing is ("on the left", "above").
Normalisation is GroupNorm, not BatchNorm: a batch-statistics layer would make an
image's embedding depend on its batch-mates, which the contrastive loss already
compares it to, and would make 2-process training differ from 1-process training
on the same global batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# CLIP's temperature: logits are cos-similarities times exp(logit_scale), starting at
# 1/0.07 and never allowed above 100, which would make the softmax too peaked to train.
LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)


@dataclass(frozen=True)
class ImageEncoderConfig:
    """A conv net: a stem at full resolution, then stages that each halve the side."""

    image_size: int = 64
    in_channels: int = 3
    stage_channels: tuple[int, ...] = (32, 64, 128, 128)  # 64 -> 32 -> 16 -> 8 -> 4
    blocks_per_stage: int = 1
    norm_groups: int = 8
    embed_dim: int = 128  # the joint text-image embedding size

    @property
    def grid_size(self) -> int:
        """Side of the final feature map, whose cells the head keeps apart."""
        return self.image_size // 2 ** len(self.stage_channels)

    def __post_init__(self):
        if not self.stage_channels:
            raise ValueError("ImageEncoderConfig.stage_channels needs at least one stage")
        if self.image_size % 2 ** len(self.stage_channels):
            raise ValueError(
                f"image_size {self.image_size} is not divisible by 2**{len(self.stage_channels)} "
                f"(one halving per stage of {self.stage_channels})"
            )
        bad = [c for c in self.stage_channels if c % self.norm_groups]
        if bad:
            raise ValueError(f"stage channels {bad} are not divisible by norm_groups {self.norm_groups}")


class ResidualBlock(nn.Module):
    """Two norm-SiLU-conv3x3 steps plus the input: the VAE's ResnetBlock without a channel change."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class Stage(nn.Module):
    """A stride-2 conv that halves the side and sets the width, then residual blocks at that size."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, groups: int):
        super().__init__()
        self.downsample = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.blocks = nn.ModuleList(ResidualBlock(out_channels, groups) for _ in range(num_blocks))

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        for block in self.blocks:
            x = block(x)
        return x


class ImageEncoder(nn.Module):
    """images [B, 3, H, W] in [-1, 1] -> embeddings [B, embed_dim] (not normalised; the loss does that)."""

    def __init__(self, cfg: ImageEncoderConfig):
        super().__init__()
        self.cfg = cfg
        widths = cfg.stage_channels
        self.stem = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        in_widths = (widths[0], *widths[:-1])
        self.stages = nn.ModuleList(
            Stage(a, b, cfg.blocks_per_stage, cfg.norm_groups) for a, b in zip(in_widths, widths)
        )
        self.norm_out = nn.GroupNorm(cfg.norm_groups, widths[-1])
        # Flattening (not pooling) the grid gives every cell its own weights in the
        # projection: position survives into the embedding.
        features = widths[-1] * cfg.grid_size**2
        self.final_layer_norm = nn.LayerNorm(features)
        self.projection = nn.Linear(features, cfg.embed_dim, bias=False)

    def forward(self, images: Tensor) -> Tensor:
        size = self.cfg.image_size
        if images.ndim != 4 or images.shape[1:] != (self.cfg.in_channels, size, size):
            raise ValueError(
                f"ImageEncoder expects images [B, {self.cfg.in_channels}, {size}, {size}], got {tuple(images.shape)}"
            )
        x = self.stem(images)
        for stage in self.stages:
            x = stage(x)
        x = F.silu(self.norm_out(x)).flatten(1)
        return self.projection(self.final_layer_norm(x))


class TextProjection(nn.Module):
    """The text side's head: the pooled end-of-text state [B, width] -> the joint space [B, embed_dim].

    Bias-free, as CLIP's: only directions matter once the loss normalises embeddings.
    The pooled state comes from CLIPTextEncoder.pooled, which reads the first
    end-of-text token, the one position that has seen the whole caption.
    """

    def __init__(self, width: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(width, embed_dim, bias=False)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.proj(pooled)


class LogitScale(nn.Module):
    """CLIP's learned temperature: forward() -> the factor cosine similarities are multiplied by.

    Kept as a log so it stays positive, starting at log(1/0.07), and clamped at log(100)
    where it is used, so the parameter itself is never edited. A module rather than a
    bare parameter so a trainer optimises, checkpoints and (across processes)
    synchronises it like every other piece.
    """

    def __init__(self, initial: float = LOGIT_SCALE_INIT):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(float(initial)))

    def forward(self) -> Tensor:
        return self.log_scale.clamp(max=LOGIT_SCALE_MAX).exp()


@dataclass(frozen=True)
class ImageTowerConfig:
    """The image side CLIP training leaves beside its text encoder: the image encoder, and the
    width of the text encoder whose pooled state the text projection reads."""

    image_encoder: ImageEncoderConfig = ImageEncoderConfig()
    text_width: int = 128


class ImageTower(nn.Module):
    """Image encoder + text projection + temperature: what it takes, with the trained text
    encoder, to put an image and a caption into the joint space and compare them.

    Kept after training to score the text encoder (caption retrieval), never for generation.
    """

    def __init__(self, cfg: ImageTowerConfig):
        super().__init__()
        self.cfg = cfg
        self.image_encoder = ImageEncoder(cfg.image_encoder)
        self.text_projection = TextProjection(cfg.text_width, cfg.image_encoder.embed_dim)
        self.logit_scale = LogitScale()

    def image_embeddings(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] in [-1, 1] -> unit-length joint-space embeddings [B, embed_dim]."""
        return F.normalize(self.image_encoder(images), dim=-1)

    def text_embeddings(self, pooled: Tensor) -> Tensor:
        """The text encoder's pooled end-of-text states [B, width] -> unit-length embeddings [B, embed_dim]."""
        return F.normalize(self.text_projection(pooled), dim=-1)
