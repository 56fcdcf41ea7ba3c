"""Architecture configs: one frozen dataclass per network, plus the known presets.

A config holds only what changes the shape or the arithmetic of a network.
Everything that can be read off a checkpoint's tensors is detected by the
loader (diffuse.checkpoints); what cannot (head counts, prediction type) comes
from the presets here or from a diffusers folder's config.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TextEncoderConfig:
    """CLIP text transformer (SD1: OpenAI CLIP ViT-L/14; SD2: OpenCLIP ViT-H/14)."""

    vocab_size: int = 49408
    max_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    activation: str = "quick_gelu"  # SD1 "quick_gelu", SD2 "gelu"
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class UNetConfig:
    """The noise predictor. Levels go from full latent resolution down."""

    in_channels: int = 4  # 9 for inpainting checkpoints (latent + mask + masked latent)
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[bool, ...] = (True, True, True, False)  # which levels cross-attend
    heads: tuple[int, ...] = (8, 8, 8, 8)  # attention heads per level
    transformer_depth: int = 1
    context_dim: int = 768
    use_linear_projection: bool = False  # SD2 projects in/out of the transformer with Linear, SD1 with 1x1 conv
    norm_groups: int = 32
    norm_eps: float = 1e-5

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def mid_heads(self) -> int:
        return self.heads[-1]


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL: f = 2**(levels-1) downsampling, a diagonal Gaussian over latents."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    norm_groups: int = 32
    scaling_factor: float = 0.18215

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True)
class PipelineConfig:
    """Everything a pipeline needs beyond the three networks' shapes."""

    name: str
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    prediction_type: str = "epsilon"  # or "v_prediction" (SD2-768-v)
    pad_token_id: int = 49407  # SD1 pads with <|endoftext|>, SD2 with "!" (id 0)
    sample_size: int = 64  # latent side the UNet was trained at (512 px / 8)

    @property
    def image_size(self) -> int:
        """The image side the model was trained at, its native size: 512 for SD 1.x, 768 for SD 2.x-v."""
        return self.sample_size * self.vae.downsample_factor


SD1 = PipelineConfig(name="sd1")

SD2 = PipelineConfig(
    name="sd2",
    text_encoder=TextEncoderConfig(width=1024, layers=23, heads=16, mlp_width=4096, activation="gelu"),
    unet=UNetConfig(heads=(5, 10, 20, 20), context_dim=1024, use_linear_projection=True),
    pad_token_id=0,
)

SD2_V = PipelineConfig(
    name="sd2-v",
    text_encoder=SD2.text_encoder,
    unet=SD2.unet,
    prediction_type="v_prediction",
    pad_token_id=0,
    sample_size=96,
)

PRESETS: dict[str, PipelineConfig] = {c.name: c for c in (SD1, SD2, SD2_V)}
