"""The UNet that predicts noise: given a noisy latent, the timestep it was noised to,
and the text encoder's output, it predicts the noise that was added (or, for v-models,
the velocity; the arithmetic is the same, only the training target differs).

Shape of the network, for SD (model_channels 320, channel_mult (1, 2, 4, 4)):

    latent [B, 4, 64, 64] --conv_in--> 320 ch
    down path: per level, num_res_blocks x (ResBlock [+ SpatialTransformer]),
               then a stride-2 conv (except after the last level); every output is
               kept as a skip connection
    middle:    ResBlock, SpatialTransformer, ResBlock at the lowest resolution
    up path:   per level, num_res_blocks+1 x (concat a skip, ResBlock [+ SpatialTransformer]),
               then a 2x nearest upsample + conv (except after the last level)
    out:       GroupNorm, SiLU, conv --> [B, 4, 64, 64]

The timestep enters every ResBlock (as a per-channel bias); the text enters every
SpatialTransformer (through cross-attention, queries from the image, keys and values
from the text).

SDXL is the same network with other settings: no attention at the top level, deeper
transformers lower down (2 and 10 layers per block), and a vector y (the pooled text
embedding and the image's size and crop, embedded as sinusoids) that `label_emb` maps
into the time embedding, so every ResBlock sees it too.

Parameter names follow the original CompVis/ldm layout (time_embed, input_blocks,
middle_block, output_blocks, out), so the tensors under `model.diffusion_model.` in a
single-file checkpoint load with only that prefix stripped. diffusers' names are mapped
in diffuse.checkpoints.unet_layout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffuse.models.configs import UNetConfig


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of the timestep, [cos | sin], at frequencies max_period**(-i/half).

    Computed in fp32: in fp16, t * freq for t near 1000 loses the precision the
    high-frequency features need.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    angles = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def memory_format_of(x: Tensor) -> torch.memory_format:
    """channels_last if x is stored that way (and that is not also standard order), else standard:
    a block that reshapes its input hands back the layout it was given."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class ResBlock(nn.Module):
    """norm-SiLU-conv, add the projected timestep embedding, norm-SiLU-conv, plus a residual."""

    def __init__(self, in_channels: int, out_channels: int, time_embed_dim: int, cfg: UNetConfig):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(cfg.norm_groups, in_channels, eps=cfg.norm_eps),
            nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(time_embed_dim, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(cfg.norm_groups, out_channels, eps=cfg.norm_eps),
            nn.SiLU(),
            nn.Identity(),  # dropout during training; kept so the conv is `out_layers.3` as in checkpoints
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        # The residual needs a 1x1 conv only where the block changes the channel count.
        self.skip_connection = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]  # the timestep shifts every channel
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class Attention(nn.Module):
    """Multi-head attention; self-attention when context is None, else cross-attention to context."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))  # a Sequential so the names read `to_out.0`

    def qkv(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Queries from x, keys and values from context (or x), each [B, heads, N, d]."""
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        return tuple(t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        out = F.scaled_dot_product_attention(*self.qkv(x, context))
        return self.to_out(out.transpose(1, 2).flatten(2))  # [B, heads, N, d] -> [B, N, heads*d]


class GEGLU(nn.Module):
    """One projection gives a value half and a gate half; the output is value * gelu(gate)."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner_dim)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        # Index 1 was dropout in training; the output projection stays `net.2`.
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention over image positions, cross-attention to the text, feed-forward."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Treats the H*W positions of a feature map as a sequence and runs transformer blocks on it.

    SD1 projects in and out with 1x1 convs (before flattening), SD2 with Linear layers
    (after flattening); the two are the same map, stored with different weight shapes.
    """

    def __init__(self, channels: int, heads: int, depth: int, cfg: UNetConfig):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels do not split into {heads} attention heads")
        self.linear = cfg.use_linear_projection
        self.norm = nn.GroupNorm(cfg.norm_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels) if self.linear else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, cfg.context_dim, heads) for _ in range(depth)
        )
        self.proj_out = nn.Linear(channels, channels) if self.linear else nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, c, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.linear:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
        if self.linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.linear:
            x = self.proj_out(x)
        # Back to [B, C, H, W] in the layout the block came in with: the permuted view already
        # is channels-last; a standard-layout input gets a standard-layout copy, so the conv
        # below and the next GroupNorm never run on a strided view.
        x = x.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous(memory_format=memory_format_of(residual))
        if not self.linear:
            x = self.proj_out(x)
        return x + residual


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: torch.Size) -> Tensor:
        # Upsampling to the size of the skip it will meet (2x, or 2x-1 where the
        # down path halved an odd side) lets any latent size through.
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


