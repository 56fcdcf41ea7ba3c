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
    projection_dim: int = 0  # width of the pooled output's text_projection (SDXL's bigG: 1280); 0: none


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
    # Layers per attention block at each level (SDXL: (0, 2, 10)); None: transformer_depth at every level.
    transformer_depths: tuple[int, ...] | None = None
    mid_transformer_depth: int | None = None  # None: the deepest level's depth
    context_dim: int = 768
    adm_in_channels: int = 0  # width of SDXL's vector conditioning y, added to the time embedding; 0: none
    use_linear_projection: bool = False  # SD2 projects in/out of the transformer with Linear, SD1 with 1x1 conv
    norm_groups: int = 32
    norm_eps: float = 1e-5

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def mid_heads(self) -> int:
        return self.heads[-1]

    def depth(self, level: int) -> int:
        """Transformer layers in each attention block of `level` (0 where the level does not attend)."""
        if not self.attention_levels[level]:
            return 0
        return self.transformer_depth if self.transformer_depths is None else self.transformer_depths[level]

    @property
    def mid_depth(self) -> int:
        if self.mid_transformer_depth is not None:
            return self.mid_transformer_depth
        return self.transformer_depth if self.transformer_depths is None else self.transformer_depths[-1]


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
    # None: the SDXL refiner, which reads OpenCLIP bigG alone (text_encoder_2).
    text_encoder: TextEncoderConfig | None = field(default_factory=TextEncoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    prediction_type: str = "epsilon"  # or "v_prediction" (SD2-768-v)
    pad_token_id: int = 49407  # SD1 pads with <|endoftext|>, SD2 with "!" (id 0)
    sample_size: int = 64  # latent side the UNet was trained at (512 px / 8)
    text_encoder_2: TextEncoderConfig | None = None  # SDXL's OpenCLIP ViT-bigG/14; None: SD 1/2
    pad_token_id_2: int = 0  # the second tokenizer pads with id 0 (A1111 and the SDXL folders)
    size_embed_dim: int = 0  # SDXL: each size/crop scalar becomes a 256-wide sinusoid; 0: no size conditioning
    # The SDXL refiner's y ends with an aesthetic score in place of the target size (diffusers'
    # requires_aesthetics_score): it was trained to tell good pictures from poor ones by it.
    aesthetic_score: bool = False

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

# SDXL base (sgm sd_xl_base.yaml): no attention at the top level, 64-channel heads, context = CLIP-L (768)
# and bigG (1280) side by side, y = pooled bigG (1280) + six 256-wide size sinusoids = 2816.
SDXL = PipelineConfig(
    name="sdxl",
    text_encoder=TextEncoderConfig(),
    text_encoder_2=TextEncoderConfig(
        width=1280, layers=32, heads=20, mlp_width=5120, activation="gelu", projection_dim=1280
    ),
    unet=UNetConfig(
        channel_mult=(1, 2, 4),
        attention_levels=(False, True, True),
        heads=(5, 10, 20),
        transformer_depths=(0, 2, 10),
        context_dim=2048,
        use_linear_projection=True,
        adm_in_channels=2816,
    ),
    vae=VAEConfig(scaling_factor=0.13025),
    pad_token_id_2=0,
    sample_size=128,
    size_embed_dim=256,
)

# SDXL refiner (sgm sd_xl_refiner.yaml): bigG alone (context 1280), four levels with attention on the
# middle two, depth 4; y = pooled (1280) + original size, crop and aesthetic score (5 x 256) = 2560.
SDXL_REFINER = PipelineConfig(
    name="sdxl-refiner",
    text_encoder=None,
    text_encoder_2=SDXL.text_encoder_2,
    unet=UNetConfig(
        model_channels=384,
        channel_mult=(1, 2, 4, 4),
        attention_levels=(False, True, True, False),
        heads=(6, 12, 24, 24),
        transformer_depths=(0, 4, 4, 0),
        mid_transformer_depth=4,
        context_dim=1280,
        use_linear_projection=True,
        adm_in_channels=2560,
    ),
    vae=SDXL.vae,
    pad_token_id_2=0,
    sample_size=128,
    size_embed_dim=256,
    aesthetic_score=True,
)

PRESETS: dict[str, PipelineConfig] = {c.name: c for c in (SD1, SD2, SD2_V, SDXL, SDXL_REFINER)}


# ---------------------------------------------------------------- limits
# Bounds on architectures read from files (a folder's config.json, or shapes read off a
# checkpoint's tensors, which cost nothing when a tensor is empty). Each is several times
# what SD 1.x/2.x and SDXL use, so every real model fits, while a hostile file cannot make
# the loader build a network without end or divide by zero.
MAX_WIDTH = 16_384  # any channel count or width (SD: 1280 at most; SDXL's context: 2048)
MAX_MLP_WIDTH = 65_536  # text encoder MLP (OpenCLIP-bigG: 5120)
MAX_IO_CHANNELS = 64  # image and latent channels (SD: 3 and 4; inpainting UNet input: 9)
MAX_LEVELS = 8  # resolution levels of the UNet and the VAE (SD: 4)
MAX_RES_BLOCKS = 16  # res blocks per level (SD: 2)
MAX_TRANSFORMER_DEPTH = 64  # transformer layers per attention block (SDXL: 10)
MAX_TRANSFORMER_LAYERS = 1024  # all attention blocks' layers together (SD: 16, SDXL: 70)
MAX_HEADS = 1024  # attention heads (SD2: 20)
MAX_TEXT_LAYERS = 128  # (SD2: 23; OpenCLIP-bigG: 32)
MAX_VOCAB = 1_048_576  # (CLIP: 49408)
MAX_POSITIONS = 8192  # (CLIP: 77)
MAX_SAMPLE_SIZE = 1024  # latent side the UNet was trained at (SD2-v: 96)
PREDICTION_TYPES = ("epsilon", "v_prediction")


def _count(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name}={value!r}: must be an integer from {low} to {high}")


def _small_positive(name: str, value: object, high: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= high:
        raise ValueError(f"{name}={value!r}: must be a number above 0 and at most {high}")


def _per_level(name: str, values: object, levels: int) -> tuple:
    if not isinstance(values, tuple) or len(values) != levels:
        raise ValueError(f"{name}={values!r}: must hold one entry per level ({levels})")
    return values


def check_text_encoder(cfg: TextEncoderConfig) -> None:
    """ValueError naming the field when `cfg` is outside the limits or cannot be built."""
    _count("vocab_size", cfg.vocab_size, 1, MAX_VOCAB)
    _count("max_length", cfg.max_length, 1, MAX_POSITIONS)
    _count("width", cfg.width, 1, MAX_WIDTH)
    _count("layers", cfg.layers, 1, MAX_TEXT_LAYERS)
    _count("heads", cfg.heads, 1, MAX_HEADS)
    _count("mlp_width", cfg.mlp_width, 1, MAX_MLP_WIDTH)
    _small_positive("layer_norm_eps", cfg.layer_norm_eps, 1.0)
    _count("projection_dim", cfg.projection_dim, 0, MAX_WIDTH)
    if cfg.width % cfg.heads:
        raise ValueError(f"width={cfg.width} does not split into heads={cfg.heads} equal heads")


def check_unet(cfg: UNetConfig) -> None:
    """ValueError naming the field when `cfg` is outside the limits or cannot be built."""
    _count("in_channels", cfg.in_channels, 1, MAX_IO_CHANNELS)
    _count("out_channels", cfg.out_channels, 1, MAX_IO_CHANNELS)
    _count("model_channels", cfg.model_channels, 1, MAX_WIDTH)
    _count("levels (len(channel_mult))", len(cfg.channel_mult), 1, MAX_LEVELS)
    levels = len(cfg.channel_mult)
    for mult in _per_level("channel_mult", cfg.channel_mult, levels):
        _count("channel_mult entry", mult, 1, MAX_WIDTH // cfg.model_channels)
    _per_level("attention_levels", cfg.attention_levels, levels)
    _count("num_res_blocks", cfg.num_res_blocks, 1, MAX_RES_BLOCKS)
    _count("transformer_depth", cfg.transformer_depth, 1, MAX_TRANSFORMER_DEPTH)
    if cfg.transformer_depths is not None:
        for level, depth in enumerate(_per_level("transformer_depths", cfg.transformer_depths, levels)):
            low = 1 if cfg.attention_levels[level] else 0
            _count(f"transformer_depths[{level}]", depth, low, MAX_TRANSFORMER_DEPTH)
    if cfg.mid_transformer_depth is not None:
        _count("mid_transformer_depth", cfg.mid_transformer_depth, 1, MAX_TRANSFORMER_DEPTH)
    _count("the middle block's depth", cfg.mid_depth, 1, MAX_TRANSFORMER_DEPTH)
    _count("context_dim", cfg.context_dim, 1, MAX_WIDTH)
    _count("adm_in_channels", cfg.adm_in_channels, 0, MAX_WIDTH)
    _count("norm_groups", cfg.norm_groups, 1, MAX_WIDTH)
    _small_positive("norm_eps", cfg.norm_eps, 1.0)
    # Down and up paths: n and n + 1 blocks per attending level; the middle block: one.
    blocks = sum(2 * cfg.num_res_blocks + 1 for attends in cfg.attention_levels if attends) + 1
    layers = sum((2 * cfg.num_res_blocks + 1) * cfg.depth(level) for level in range(levels)) + cfg.mid_depth
    if layers > MAX_TRANSFORMER_LAYERS:
        depths = cfg.transformer_depths or cfg.transformer_depth
        raise ValueError(
            f"transformer_depth={depths} over {blocks} attention blocks makes "
            f"{layers} transformer layers, over the limit of {MAX_TRANSFORMER_LAYERS}"
        )
    for level, (mult, heads) in enumerate(zip(cfg.channel_mult, _per_level("heads", cfg.heads, levels))):
        width = cfg.model_channels * mult
        _count(f"heads[{level}]", heads, 1, MAX_HEADS)
        if width % cfg.norm_groups:
            raise ValueError(f"norm_groups={cfg.norm_groups} does not divide level {level}'s {width} channels")
        if (cfg.attention_levels[level] or level == levels - 1) and width % heads:
            raise ValueError(f"heads[{level}]={heads} does not split level {level}'s {width} channels evenly")
    if cfg.model_channels % cfg.norm_groups:
        raise ValueError(f"norm_groups={cfg.norm_groups} does not divide model_channels={cfg.model_channels}")


def check_vae(cfg: VAEConfig) -> None:
    """ValueError naming the field when `cfg` is outside the limits or cannot be built."""
    _count("in_channels", cfg.in_channels, 1, MAX_IO_CHANNELS)
    _count("out_channels", cfg.out_channels, 1, MAX_IO_CHANNELS)
    _count("latent_channels", cfg.latent_channels, 1, MAX_IO_CHANNELS)
    _count("base_channels", cfg.base_channels, 1, MAX_WIDTH)
    _count("levels (len(channel_mult))", len(cfg.channel_mult), 1, MAX_LEVELS)
    for mult in _per_level("channel_mult", cfg.channel_mult, len(cfg.channel_mult)):
        _count("channel_mult entry", mult, 1, MAX_WIDTH // cfg.base_channels)
    _count("num_res_blocks", cfg.num_res_blocks, 1, MAX_RES_BLOCKS)
    _count("norm_groups", cfg.norm_groups, 1, MAX_WIDTH)
    _small_positive("scaling_factor", cfg.scaling_factor, 1000.0)
    for mult in cfg.channel_mult:
        if cfg.base_channels * mult % cfg.norm_groups:
            raise ValueError(
                f"norm_groups={cfg.norm_groups} does not divide a level's {cfg.base_channels * mult} channels"
            )


def check_pipeline(cfg: PipelineConfig) -> None:
    """ValueError "part: field=value: why" when any network's config, or the pipeline's own
    fields, are outside the limits (check before building anything from `cfg`)."""
    for part, check in (("text_encoder", check_text_encoder), ("unet", check_unet), ("vae", check_vae)):
        if getattr(cfg, part) is None:
            if part == "text_encoder" and cfg.text_encoder_2 is not None:
                continue  # the SDXL refiner: bigG alone
            raise ValueError(f"{part}: missing (only the SDXL refiner, with text_encoder_2, has no text_encoder)")
        try:
            check(getattr(cfg, part))
        except ValueError as e:
            raise ValueError(f"{part}: {e}") from None
    if cfg.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={cfg.prediction_type!r}: must be one of {', '.join(PREDICTION_TYPES)}")
    _count("sample_size", cfg.sample_size, 1, MAX_SAMPLE_SIZE)
    if cfg.text_encoder is not None:
        _count("pad_token_id", cfg.pad_token_id, 0, cfg.text_encoder.vocab_size - 1)
    _count("size_embed_dim", cfg.size_embed_dim, 0, MAX_WIDTH)
    if cfg.size_embed_dim % 2:
        raise ValueError(f"size_embed_dim={cfg.size_embed_dim}: must be even (cos and sin halves)")
    if cfg.text_encoder_2 is not None:
        try:
            check_text_encoder(cfg.text_encoder_2)
        except ValueError as e:
            raise ValueError(f"text_encoder_2: {e}") from None
        _count("pad_token_id_2", cfg.pad_token_id_2, 0, cfg.text_encoder_2.vocab_size - 1)
    check_vector_conditioning(cfg)


def check_vector_conditioning(cfg: PipelineConfig) -> None:
    """SDXL: the UNet's y is the second encoder's pooled vector and six size sinusoids (the refiner:
    five, the last its aesthetic score), and its context the encoders' hidden states side by side;
    anything else cannot be conditioned here."""
    if not isinstance(cfg.aesthetic_score, bool):
        raise ValueError(f"aesthetic_score={cfg.aesthetic_score!r}: must be true or false")
    if not cfg.unet.adm_in_channels and cfg.text_encoder_2 is None and not cfg.aesthetic_score:
        return
    if cfg.text_encoder_2 is None or not cfg.size_embed_dim or not cfg.unet.adm_in_channels:
        second = "set" if cfg.text_encoder_2 is not None else None
        raise ValueError(
            f"SDXL takes text_encoder_2, size_embed_dim and the UNet's adm_in_channels together (got text_encoder_2="
            f"{second}, size_embed_dim={cfg.size_embed_dim}, adm_in_channels={cfg.unet.adm_in_channels})"
        )
    pooled = cfg.text_encoder_2.projection_dim or cfg.text_encoder_2.width
    scalars, model = (5, "SDXL refiner") if cfg.aesthetic_score else (6, "SDXL base")
    if cfg.unet.adm_in_channels != pooled + scalars * cfg.size_embed_dim:
        raise ValueError(
            f"unet: adm_in_channels={cfg.unet.adm_in_channels} is not the pooled width {pooled} "
            f"+ {scalars} x size_embed_dim {cfg.size_embed_dim} ({model})"
        )
    encoders = [e for e in (cfg.text_encoder, cfg.text_encoder_2) if e is not None]
    if cfg.unet.context_dim != sum(e.width for e in encoders):
        widths = " + ".join(str(e.width) for e in encoders)
        raise ValueError(
            f"unet: context_dim={cfg.unet.context_dim} is not the text encoders' widths together ({widths})"
        )
