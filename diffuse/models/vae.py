"""AutoencoderKL: the VAE that moves Stable Diffusion between pixels and latents.

The encoder squeezes an image [B, 3, H, W] in [-1, 1] down by f = 2**(levels-1)
(8 for SD) into a diagonal Gaussian over latents [B, 4, H/f, W/f]; the decoder
maps a latent back to an image. Diffusion runs entirely in that latent space,
which is what makes it affordable.

The latents here are the RAW latents the autoencoder was trained with. The
diffusion model works on latents multiplied by `cfg.scaling_factor` (0.18215
for SD), which brings them to roughly unit variance; that scaling is the
pipeline's job (multiply after `encode`, divide before `decode`), not this
module's.

Parameter names follow the original CompVis/ldm layout, so the tensors under
`first_stage_model.` in a single-file checkpoint load with only that prefix
stripped. diffusers' names are mapped in diffuse.checkpoints.vae_layout.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffuse.models.configs import VAEConfig


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    # The autoencoder normalises with a much smaller eps than the UNet (1e-6 vs 1e-5).
    return nn.GroupNorm(groups, channels, eps=1e-6)


class DiagonalGaussian:
    """The encoder's output: a Gaussian per latent element, with independent dimensions.

    `moments` is [B, 2*C, h, w]: the mean in the first C channels, the log-variance
    in the last C.
    """

    def __init__(self, moments: Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        # Clamped as in the original so exp() stays finite for untrained or extreme inputs.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        """mean + std * noise. The noise is drawn on the generator's device, so a CPU
        generator gives the same latent whatever device the model runs on.

        `noise` (standard normal, shaped like the mean) replaces the draw: training passes
        noise drawn per sample, so a data-parallel run samples what one process would.
        """
        if noise is None:
            device = generator.device if generator is not None else self.mean.device
            noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        elif generator is not None:
            raise ValueError("pass either a generator or ready noise to DiagonalGaussian.sample, not both")
        elif noise.shape != self.mean.shape:
            raise ValueError(f"noise of shape {tuple(noise.shape)} for latents of shape {tuple(self.mean.shape)}")
        return self.mean + self.std * noise.to(self.mean)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL divergence to the standard normal prior, summed over C, H, W: one value per image."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


class ResnetBlock(nn.Module):
    """Two norm-SiLU-conv3x3 steps plus a residual; a 1x1 conv adapts the residual when channels change."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with 1x1 convs as projections.

    Used only at the lowest resolution (the mid block), where it lets every latent
    position see the whole image.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values of the normalised map, each [B, 1 head, H*W, C]."""
        b, c, h, w = x.shape
        normed = self.norm(x)
        return tuple(proj(normed).reshape(b, 1, c, h * w).transpose(2, 3) for proj in (self.q, self.k, self.v))

    def forward(self, x: Tensor) -> Tensor:
        out = F.scaled_dot_product_attention(*self.qkv(x))  # scaled by 1/sqrt(C), as the original
        return x + self.proj_out(out.transpose(2, 3).reshape(x.shape))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # Asymmetric padding (right and bottom only), then a stride-2 conv with no padding:
        # how the original halves H and W, and what its weights were trained with.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """resnet, attention, resnet at the lowest resolution (same in encoder and decoder)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class EncoderLevel(nn.Module):
    """One resolution of the encoder: resnet blocks, then (except at the last level) a 2x downsample."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, groups: int, downsample: bool):
        super().__init__()
        channels = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(a, b, groups) for a, b in itertools.pairwise(channels))
        self.downsample = Downsample(out_channels) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class DecoderLevel(nn.Module):
    """One resolution of the decoder: resnet blocks, then (except at full resolution) a 2x upsample."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, groups: int, upsample: bool):
        super().__init__()
        channels = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(a, b, groups) for a, b in itertools.pairwise(channels))
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return self.upsample(x) if self.upsample is not None else x


class Encoder(nn.Module):
    """Image [B, in, H, W] -> Gaussian moments [B, 2*latent, H/f, W/f] (before quant_conv)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        # conv_in gives base_channels; each level then takes the previous level's width.
        in_widths = [cfg.base_channels, *widths[:-1]]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.base_channels, 3, padding=1)
        self.down = nn.ModuleList(
            EncoderLevel(in_widths[i], widths[i], cfg.num_res_blocks, cfg.norm_groups, downsample=i < len(widths) - 1)
            for i in range(len(widths))
        )
        self.mid = MidBlock(widths[-1], cfg.norm_groups)
        self.norm_out = group_norm(widths[-1], cfg.norm_groups)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        x = self.mid(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    """Latent [B, latent, h, w] (after post_quant_conv) -> image [B, out, h*f, w*f].

    `up[i]` is the level at the encoder's resolution i, so `up[0]` is full resolution
    and is applied LAST; the levels run from the end of the list to its start.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], cfg.norm_groups)
        # Each level takes the width of the (lower-resolution) level applied before it, has
        # one block more than the encoder's level, and upsamples unless it is full resolution.
        in_widths = [*widths[1:], widths[-1]]
        self.up = nn.ModuleList(
            DecoderLevel(in_widths[i], widths[i], cfg.num_res_blocks + 1, cfg.norm_groups, upsample=i > 0)
            for i in range(len(widths))
        )
        self.norm_out = group_norm(widths[0], cfg.norm_groups)
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class AutoencoderKL(nn.Module):
    """The SD VAE. `encode` gives a DiagonalGaussian over raw latents, `decode` maps raw latents to images.

    Scaling by `cfg.scaling_factor` is left to the pipeline: it multiplies the latent
    it takes from `encode` and divides before calling `decode`.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # 1x1 convs between the conv nets and the latent, kept from the original's VQ
        # ancestry ("quant"); no quantisation happens in the KL autoencoder.
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode(self, images: Tensor) -> DiagonalGaussian:
        """images [B, 3, H, W] in [-1, 1], H and W multiples of f -> Gaussian over raw latents [B, 4, H/f, W/f]."""
        return DiagonalGaussian(self.quant_conv(self.encoder(images)))

    def decode(self, latents: Tensor) -> Tensor:
        """Raw (unscaled) latents [B, 4, h, w] -> images [B, 3, h*f, w*f], roughly in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(latents))

    def forward(
        self,
        images: Tensor,
        sample: bool = True,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruction and posterior, for training: decode a sample (or the mean) of encode(images).

        The sample's noise is drawn from `generator`, or given ready as `noise` [B, 4, H/f, W/f].
        """
        posterior = self.encode(images)
        latents = posterior.sample(generator, noise) if sample else posterior.mode()
        return self.decode(latents), posterior
