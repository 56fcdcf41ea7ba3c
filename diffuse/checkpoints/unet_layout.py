"""The UNet's checkpoint layouts: the original CompVis/ldm names (ours) and diffusers' names,
and how to read the architecture from either.

Our UNet uses the original names, so a single-file checkpoint needs only its
`model.diffusion_model.` prefix stripped. A diffusers `unet/` folder is renamed module
by module with the tables below; no tensor changes shape (both layouts store the
transformer projections as 1x1 convs for SD1 and as Linear for SD2).

The original numbers its blocks flat: input_blocks.0 is conv_in, then per level
num_res_blocks blocks of [ResBlock, SpatialTransformer?] and one [Downsample]
(not after the last level); output_blocks run num_res_blocks+1 per level, lowest
resolution first, with the Upsample as the block's last layer. diffusers groups the
same modules per level: down_blocks.{level}.resnets.{j} / attentions.{j} /
downsamplers.0, mid_block, up_blocks.{level}.resnets.{j} / attentions.{j} / upsamplers.0.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from diffuse.checkpoints.fields import check_fields, flag, integer, listing, number, one_of, optional, text
from diffuse.checkpoints.keymap import PrefixPairs, child_indices, dims, invert, rename_prefixes
from diffuse.models import configs as limits
from diffuse.models.configs import UNetConfig

# Modules outside the blocks: (diffusers, original).
TOP_LEVEL_PAIRS: PrefixPairs = [
    ("time_embedding.linear_1", "time_embed.0"),
    ("time_embedding.linear_2", "time_embed.2"),
    ("add_embedding.linear_1", "label_emb.0.0"),  # SDXL's vector conditioning y
    ("add_embedding.linear_2", "label_emb.0.2"),
    ("conv_in", "input_blocks.0.0"),
    ("conv_norm_out", "out.0"),
    ("conv_out", "out.2"),
]

# Inside a ResBlock: (diffusers, original). The original wraps its layers in
# Sequentials, hence the indices (SiLU and dropout take the missing ones).
RESNET_PARTS: PrefixPairs = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
]

# Inside a SpatialTransformer every name agrees (norm, proj_in, transformer_blocks.*,
# proj_out), so one pair per transformer renames everything under it.

# The sampler conv: diffusers' name, and the original's name relative to its layer.
DOWNSAMPLE_CONV = ("downsamplers.0.conv", "op")
UPSAMPLE_CONV = ("upsamplers.0.conv", "conv")


def resnet_pairs(diffusers: str, original: str) -> PrefixPairs:
    return [(f"{diffusers}.{d}", f"{original}.{o}") for d, o in RESNET_PARTS]


def diffusers_pairs(cfg: UNetConfig) -> PrefixPairs:
    """(diffusers module prefix, original/our module prefix) for every module of the UNet."""
    levels, n = len(cfg.channel_mult), cfg.num_res_blocks
    pairs = list(TOP_LEVEL_PAIRS)
    for level in range(levels):
        for j in range(n):
            block = 1 + level * (n + 1) + j
            pairs += resnet_pairs(f"down_blocks.{level}.resnets.{j}", f"input_blocks.{block}.0")
            if cfg.attention_levels[level]:
                pairs.append((f"down_blocks.{level}.attentions.{j}", f"input_blocks.{block}.1"))
        if level < levels - 1:
            block = 1 + level * (n + 1) + n
            pairs.append((f"down_blocks.{level}.{DOWNSAMPLE_CONV[0]}", f"input_blocks.{block}.0.{DOWNSAMPLE_CONV[1]}"))

    pairs += resnet_pairs("mid_block.resnets.0", "middle_block.0")
    pairs.append(("mid_block.attentions.0", "middle_block.1"))
    pairs += resnet_pairs("mid_block.resnets.1", "middle_block.2")

    # Both layouts run the up path lowest resolution first: up level u mirrors down level levels-1-u.
    for up in range(levels):
        attention = cfg.attention_levels[levels - 1 - up]
        for j in range(n + 1):
            block = up * (n + 1) + j
            pairs += resnet_pairs(f"up_blocks.{up}.resnets.{j}", f"output_blocks.{block}.0")
            if attention:
                pairs.append((f"up_blocks.{up}.attentions.{j}", f"output_blocks.{block}.1"))
        if up < levels - 1:
            block = up * (n + 1) + n
            position = 2 if attention else 1  # after the ResBlock and, if present, the transformer
            pairs.append((f"up_blocks.{up}.{UPSAMPLE_CONV[0]}", f"output_blocks.{block}.{position}.{UPSAMPLE_CONV[1]}"))
    return pairs


def from_diffusers(state: Mapping[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    return rename_prefixes(state, diffusers_pairs(cfg))


def to_diffusers(state: Mapping[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    return rename_prefixes(state, invert(diffusers_pairs(cfg)))


# diffusers config fields that, set otherwise, describe a network this UNet does not
# build (class labels, other time embeddings or blocks): field -> the values SD 1.x/2.x
# use (diffusers' defaults, which a config may omit), then the ones SDXL adds.
SUPPORTED_VALUES: dict[str, tuple[Any, ...]] = {
    "addition_embed_type": (None, "text_time"),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_cond_proj_dim": (None,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "flip_sin_to_cos": (True,),
    "freq_shift": (0,),
    "center_input_sample": (False,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "mid_block_scale_factor": (1,),
    "mid_block_only_cross_attention": (None, False),
    "dual_cross_attention": (False,),
    "cross_attention_norm": (None,),
    "attention_type": ("default",),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1,),
    "act_fn": ("silu",),
    "downsample_padding": (1,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "reverse_transformer_layers_per_block": (None,),
    "class_embeddings_concat": (False,),
}
DOWN_BLOCKS = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # block type -> has attention


def refuse(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"unsupported diffusers UNet config: {field}={value!r} ({why})")


def uniform(config: Mapping[str, Any], field: str, default: Any) -> Any:
    """The one value of a field that diffusers allows per level (int or list); refuses differing levels."""
    value = config.get(field, default)
    if not isinstance(value, (list, tuple)):
        return value
    flat = [v for item in value for v in (item if isinstance(item, (list, tuple)) else [item])]
    if len(set(flat)) != 1:
        raise refuse(field, value, "this UNet needs the same value at every level")
    return flat[0]


def _per_level(check):  # one value for all levels, or one per level
    return one_of(check, listing(check, 1, limits.MAX_LEVELS))


_CHANNELS = integer(1, limits.MAX_WIDTH)
_IO = integer(1, limits.MAX_IO_CHANNELS)
_BLOCK_TYPES = listing(text(), 1, limits.MAX_LEVELS)
# Every field of `unet/config.json` that config_from_diffusers reads: its type and range,
# checked before any is used (diffuse.checkpoints.fields).
DIFFUSERS_FIELDS = {
    "sample_size": optional(
        one_of(integer(1, limits.MAX_SAMPLE_SIZE), listing(integer(1, limits.MAX_SAMPLE_SIZE), 1, 2))
    ),
    "in_channels": _IO,
    "out_channels": _IO,
    "block_out_channels": listing(_CHANNELS, 1, limits.MAX_LEVELS),
    "down_block_types": _BLOCK_TYPES,
    "up_block_types": _BLOCK_TYPES,
    "layers_per_block": _per_level(integer(1, limits.MAX_RES_BLOCKS)),
    "attention_head_dim": optional(_per_level(integer(1, limits.MAX_HEADS))),
    "num_attention_heads": optional(_per_level(integer(1, limits.MAX_HEADS))),
    "transformer_layers_per_block": _per_level(
        one_of(
            integer(1, limits.MAX_TRANSFORMER_DEPTH),
            listing(integer(1, limits.MAX_TRANSFORMER_DEPTH), 1, limits.MAX_RES_BLOCKS + 1),
        )
    ),
    "cross_attention_dim": _per_level(_CHANNELS),
    "use_linear_projection": optional(flag),
    "only_cross_attention": _per_level(flag),
    "norm_num_groups": optional(_CHANNELS),
    "norm_eps": number(0, 1, above_low=True),
    "time_embedding_dim": optional(integer(1, 4 * limits.MAX_WIDTH)),
    "projection_class_embeddings_input_dim": optional(_CHANNELS),
    "addition_time_embed_dim": optional(integer(2, limits.MAX_WIDTH)),
}


def config_from_diffusers(config: Mapping[str, Any]) -> UNetConfig:
    """Our UNetConfig from a diffusers `unet/config.json` dict; ValueError naming the field it cannot run."""
    check_fields(config, DIFFUSERS_FIELDS)
    for field, allowed in SUPPORTED_VALUES.items():
        if field in config and config[field] not in allowed:
            raise refuse(field, config[field], f"this UNet runs {' or '.join(map(repr, allowed))}")
    if uniform(config, "only_cross_attention", False):
        raise refuse(
            "only_cross_attention", config["only_cross_attention"], "every transformer here has self-attention"
        )
    norm_groups = config.get("norm_num_groups", 32)
    if norm_groups is None:
        raise refuse("norm_num_groups", None, "this UNet normalises with GroupNorm")

    down = list(config.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    up = list(config.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
    for block_type in down:
        if block_type not in DOWN_BLOCKS:
            raise refuse("down_block_types", down, f"{block_type} is not one of {sorted(DOWN_BLOCKS)}")
    if up != [t.replace("Down", "Up") for t in reversed(down)]:
        raise refuse("up_block_types", up, "must mirror down_block_types")

    channels = list(config.get("block_out_channels", [320, 640, 1280, 1280]))
    if len(channels) != len(down) or any(c % channels[0] for c in channels):
        raise refuse("block_out_channels", channels, "one per level, each a multiple of the first")
    if config.get("time_embedding_dim") not in (None, 4 * channels[0]):
        raise refuse("time_embedding_dim", config["time_embedding_dim"], "must be 4 * block_out_channels[0]")

    # diffusers' naming quirk: with num_attention_heads unset, attention_head_dim holds
    # the number of heads (SD1: 8; SD2: [5, 10, 20, 20]), not their width.
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    heads = tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * len(down)
    if len(heads) != len(down):
        raise refuse("attention_head_dim", heads, "one head count per level")

    attention_levels = tuple(DOWN_BLOCKS[t] for t in down)
    cfg = UNetConfig(
        in_channels=config.get("in_channels", 4),
        out_channels=config.get("out_channels", 4),
        model_channels=channels[0],
        channel_mult=tuple(c // channels[0] for c in channels),
        num_res_blocks=uniform(config, "layers_per_block", 2),
        attention_levels=attention_levels,
        heads=heads,
        **transformer_depths(config, attention_levels),
        context_dim=uniform(config, "cross_attention_dim", 1280),
        adm_in_channels=added_embedding_width(config),
        use_linear_projection=bool(config.get("use_linear_projection", False)),
        norm_groups=norm_groups,
        norm_eps=config.get("norm_eps", 1e-5),
    )
    limits.check_unet(cfg)  # what the fields allow one by one may still not build (heads vs widths)
    return cfg


def transformer_depths(config: Mapping[str, Any], attention_levels: tuple[bool, ...]) -> dict[str, Any]:
    """UNetConfig's depth fields from `transformer_layers_per_block`: one depth for all, or one per
    level (SDXL: [1, 2, 10]); the middle block takes the deepest level's entry, as diffusers builds it."""
    value = config.get("transformer_layers_per_block", 1)
    if not isinstance(value, (list, tuple)):
        return {"transformer_depth": value}
    if len(value) != len(attention_levels):
        raise refuse("transformer_layers_per_block", value, "one depth per level")
    per_level = []
    for entry in value:  # an entry may itself list a depth per block of its level
        blocks = set(entry) if isinstance(entry, (list, tuple)) else {entry}
        if len(blocks) != 1:
            raise refuse("transformer_layers_per_block", value, "this UNet needs one depth per level")
        per_level.append(blocks.pop())
    return depth_fields(tuple(d if attends else 0 for d, attends in zip(per_level, attention_levels)), per_level[-1])


