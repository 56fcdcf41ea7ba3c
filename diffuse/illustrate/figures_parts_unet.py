"""The UNet from inside, drawn from the loaded network's own modules and config.

Two panels, as the article draws it: first the ResNet blocks, down/up sampling and skip
connections alone, then with the attention layers between the ResNet blocks, through
which the text encoder's output enters (cross-attention). Each level is labelled with
this model's channels and the latent size it works at for this run's image size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.patches import Patch, Rectangle
from torch import nn

from diffuse.illustrate.figure import Figure, pyplot, save
from diffuse.illustrate.recording import Recording
from diffuse.models.unet import Downsample, ResBlock, SpatialTransformer, Upsample
from diffuse.pipeline import Pipeline

COLOURS = {"conv": "#9e9e9e", "resnet": "#4c78a8", "attention": "#f58518", "down": "#54a24b", "up": "#b279a2"}
NAMES = {
    "conv": "conv",
    "resnet": "ResNet block",
    "attention": "attention (text enters)",
    "down": "downsample",
    "up": "upsample",
}


@dataclass
class Block:
    """One of the UNet's blocks: where it runs and the layers it holds, in order."""

    path: str  # "in", "middle" or "out"
    level: int  # the level (resolution) of the block's output
    layers: list[str] = field(default_factory=list)  # kinds from COLOURS
    channels: int = 0  # output channels


def layer_kind(layer: nn.Module) -> str:
    if isinstance(layer, ResBlock):
        return "resnet"
    if isinstance(layer, SpatialTransformer):
        return "attention"
    if isinstance(layer, Downsample):
        return "down"
    if isinstance(layer, Upsample):
        return "up"
    return "conv"


def out_channels(layer: nn.Module, channels: int) -> int:
    """The channels after `layer`, given those before it (only a conv or a ResNet block changes them)."""
    if isinstance(layer, ResBlock):
        return layer.in_layers[2].out_channels
    if isinstance(layer, nn.Conv2d):
        return layer.out_channels
    return channels


def unet_blocks(unet: nn.Module) -> list[Block]:
    """The blocks of the down path, the middle and the up path, read off the modules."""
    blocks, level, channels = [], 0, 0
    for path, group in (("in", unet.input_blocks), ("middle", [unet.middle_block]), ("out", unet.output_blocks)):
        for block in group:
            kinds = [layer_kind(layer) for layer in block]
            for layer in block:
                channels = out_channels(layer, channels)
            blocks.append(Block(path, level + kinds.count("down") if path == "in" else level, kinds, channels))
            level = blocks[-1].level - (1 if "up" in kinds else 0)
    blocks.append(Block("end", 0, ["conv"], unet.out[-1].out_channels))  # GroupNorm, SiLU, conv to the prediction
    return blocks


def level_sizes(height: int, width: int, levels: int) -> list[tuple[int, int]]:
    """The latent (h, w) at each level: a stride-2 conv with padding 1 takes a side s to ceil(s / 2)."""
    sizes = [(height, width)]
    for _ in range(levels - 1):
        h, w = sizes[-1]
        sizes.append((math.ceil(h / 2), math.ceil(w / 2)))
    return sizes


def skip_pairs(blocks: list[Block]) -> list[tuple[int, int]]:
    """(down-path block, up-path block) index pairs: each up block takes the last skip not yet taken."""
    stack, pairs = [], []
    for i, block in enumerate(blocks):
        if block.path == "in":
            stack.append(i)
        elif block.path == "out":
            pairs.append((stack.pop(), i))
    return pairs


def draw_unet(ax, blocks: list[Block], labels: list[str], context: str, io: tuple[str, str], attention: bool) -> None:
    """The blocks left to right, each level one row lower; skips as brackets above; text lines to attention."""
    x, ends, attention_boxes = 0.0, [], []
    for block in blocks:
        first = x
        for kind in block.layers:
            if kind == "attention" and not attention:
                continue
            ax.add_patch(Rectangle((x, -block.level - 0.15), 0.8, 0.3, color=COLOURS[kind]))
            if kind == "attention":
                attention_boxes.append((x + 0.4, -block.level + 0.15))
            x += 1.0
        ends.append((first + 0.4, x - 0.6, -block.level))
        x += 0.3
    xs = [p for start, end, _ in ends for p in (start, end)]
    ax.plot(xs, [y for _, _, y in ends for _ in (0, 1)], color="black", linewidth=0.6, zorder=0)
    skips = skip_pairs(blocks)
    for i, j in skips:
        # Skips nested inside this one at its level lie lower, so the brackets never cross.
        depth = sum(1 for a, b in skips if a > i and b < j and blocks[a].level == blocks[i].level)
        rise = 0.22 + 0.08 * depth
        _, x0, y = ends[i]
        x1 = ends[j][0]
        ax.plot(
            [x0, x0, x1, x1], [y + 0.15, y + rise, y + rise, y + 0.15], color="#777777", linewidth=0.6, linestyle="--"
        )
    middle = [end for block, end in zip(blocks, ends) if block.path == "middle"][0]
    ax.text((middle[0] + middle[1]) / 2, middle[2] - 0.3, "middle", ha="center", va="top", fontsize=7)
    ax.text(ends[0][0], -0.3, io[0], ha="left", va="top", fontsize=7)
    ax.text(ends[-1][1], -0.3, io[1], ha="right", va="top", fontsize=7)
    for level, label in enumerate(labels):
        ax.text(-0.6, -level, label, ha="right", va="center", fontsize=7)
    if attention:
        top = 0.9
        ax.text(x / 2, top + 0.15, context, ha="center", va="bottom", fontsize=7, color=COLOURS["attention"])
        for bx, by in attention_boxes:
            ax.plot([x / 2, bx], [top, by], color=COLOURS["attention"], linewidth=0.4, alpha=0.5)
    levels = max(block.level for block in blocks) + 1
    ax.set_xlim(-0.5, x)
    ax.set_ylim(-levels + 0.4, 1.3 if attention else 0.9)
    ax.axis("off")


