"""The proposed architecture of diffuse's own small default model, trained from scratch on a CPU.

Sized for 64x64 images of flat-colour shapes, a few hours of training on a small CPU for
all of it, and one <= 60 MB fp16 file. Parameters / fp16 size:

    text encoder  7.13 M  14.3 MB   (of which the 49408 x 128 token table is 6.32 M, 12.6 MB)
    UNet         10.57 M  21.1 MB
    VAE           2.73 M   5.5 MB
    total        20.42 M  40.9 MB

The choices, each for a reason:
  - VAE: SD's f=8, 4-channel latent, so 4 levels (3 halvings): 64x64 -> 8x8x4.
    Widths 16/32/64/128 with one block per level: flat shapes need little capacity,
    and the VAE is the most expensive network to train per image (it works at 64x64),
    most of it at full resolution, where 16 channels instead of 32 roughly halve a
    training step. 8 norm groups, so never a single channel per group as SD's 32 groups
    would give here: a channel normalised on its own loses its absolute level, and a
    flat-colour feature map its colour.
  - Text encoder: vocabulary and 77 positions stay CLIP's, so SD's tokenizer and
    prompt handling work unchanged; that fixes the 49408-row token table, which at
    width 128 is already 89% of the encoder. 4 layers to bind attributes to objects
    ("a red circle left of a blue square"); 2 heads of 64 channels, CLIP's head size.
  - UNet: 3 levels (8x8, 4x4, 2x2), 64/128/128 channels, cross-attention to the text
    at every level (positions in the captions need it at 8x8), 2 heads of 32 channels
    at the first level. 16 norm groups (4 channels per group, not 2) for the same
    reason as the VAE's. context_dim is the text encoder's width.

GroupNorm group counts (and the UNet's head counts) are not stored in tensor shapes:
the shipped model must carry this config (a diffusers folder's config.json does);
reading the weights alone would assume SD's 32 groups and 8 heads.

The VAE's scaling factor is SD's until the autoencoder is trained; it is then
measured with diffuse.train.objectives.scaling_factor_for and set with
dataclasses.replace(TINY_VAE, scaling_factor=...).

The emoji presets (EMOJI_*, spelled out field by field in configs/emoji/) draw the emoji world (diffuse.emoji):
about 1,900 detailed pictures instead of four flat shapes, still at 64x64. Parameters / fp16:

    text encoder  15.83 M  31.7 MB
    UNet          22.89 M  45.8 MB
    VAE            2.70 M   5.4 MB
    total         41.42 M  82.8 MB   (the limit is 150 MB)

  - VAE: f=4 (3 levels), 64x64 -> 16x16x4. At f=8 a small picture (15 px of 64) would be two
    latent cells wide, too few for a face's eyes or a car's wheels; at f=4 the latent keeps
    one number per 12 pixel values (SD's one per 48, at 512 px, whose images are far more redundant).
  - UNet: 16x16, 8x8, 4x4 latents, 96/192/192 channels. Attention at 8x8 and 4x4 only: at
    16x16 (256 tokens) it made a training step 1.7x as long, while 8x8 still places a picture in its cell.
  - Text encoder: width 256, 4 layers: 1,900 names, two of them per caption with a relation,
    to tell apart where the shapes world had 4 shapes and 7 colours. The vocabulary stays CLIP's
    BPE, which spells every word of every name (no name is out of vocabulary).
  - Image tower: a 256-wide last stage and joint space, for as many pictures to tell apart.
"""

from __future__ import annotations

from diffuse.models.configs import PipelineConfig, TextEncoderConfig, UNetConfig, VAEConfig
from diffuse.shapes.image_encoder import ImageEncoderConfig

TINY_TEXT = TextEncoderConfig(
    vocab_size=49408,
    max_length=77,
    width=128,
    layers=4,
    heads=2,
    mlp_width=512,
    activation="quick_gelu",  # SD1's; the pipeline pads with <|endoftext|> as SD1 does
)

TINY_UNET = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=64,
    channel_mult=(1, 2, 2),
    num_res_blocks=2,
    attention_levels=(True, True, True),
    heads=(2, 4, 4),  # 32 channels per head
    transformer_depth=1,
    context_dim=TINY_TEXT.width,
    use_linear_projection=False,
    norm_groups=16,
)

TINY_VAE = VAEConfig(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    base_channels=16,
    channel_mult=(1, 2, 4, 8),
    num_res_blocks=1,
    norm_groups=8,
)

# Training-time only: the image tower the text encoder is trained against (CLIP's loss).
TINY_IMAGE_ENCODER = ImageEncoderConfig(
    image_size=64,
    stage_channels=(32, 64, 128, 128),
    blocks_per_stage=1,
    norm_groups=8,
    embed_dim=128,
)

EMOJI_TEXT = TextEncoderConfig(
    vocab_size=49408,
    max_length=77,
    width=256,
    layers=4,
    heads=4,  # 64 channels per head, as CLIP's
    mlp_width=1024,
    activation="quick_gelu",
)

EMOJI_UNET = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=96,
    channel_mult=(1, 2, 2),
    num_res_blocks=2,
    attention_levels=(False, True, True),
    heads=(3, 6, 6),  # 32 channels per head
    transformer_depth=1,
    context_dim=EMOJI_TEXT.width,
    use_linear_projection=False,
    norm_groups=16,
)

EMOJI_VAE = VAEConfig(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    base_channels=32,
    channel_mult=(1, 2, 4),
    num_res_blocks=1,
    norm_groups=8,
)

EMOJI_IMAGE_ENCODER = ImageEncoderConfig(
    image_size=64,
    stage_channels=(32, 64, 128, 256),
    blocks_per_stage=1,
    norm_groups=8,
    embed_dim=256,
)

TINY = PipelineConfig(
    name="tiny",
    text_encoder=TINY_TEXT,
    unet=TINY_UNET,
    vae=TINY_VAE,
    prediction_type="epsilon",
    pad_token_id=49407,
    sample_size=8,  # latent side: 64 px / 8
)
