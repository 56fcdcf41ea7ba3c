"""The VAE's checkpoint layouts: the original CompVis/ldm names (ours) and diffusers' names.

Our AutoencoderKL uses the original names, so a single-file checkpoint needs only its
`first_stage_model.` prefix stripped. A diffusers `vae/` folder is renamed module by
module with the table below, and its mid-block attention weights are reshaped from
Linear [C, C] to 1x1 conv [C, C, 1, 1].
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from diffuse.checkpoints.fields import check_fields, flag, integer, listing, number, one_of, optional, text
from diffuse.checkpoints.keymap import PrefixPairs, count_numbered, dims, invert, rename_prefixes
from diffuse.models import configs as limits
from diffuse.models.configs import VAEConfig

# Modules found under both `encoder.` and `decoder.`: (diffusers, original).
SHARED_PAIRS: PrefixPairs = [
    ("conv_in", "conv_in"),
    ("conv_norm_out", "norm_out"),
    ("conv_out", "conv_out"),
    ("mid_block.resnets.0", "mid.block_1"),
    ("mid_block.resnets.1", "mid.block_2"),
    ("mid_block.attentions.0.group_norm", "mid.attn_1.norm"),
    ("mid_block.attentions.0.to_q", "mid.attn_1.q"),
    ("mid_block.attentions.0.to_k", "mid.attn_1.k"),
    ("mid_block.attentions.0.to_v", "mid.attn_1.v"),
    ("mid_block.attentions.0.to_out.0", "mid.attn_1.proj_out"),
]

# Inside a resnet block only the channel-adapting 1x1 conv is named differently
# (norm1, conv1, norm2, conv2 agree).
RESNET_SHORTCUT = ("conv_shortcut", "nin_shortcut")

# The original computes the mid-block attention projections with 1x1 convs, diffusers
# with Linear layers: the same numbers, stored [C, C, 1, 1] vs [C, C]. These are the
# tensors (original names) that change shape between the layouts.
CONV_AS_LINEAR_WEIGHTS: tuple[str, ...] = tuple(
    f"{part}.mid.attn_1.{proj}.weight" for part in ("encoder", "decoder") for proj in ("q", "k", "v", "proj_out")
)


def diffusers_pairs(cfg: VAEConfig) -> PrefixPairs:
    """(diffusers module prefix, original/our module prefix) for every module of the VAE."""
    levels = len(cfg.channel_mult)
    pairs: PrefixPairs = [("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.{diffusers}", f"{part}.{original}") for diffusers, original in SHARED_PAIRS]

    def resnet(diffusers: str, original: str) -> PrefixPairs:
        return [(diffusers, original), (f"{diffusers}.{RESNET_SHORTCUT[0]}", f"{original}.{RESNET_SHORTCUT[1]}")]

    for i in range(levels):
        for j in range(cfg.num_res_blocks):
            pairs += resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}")
        if i < levels - 1:
            pairs.append((f"encoder.down_blocks.{i}.downsamplers.0", f"encoder.down.{i}.downsample"))

    # diffusers numbers decoder levels in the order they run (lowest resolution first);
    # the original numbers them by resolution like the encoder (up.0 = full resolution, run last).
    for k in range(levels):
        i = levels - 1 - k
        for j in range(cfg.num_res_blocks + 1):
            pairs += resnet(f"decoder.up_blocks.{k}.resnets.{j}", f"decoder.up.{i}.block.{j}")
        if i > 0:
            pairs.append((f"decoder.up_blocks.{k}.upsamplers.0", f"decoder.up.{i}.upsample"))
    return pairs


def from_diffusers(state: Mapping[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in our (original) layout."""
    renamed = rename_prefixes(state, diffusers_pairs(cfg))
    for key in CONV_AS_LINEAR_WEIGHTS:
        if key in renamed and renamed[key].ndim == 2:
            renamed[key] = renamed[key][:, :, None, None]
    return renamed