def run_block(
    block: nn.ModuleList, h: Tensor, emb: Tensor, context: Tensor, upsample_size: torch.Size | None = None
) -> Tensor:
    """One input, middle or output block: each layer takes what it needs of (timestep, text)."""
    for layer in block:
        if isinstance(layer, ResBlock):
            h = layer(h, emb)
        elif isinstance(layer, SpatialTransformer):
            h = layer(h, context)
        elif isinstance(layer, Upsample):
            h = layer(h, upsample_size)
        else:
            h = layer(h)
    return h


def run_output_block(block: nn.ModuleList, h: Tensor, skips: list[Tensor], emb: Tensor, context: Tensor) -> Tensor:
    """One output block on h joined with the last skip (taken off `skips`); an upsample at its
    end reaches the size of the skip the next block meets."""
    h = torch.cat([h, skips.pop()], dim=1)
    return run_block(block, h, emb, context, skips[-1].shape[-2:] if skips else None)


def level_block(cfg: UNetConfig, level: int, in_channels: int, out_channels: int) -> nn.ModuleList:
    """A ResBlock, then a SpatialTransformer on the levels that attend to the text."""
    block = nn.ModuleList([ResBlock(in_channels, out_channels, cfg.time_embed_dim, cfg)])
    if cfg.attention_levels[level]:
        block.append(SpatialTransformer(out_channels, cfg.heads[level], cfg.depth(level), cfg))
    return block


class UNet(nn.Module):
    """The noise predictor; see the module docstring for its shape."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch0, emb_dim = cfg.model_channels, cfg.time_embed_dim
        levels = len(cfg.channel_mult)

        self.time_embed = nn.Sequential(nn.Linear(ch0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.adm_in_channels:
            # SDXL's vector conditioning (pooled text and image sizes) joins the timestep embedding;
            # nested as in sgm so the names read `label_emb.0.0` / `label_emb.0.2`.
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            )

        # Down path. skip_channels records each block's output width, which the up
        # path meets again, in reverse, through its skip connections.
        self.input_blocks = nn.ModuleList([nn.ModuleList([nn.Conv2d(cfg.in_channels, ch0, 3, padding=1)])])
        skip_channels, ch = [ch0], ch0
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.input_blocks.append(level_block(cfg, level, ch, ch0 * mult))
                ch = ch0 * mult
                skip_channels.append(ch)
            if level < levels - 1:
                self.input_blocks.append(nn.ModuleList([Downsample(ch)]))
                skip_channels.append(ch)

        self.middle_block = nn.ModuleList(
            [
                ResBlock(ch, ch, emb_dim, cfg),
                SpatialTransformer(ch, cfg.mid_heads, cfg.mid_depth, cfg),
                ResBlock(ch, ch, emb_dim, cfg),
            ]
        )

        # Up path: one more block per level than the down path, so every skip is consumed.
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(levels)):
            for i in range(cfg.num_res_blocks + 1):
                block = level_block(cfg, level, ch + skip_channels.pop(), ch0 * cfg.channel_mult[level])
                ch = ch0 * cfg.channel_mult[level]
                if level > 0 and i == cfg.num_res_blocks:
                    block.append(Upsample(ch))
                self.output_blocks.append(block)

        self.out = nn.Sequential(
            nn.GroupNorm(cfg.norm_groups, ch, eps=cfg.norm_eps),
            nn.SiLU(),
            nn.Conv2d(ch, cfg.out_channels, 3, padding=1),
        )

    def embed_time(self, timesteps: Tensor | float, latents: Tensor, y: Tensor | None = None) -> Tensor:
        """The timestep embedding [B, time_embed_dim] every ResBlock adds, for timesteps [B] or
        one for the whole batch of latents, plus the embedded vector conditioning y where the
        UNet takes one (SDXL)."""
        t = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(latents.shape[0])
        t_features = timestep_embedding(t, self.cfg.model_channels).to(self.time_embed[0].weight.dtype)
        emb = self.time_embed(t_features)
        if self.cfg.adm_in_channels:
            if y is None or y.shape != (latents.shape[0], self.cfg.adm_in_channels):
                got = None if y is None else tuple(y.shape)
                raise ValueError(
                    f"this UNet needs y of shape [{latents.shape[0]}, {self.cfg.adm_in_channels}], got {got}"
                )
            emb = emb + self.label_emb(y.to(emb.dtype))
        elif y is not None:
            raise ValueError("this UNet takes no vector conditioning y")
        return emb

    def forward(self, latents: Tensor, timesteps: Tensor | float, context: Tensor, y: Tensor | None = None) -> Tensor:
        """latents [B, in_channels, H, W], timesteps [B] or one for all, context [B, T, context_dim],
        y [B, adm_in_channels] where the UNet takes vector conditioning (SDXL)
        -> noise prediction [B, out_channels, H, W]."""
        emb = self.embed_time(timesteps, latents, y)
        h, skips = latents, []
        for block in self.input_blocks:
            h = run_block(block, h, emb, context)
            skips.append(h)
        h = run_block(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = run_output_block(block, h, skips, emb, context)
        return self.out(h)