def depth_fields(depths: tuple[int, ...], mid: int) -> dict[str, Any]:
    """UNetConfig's depth fields for these per-level depths (0 where a level does not attend) and the
    middle block's, in one form whatever file they come from, so that equal networks compare equal."""
    if set(depths) - {0} <= {mid}:  # one depth everywhere (SD 1.x/2.x)
        return {"transformer_depth": mid}
    # The middle depth is stated only where it is not the deepest level's own (one without attention).
    return {"transformer_depths": depths, "mid_transformer_depth": None if depths[-1] == mid else mid}


def diffusers_depths(cfg: UNetConfig) -> int | list[int]:
    """`transformer_layers_per_block` for our config. diffusers' middle block reads the last entry,
    so the deepest level, where it attends, must have the middle block's depth."""
    if cfg.transformer_depths is None and cfg.mid_transformer_depth in (None, cfg.transformer_depth):
        return cfg.transformer_depth
    last = len(cfg.channel_mult) - 1
    if cfg.attention_levels[last] and cfg.depth(last) != cfg.mid_depth:
        raise ValueError(
            f"diffusers cannot state a middle depth ({cfg.mid_depth}) other than the deepest level's ({cfg.depth(last)})"
        )
    # Levels without attention keep diffusers' 1 there.
    return [cfg.depth(level) or 1 for level in range(last)] + [cfg.mid_depth]