def to_diffusers(state: Mapping[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """Our (original-layout) state dict in diffusers' layout."""
    state = dict(state)
    for key in CONV_AS_LINEAR_WEIGHTS:
        if key in state and state[key].ndim == 4:
            state[key] = state[key][:, :, 0, 0]
    return rename_prefixes(state, invert(diffusers_pairs(cfg)))


_IO = integer(1, limits.MAX_IO_CHANNELS)
# Every field of `vae/config.json` that config_from_diffusers reads: its type and range,
# checked before any is used (diffuse.checkpoints.fields).
DIFFUSERS_FIELDS = {
    "sample_size": optional(
        one_of(integer(1, 8 * limits.MAX_SAMPLE_SIZE), listing(integer(1, 8 * limits.MAX_SAMPLE_SIZE), 1, 2))
    ),
    "in_channels": _IO,
    "out_channels": _IO,
    "latent_channels": _IO,
    "block_out_channels": listing(integer(1, limits.MAX_WIDTH), 1, limits.MAX_LEVELS),
    "down_block_types": listing(text(), 1, limits.MAX_LEVELS),
    "up_block_types": listing(text(), 1, limits.MAX_LEVELS),
    "layers_per_block": integer(1, limits.MAX_RES_BLOCKS),
    "norm_num_groups": integer(1, limits.MAX_WIDTH),
    "act_fn": text(),
    "use_quant_conv": optional(flag),
    "use_post_quant_conv": optional(flag),
    "mid_block_add_attention": optional(flag),
    "scaling_factor": optional(number(0, 1000, above_low=True)),
}


def config_from_diffusers(config: Mapping) -> VAEConfig:
    """VAEConfig from a diffusers `vae/config.json` dict; ValueError (naming the field) for what this VAE can't run."""
    check_fields(config, DIFFUSERS_FIELDS)

    def refuse(field: str, why: str):
        raise ValueError(f"diffusers VAE config: {field}={config.get(field)!r}: {why}")

    widths = list(config.get("block_out_channels", (64,)))
    levels = len(widths)
    for field, wanted in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(config.get(field, (wanted,)))
        if any(t != wanted for t in types):
            refuse(field, f"only {wanted} blocks are supported")
        if len(types) != levels:
            refuse(field, f"expected {levels} entries, one per block_out_channels entry")
    if any(w % widths[0] for w in widths):
        refuse("block_out_channels", "each width must be a multiple of the first")
    if config.get("act_fn", "silu") != "silu":
        refuse("act_fn", "only silu is supported")
    for field in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        if not config.get(field, True):
            refuse(field, "this VAE always has quant_conv, post_quant_conv and mid-block attention")
    # These change how the pipeline normalises latents, which a single scaling_factor can't express.
    for field in ("shift_factor", "latents_mean", "latents_std"):
        if config.get(field) is not None:
            refuse(field, "only a plain scaling_factor is supported for latent normalisation")
    # force_upcast only concerns running in half precision; it changes nothing here.
    scaling = config.get("scaling_factor")  # absent or null in some folders: SD's default then
    cfg = VAEConfig(
        in_channels=config.get("in_channels", 3),
        out_channels=config.get("out_channels", 3),
        latent_channels=config.get("latent_channels", 4),
        base_channels=widths[0],
        channel_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=config.get("layers_per_block", 1),
        norm_groups=config.get("norm_num_groups", 32),
        **({} if scaling is None else {"scaling_factor": float(scaling)}),
    )
    limits.check_vae(cfg)  # what the fields allow one by one may still not build (groups vs widths)
    return cfg


def config_to_diffusers(cfg: VAEConfig, *, sample_size: int) -> dict:
    """A diffusers `vae/config.json` dict for our VAEConfig (the inverse of config_from_diffusers).

    `sample_size` is the image side in pixels the model was trained at.
    """
    levels = len(cfg.channel_mult)
    return {
        "_class_name": "AutoencoderKL",
        "sample_size": sample_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "latent_channels": cfg.latent_channels,
        "block_out_channels": [cfg.base_channels * m for m in cfg.channel_mult],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "layers_per_block": cfg.num_res_blocks,
        "norm_num_groups": cfg.norm_groups,
        "act_fn": "silu",
        "scaling_factor": cfg.scaling_factor,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": True,
    }


def config_from_original(state: Mapping[str, torch.Tensor]) -> VAEConfig:
    """VAEConfig read off an original-layout VAE state dict (`first_stage_model.` stripped).

    GroupNorm's group count and the scaling factor are not in the tensors; they are
    taken as SD's (32, 0.18215).
    """
    needed = (
        "encoder.conv_in.weight",
        "encoder.conv_out.weight",
        "decoder.conv_out.weight",
        "quant_conv.weight",
        "post_quant_conv.weight",
        "encoder.mid.attn_1.q.weight",
    )
    missing = [k for k in needed if k not in state]
    if missing:
        hint = ""
        if any(k.startswith("first_stage_model.") for k in state):
            hint = " (strip the 'first_stage_model.' prefix first)"
        elif any(k.startswith("encoder.down_blocks.") for k in state):
            hint = " (these are diffusers names; use config_from_diffusers / from_diffusers)"
        raise ValueError(f"not an original-layout SD VAE state dict: missing {', '.join(missing)}{hint}")

    levels = count_numbered(state, "encoder.down.")
    num_res_blocks = count_numbered(state, "encoder.down.0.block.")
    if levels == 0 or num_res_blocks == 0:
        raise ValueError("not an original-layout SD VAE state dict: no encoder.down.{i}.block.{j} tensors")
    if any(".attn." in k for k in state if k.startswith(("encoder.down.", "decoder.up."))):
        raise ValueError("VAE has attention inside its resolution levels (attn_resolutions); SD's VAE has none")
    if (
        count_numbered(state, "decoder.up.") != levels
        or count_numbered(state, "decoder.up.0.block.") != num_res_blocks + 1
    ):
        raise ValueError(f"VAE decoder does not mirror the encoder ({levels} levels of {num_res_blocks} blocks)")

    base_channels, in_channels = dims(state, "encoder.conv_in.weight", 4)[:2]
    widths = [dims(state, f"encoder.down.{i}.block.0.conv1.weight", 4)[0] for i in range(levels)]
    if any(w % base_channels for w in widths):
        raise ValueError(f"VAE level widths {widths} are not multiples of conv_in's {base_channels}")
    latent_channels = dims(state, "post_quant_conv.weight", 4)[0]
    if dims(state, "encoder.conv_out.weight", 4)[0] != 2 * latent_channels:
        raise ValueError("VAE encoder.conv_out does not give a mean and log-variance per latent channel")
    return VAEConfig(
        in_channels=in_channels,
        out_channels=dims(state, "decoder.conv_out.weight", 4)[0],
        latent_channels=latent_channels,
        base_channels=base_channels,
        channel_mult=tuple(w // base_channels for w in widths),
        num_res_blocks=num_res_blocks,
    )