def level_table(pipe: Pipeline, rec: Recording) -> list[dict]:
    cfg, factor = pipe.unet.cfg, pipe.config.vae.downsample_factor
    sizes = level_sizes(rec.height // factor, rec.width // factor, len(cfg.channel_mult))
    return [
        {
            "level": level,
            "channels": cfg.model_channels * mult,
            "latent_size": list(sizes[level]),
            "attention": bool(cfg.attention_levels[level]),
            "heads": cfg.heads[level] if cfg.attention_levels[level] else 0,
            "resnet_blocks": [cfg.num_res_blocks, cfg.num_res_blocks + 1],  # down path, up path
        }
        for level, mult in enumerate(cfg.channel_mult)
    ]


def unet(pipe: Pipeline, rec: Recording, out: Path) -> Figure:
    cfg, blocks = pipe.unet.cfg, unet_blocks(pipe.unet)
    table = level_table(pipe, rec)
    labels = [f"{row['channels']} ch, {row['latent_size'][0]}×{row['latent_size'][1]}" for row in table]
    positions = (pipe.config.text_encoder or pipe.config.text_encoder_2).max_length  # the refiner has bigG alone
    context_shape = f"{positions}×{cfg.context_dim}"
    context = f"text: {context_shape} (the text encoder's output)"
    layers = sum(len(b.layers) for b in blocks)
    fig, axes = pyplot.subplots(2, 1, figsize=(max(8.0, 0.17 * layers + 2), 2.4 + 1.1 * len(table)))
    latent = f"{cfg.in_channels}×{table[0]['latent_size'][0]}×{table[0]['latent_size'][1]}"
    io = (f"noisy latent {latent}, timestep t", f"noise prediction {cfg.out_channels}×{latent.split('×', 1)[1]}")
    draw_unet(axes[0], blocks, labels, context, io, attention=False)
    axes[0].set_title("Without text: ResNet blocks, down/up sampling, skip connections (dashed)", fontsize=8)
    draw_unet(axes[1], blocks, labels, context, io, attention=True)
    axes[1].set_title("With attention layers between the ResNet blocks: the text enters by cross-attention", fontsize=8)
    kinds = [kind for kind in COLOURS if any(kind in b.layers for b in blocks)]
    fig.legend(
        handles=[Patch(color=COLOURS[k], label=NAMES[k]) for k in kinds],
        loc="lower center",
        ncol=len(kinds),
        fontsize=7,
    )
    name = save(fig, out, "unet.png")
    count = {kind: sum(b.layers.count(kind) for b in blocks) for kind in COLOURS}
    cross = sum(len(m.transformer_blocks) for m in pipe.unet.modules() if isinstance(m, SpatialTransformer))
    parameters = sum(p.numel() for p in pipe.unet.parameters())
    levels = "; ".join(
        f"level {row['level']}: {row['channels']} channels at {row['latent_size'][0]}×{row['latent_size'][1]}"
        + ("" if row["attention"] else " (no attention)")
        for row in table
    )
    # SDXL's vector y goes through label_emb into the same embedding as the timestep.
    told_y = f" with the vector y [{cfg.adm_in_channels}], embedded, added to it" if cfg.adm_in_channels else ""
    caption = (
        f"This model's UNet ({parameters / 1e6:.1f} M parameters): {levels}. "
        f"{count['resnet']} ResNet blocks, each told the timestep{told_y}, and {count['attention']} attention blocks "
        f"holding {cross} cross-attention layers, through which the {context_shape} text "
        f"encoding enters; {len(skip_pairs(blocks))} skip connections join the down path to the up path."
    )
    numbers = {
        "levels": table,
        "resnet_blocks": count["resnet"],
        "attention_blocks": count["attention"],
        "cross_attention_layers": cross,
        "skip_connections": len(skip_pairs(blocks)),
        "context_shape": [positions, cfg.context_dim],
        "parameters": parameters,
    }
    return Figure("unet", name, caption, numbers)