def added_embedding_width(config: Mapping[str, Any]) -> int:
    """adm_in_channels: the width of y that `add_embedding` takes (SDXL's "text_time"), else 0."""
    if config.get("addition_embed_type") != "text_time":
        return 0
    for field in ("projection_class_embeddings_input_dim", "addition_time_embed_dim"):
        if config.get(field) is None:
            raise refuse(field, None, 'addition_embed_type "text_time" needs it')
    if config["addition_time_embed_dim"] % 2:
        raise refuse("addition_time_embed_dim", config["addition_time_embed_dim"], "must be even (cos and sin halves)")
    return config["projection_class_embeddings_input_dim"]


def config_to_diffusers(cfg: UNetConfig, *, sample_size: int, size_embed_dim: int = 0) -> dict[str, Any]:
    """A diffusers `unet/config.json` dict for our UNetConfig (the inverse of config_from_diffusers).

    `sample_size` is the latent side the model was trained at (PipelineConfig.sample_size);
    `size_embed_dim` the width of each size-conditioning sinusoid (PipelineConfig.size_embed_dim),
    which a UNet with vector conditioning (adm_in_channels) needs.
    Every field of SUPPORTED_VALUES is written out with SD's value, so the file states the
    whole architecture instead of leaning on diffusers' defaults.
    """
    down = [next(t for t, attends in DOWN_BLOCKS.items() if attends == a) for a in cfg.attention_levels]
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": sample_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "block_out_channels": [cfg.model_channels * m for m in cfg.channel_mult],
        "layers_per_block": cfg.num_res_blocks,
        "down_block_types": down,
        "up_block_types": [t.replace("Down", "Up") for t in reversed(down)],
        # diffusers' naming quirk again: per-level head COUNTS go in attention_head_dim.
        "attention_head_dim": list(cfg.heads),
        "num_attention_heads": None,
        "transformer_layers_per_block": diffusers_depths(cfg),
        "cross_attention_dim": cfg.context_dim,
        "use_linear_projection": cfg.use_linear_projection,
        "only_cross_attention": False,
        "norm_num_groups": cfg.norm_groups,
        "norm_eps": cfg.norm_eps,
        "time_embedding_dim": None,  # 4 * block_out_channels[0], as config_from_diffusers requires
        **{field: allowed[0] for field, allowed in SUPPORTED_VALUES.items()},
        **added_embedding_config(cfg, size_embed_dim),
    }


def added_embedding_config(cfg: UNetConfig, size_embed_dim: int) -> dict[str, Any]:
    """The config fields of SDXL's `add_embedding` (none for a UNet without vector conditioning)."""
    if not cfg.adm_in_channels:
        return {}
    if not size_embed_dim:
        raise ValueError("a UNet with vector conditioning (adm_in_channels) needs size_embed_dim")
    return {
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": size_embed_dim,
        "projection_class_embeddings_input_dim": cfg.adm_in_channels,
    }


def config_from_original(
    state: Mapping[str, torch.Tensor], *, num_heads: int | None = None, head_dim: int | None = None
) -> UNetConfig:
    """The architecture of an original-layout UNet state dict (prefix already stripped).

    Head counts are not in the weights: pass `num_heads` (the same at every level, SD1: 8)
    or `head_dim` (channels per head, SD2: 64).
    """
    if (num_heads is None) == (head_dim is None):
        raise ValueError("give exactly one of num_heads (SD1: 8) or head_dim (SD2: 64)")
    required = [
        "time_embed.0.weight",
        "input_blocks.0.0.weight",
        "middle_block.1.proj_in.weight",
        "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "out.2.weight",
    ]
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"does not look like a Stable Diffusion UNet: no {', '.join(missing)}")
    label_emb = {k for k in state if k.startswith("label_emb.")}
    if label_emb and "label_emb.0.0.weight" not in label_emb:
        raise ValueError("the UNet has a label_emb other than SDXL's (class labels), which diffuse does not run")

    conv_in = dims(state, "input_blocks.0.0.weight", 4)
    model_channels = conv_in[0]
    inputs = child_indices(state, "input_blocks.")
    downsamples = [i for i in inputs if f"input_blocks.{i}.0.op.weight" in state]
    levels = len(downsamples) + 1
    # Each level is num_res_blocks blocks plus a downsample (but the last), after conv_in.
    num_res_blocks, extra = divmod(len(inputs) - 1 - len(downsamples), levels)
    expected_downsamples = [(level + 1) * (num_res_blocks + 1) for level in range(levels - 1)]
    if extra or num_res_blocks == 0 or downsamples != expected_downsamples or inputs != list(range(len(inputs))):
        raise ValueError(f"input_blocks {inputs} with downsamples at {downsamples} do not form SD's level structure")
    if child_indices(state, "output_blocks.") != list(range(levels * (num_res_blocks + 1))):
        raise ValueError(
            f"expected {levels * (num_res_blocks + 1)} output_blocks for {levels} levels of {num_res_blocks}"
        )

    channel_mult, attention_levels = [], []
    for level in range(levels):
        first = 1 + level * (num_res_blocks + 1)
        channels = dims(state, f"input_blocks.{first}.0.out_layers.3.weight", 4)[0]
        if channels % model_channels:
            raise ValueError(f"level {level} has {channels} channels, not a multiple of {model_channels}")
        channel_mult.append(channels // model_channels)
        attention_levels.append(f"input_blocks.{first}.1.proj_in.weight" in state)

    depths = original_depths(state, attention_levels, num_res_blocks)

    widths = [model_channels * m for m in channel_mult]
    if head_dim is not None and any(w % head_dim for w in widths):
        raise ValueError(f"level widths {widths} are not multiples of head_dim {head_dim}")
    return UNetConfig(
        in_channels=conv_in[1],
        out_channels=dims(state, "out.2.weight", 4)[0],
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        num_res_blocks=num_res_blocks,
        attention_levels=tuple(attention_levels),
        heads=tuple(num_heads if num_heads is not None else w // head_dim for w in widths),
        **depths,
        context_dim=dims(state, "middle_block.1.transformer_blocks.0.attn2.to_k.weight", 2)[1],
        adm_in_channels=dims(state, "label_emb.0.0.weight", 2)[1] if label_emb else 0,
        # SD2 stores the transformer's in/out projections as Linear [C, C], SD1 as 1x1 conv [C, C, 1, 1].
        use_linear_projection=state["middle_block.1.proj_in.weight"].ndim == 2,
    )


def original_depths(
    state: Mapping[str, torch.Tensor], attention_levels: list[bool], num_res_blocks: int
) -> dict[str, Any]:
    """The depth fields from the transformer_blocks each SpatialTransformer holds: one depth per
    level, the same in the down and up path (SDXL: 0, 2, 10), and the middle block's."""
    depth_of: dict[str, int] = {}
    for key in state:
        if m := re.match(r"^(.*)\.transformer_blocks\.(\d+)\.", key):
            depth_of[m.group(1)] = max(depth_of.get(m.group(1), 0), int(m.group(2)) + 1)
    levels, n = len(attention_levels), num_res_blocks
    per_level: list[set[int]] = [set() for _ in range(levels)]
    for prefix, depth in depth_of.items():
        if m := re.match(r"^input_blocks\.(\d+)\.1$", prefix):
            per_level[(int(m.group(1)) - 1) // (n + 1)].add(depth)
        elif m := re.match(r"^output_blocks\.(\d+)\.1$", prefix):
            per_level[levels - 1 - int(m.group(1)) // (n + 1)].add(depth)
        elif prefix != "middle_block.1":
            raise ValueError(f"transformer blocks under {prefix}, where no SpatialTransformer belongs")
    if any(len(found) > 1 for found in per_level):
        raise ValueError(f"transformer depths differ within a level ({[sorted(f) for f in per_level]})")
    depths = tuple(found.pop() if found and attends else 0 for found, attends in zip(per_level, attention_levels))
    return depth_fields(depths, depth_of.get("middle_block.1", 0))
