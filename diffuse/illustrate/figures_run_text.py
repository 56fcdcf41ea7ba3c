"""The run's figures of the three components and of the text: the parts with this run's shapes and
times, the prompt's 77 token positions, and the text as vectors (token embeddings, encoder output)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from matplotlib import pyplot
from matplotlib.patches import FancyBboxPatch, Patch

from diffuse.illustrate.figure import Figure, save
from diffuse.illustrate.recording import Recording

END_OF_WORD = "</w>"
LONGEST_LABEL = 16  # characters of a token that fit in its cell and title
PADDING_SHOWN = 3  # padding positions drawn before the rest are summed up in a note
CELLS_PER_ROW = 10
LISTED_TOKENS = 16  # a caption names this many of a long prompt's tokens
MAX_CHANNELS = 256  # wider encoders show their first channels only, so a column stays a visible stripe

ROLE_COLOURS = {"start": "#b7e4c7", "prompt": "#a9d6f5", "end": "#f5b7b1", "padding": "#e5e5e5"}


def token_label(token: str) -> str:
    """A token as a reader recognizes it: the word-end mark the BPE vocabulary carries left off."""
    word = token.removesuffix(END_OF_WORD)
    word = word if word.strip() else repr(word)
    return word if len(word) <= LONGEST_LABEL else word[: LONGEST_LABEL - 1] + "…"


def shape_text(shape: list[int]) -> str:
    return "[" + ", ".join(str(n) for n in shape) + "]"


def _seconds(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


# ---- components ---------------------------------------------------------------------------------


def _box(ax, x: float, y: float, w: float, h: float, title: str, lines: list[str], colour: str) -> None:
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.08", fc=colour, ec="#333333", lw=1.2))
    ax.text(x + w / 2, y + h * 0.7, title, ha="center", va="center", fontsize=10, weight="bold")
    ax.text(x + w / 2, y + h * 0.32, "\n".join(lines), ha="center", va="center", fontsize=7.5)


def _arrow(ax, start: tuple[float, float], end: tuple[float, float], label: str) -> None:
    """An arrow with its label above the middle (a horizontal arrow) or under its start (a vertical one)."""
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="-|>", lw=1.4, color="#333333"))
    if start[1] == end[1]:
        ax.text((start[0] + end[0]) / 2, start[1] + 0.12, label, ha="center", va="bottom", fontsize=7)
    else:
        ax.text(start[0], start[1] - 0.08, label, ha="center", va="top", fontsize=7)


def encoder_lines(pipe) -> list[str]:
    """Each text encoder's depth and width, one line each (SDXL has two, side by side in the context)."""
    encoders = [e for e in (pipe.config.text_encoder, pipe.config.text_encoder_2) if e is not None]
    return [f"{e.layers} layers, width {e.width}" for e in encoders]


def components(pipe, rec: Recording, out: Path) -> Figure:
    """Text encoder -> UNet x steps -> VAE decoder, with the tensors' shapes on the arrows and the times in the boxes."""
    shapes, times, cfg = rec.shapes, rec.timings, pipe.config
    steps = len(rec.step_records)
    per_step = times["unet"] / max(steps, 1)
    fig, ax = pyplot.subplots(figsize=(12, 3.6))
    ax.set_xlim(0, 14)
    ax.set_ylim(-0.5, 3.5)
    ax.set_aspect("equal")
    ax.axis("off")
    prompt = textwrap.shorten(rec.prompt, 90, placeholder=" …")
    ax.text(1.05, 1.9, "“" + "\n".join(textwrap.wrap(prompt, 20)) + "”", ha="center", va="center", fontsize=8.5)
    ax.text(1.05, 0.95, "prompt", ha="center", va="center", fontsize=7, color="#555555")
    encoders = encoder_lines(pipe)
    title = "Text encoder" if len(encoders) == 1 else f"{len(encoders)} text encoders"
    _box(ax, 3.0, 1.2, 2.0, 1.4, title, [*encoders, _seconds(times["text_encoder"])], "#d8f3dc")
    unet_lines = [f"{steps} steps of {rec.sampler}", f"{_seconds(times['unet'])} ({_seconds(per_step)} a step)"]
    _box(ax, 6.4, 1.2, 2.4, 1.4, f"UNet × {steps}", unet_lines, "#dbe9f6")
    vae_lines = [
        f"{cfg.vae.latent_channels} channels → RGB, ×{cfg.vae.downsample_factor}",
        _seconds(times["vae_decode"]),
    ]
    _box(ax, 10.2, 1.2, 2.0, 1.4, "VAE decoder", vae_lines, "#fde2e4")
    _arrow(ax, (2.15, 1.9), (2.9, 1.9), "ids\n" + shape_text(shapes["token_ids"]))
    vector = f"\ny {shape_text(shapes['vector'])}" if "vector" in shapes else ""
    _arrow(ax, (5.1, 1.9), (6.3, 1.9), "context\n" + shape_text(shapes["context"]) + vector)
    _arrow(ax, (8.9, 1.9), (10.1, 1.9), "latents\n" + shape_text(shapes["latents"]))
    _arrow(ax, (7.6, 0.1), (7.6, 1.1), f"noise {shape_text(shapes['latents'])}, seed {rec.seed}")
    loop = dict(arrowstyle="-|>", connectionstyle="arc3,rad=-0.6", color="#333333")
    ax.annotate("", xy=(8.4, 2.72), xytext=(6.8, 2.72), arrowprops=loop)
    update = "x ← step(x, unet(x, t, context, y))" if "vector" in shapes else "x ← step(x, unet(x, t, context))"
    ax.text(7.6, 3.45, update, ha="center", va="top", fontsize=7, family="monospace")
    ax.imshow(np.asarray(rec.image.convert("RGB")), extent=(12.75, 13.95, 1.3, 2.5))
    _arrow(ax, (12.3, 1.9), (12.7, 1.9), "")
    ax.text(13.35, 1.15, "image " + shape_text(shapes["image"]), ha="center", va="top", fontsize=7)
    ax.text(13.95, -0.45, f"{_seconds(times['total'])} in all", ha="right", va="bottom", fontsize=8, color="#555555")
    made = f"a context {shape_text(shapes['context'])}"
    if len(encoders) > 1:
        made = f"{made} (their outputs side by side)"
    if "vector" in shapes:
        made = f"{made} and a vector y {shape_text(shapes['vector'])} (pooled text and size conditioning)"
    caption = (
        f"The prompt became token ids {shape_text(shapes['token_ids'])}, the {title.lower()} turned them into "
        f"{made} in {_seconds(times['text_encoder'])}, the UNet ran {steps} steps of "
        f"{rec.sampler} on latents {shape_text(shapes['latents'])} in {_seconds(times['unet'])} "
        f"({_seconds(per_step)} a step), and the VAE decoder painted the image {shape_text(shapes['image'])} in "
        f"{_seconds(times['vae_decode'])}; {_seconds(times['total'])} in all."
    )
    numbers = {"shapes": dict(shapes), "timings": dict(times), "seconds_per_step": per_step}
    return Figure("components", save(fig, out, "components.png"), caption, numbers)


# ---- tokens -------------------------------------------------------------------------------------


def token_roles(rec: Recording) -> list[str]:
    """Each of the 77 positions' role: start, prompt, end or padding."""
    n = rec.text.prompt_length
    return ["start"] + ["prompt"] * n + ["end"] + ["padding"] * (len(rec.text.ids) - n - 2)


def tokens(pipe, rec: Recording, out: Path) -> Figure:
    """The 77 positions as a grid of cells: position, token, id; padding past a few cells summed up in a note."""
    text, roles = rec.text, token_roles(rec)
    shown = min(len(text.ids), text.prompt_length + 2 + PADDING_SHOWN)
    rows = -(-shown // CELLS_PER_ROW)
    fig, ax = pyplot.subplots(figsize=(12, 0.95 * rows + 0.9))
    ax.set_xlim(0, CELLS_PER_ROW)
    ax.set_ylim(rows + 0.7, 0)
    ax.axis("off")
    for position in range(shown):
        x, y = position % CELLS_PER_ROW, position // CELLS_PER_ROW
        ax.add_patch(
            FancyBboxPatch((x + 0.05, y + 0.08), 0.9, 0.84, boxstyle="round,pad=0.0", fc=ROLE_COLOURS[roles[position]])
        )
        ax.text(x + 0.1, y + 0.2, str(position), fontsize=6.5, color="#555555", va="center")
        ax.text(x + 0.5, y + 0.5, token_label(text.tokens[position]), fontsize=8, ha="center", va="center")
        ax.text(x + 0.5, y + 0.8, str(text.ids[position]), fontsize=7, ha="center", va="center", family="monospace")
    padding = len(text.ids) - text.prompt_length - 2
    hidden = len(text.ids) - shown
    note = f"positions {shown}–{len(text.ids) - 1}: {hidden} more padding (id {text.ids[-1]})" if hidden else ""
    handles = [Patch(fc=colour, ec="none", label=role) for role, colour in ROLE_COLOURS.items()]
    ax.legend(handles=handles, loc="lower left", ncol=4, fontsize=8, frameon=False, bbox_to_anchor=(0, 0))
    ax.text(CELLS_PER_ROW, rows + 0.4, note, fontsize=8, ha="right", va="center")
    listed = [f"{token_label(t)} ({i})" for t, i in zip(text.tokens[1:], text.ids[1 : text.prompt_length + 1])]
    if len(listed) > LISTED_TOKENS:
        listed = listed[: LISTED_TOKENS - 2] + ["…"] + listed[-2:]
    rest = (
        f"the other {padding} of the {len(text.ids)} positions are padding (id {text.ids[-1]})"
        if padding
        else "no position is left for padding"
    )
    chunks = rec.shapes["context"][1] // len(text.ids)
    shown_part = f"The prompt's first of {chunks} chunks is" if chunks > 1 else "The prompt is"
    reader = "the text encoder" if rec.text_2 is None else "each text encoder"
    caption = (
        f"{shown_part} {text.prompt_length} tokens, {', '.join(listed)}, between the start token ({text.ids[0]}) "
        f"and the end token ({text.ids[text.prompt_length + 1]}); {rest}, and {reader} reads all "
        f"{len(text.ids)}."
    )
    numbers = {
        "ids": list(text.ids),
        "prompt_length": text.prompt_length,
        "padding": padding,
        "pad_id": text.ids[-1] if padding else None,
        "chunks": chunks,
    }
    if rec.text_2 is not None:
        caption += " " + second_tokenizer_note(rec)
        numbers["ids_2"] = list(rec.text_2.ids)
    return Figure("tokens", save(fig, out, "tokens.png"), caption, numbers)


def second_tokenizer_note(rec: Recording) -> str:
    """What SDXL's second tokenizer gave for the same prompt: the same ids up to the end token, its own padding."""
    first, second = rec.text, rec.text_2
    used = first.prompt_length + 2
    same = "the same ids" if second.ids[:used] == first.ids[:used] else "other ids"
    padding = f" and pads with id {second.ids[-1]}" if len(second.ids) > used else ""
    return f"The second text encoder's tokenizer gives {same} up to the end token{padding}."


# ---- embeddings ---------------------------------------------------------------------------------


def embeddings(pipe, rec: Recording, out: Path) -> Figure:
    """Token embeddings and the encoder's output as heat maps, positions x channels, for the prompt's positions;
    one row per text encoder (SDXL's two)."""
    texts = [rec.text] if rec.text_2 is None else [rec.text, rec.text_2]
    rows = rec.text.prompt_length + 2
    labels = [f"{p} {token_label(t)}" for p, t in enumerate(rec.text.tokens[:rows])]
    fig, axes = pyplot.subplots(
        len(texts), 2, figsize=(12, (1.2 + 0.28 * rows) * len(texts)), squeeze=False, sharey=True
    )
    fig.subplots_adjust(hspace=0.5)
    sentences, numbers = [], {"positions": rows}
    for n, (text, row) in enumerate(zip(texts, axes)):
        which = "" if len(texts) == 1 else f" {n + 1}"
        parts = [("token embeddings (table rows)", text.token_embeddings), ("output (context)", text.output)]
        ranges = [
            _heat_map(fig, ax, f"text encoder{which}: {title}", values[:rows])
            for ax, (title, values) in zip(row, parts)
        ]
        row[0].set_yticks(range(rows), labels, fontsize=7)  # shared with the right-hand panel
        width = text.output.shape[1]
        channels = min(width, MAX_CHANNELS)
        subset = f"the first {channels} of {width} channels" if channels < width else f"all {width} channels"
        (emb_lo, emb_hi), (out_lo, out_hi) = ranges
        sentences.append(
            f"text encoder{which} over {subset}: token embeddings from {emb_lo:.2f} to {emb_hi:.2f} (left) and its "
            f"output, what the UNet attends to, from {out_lo:.2f} to {out_hi:.2f} (right)"
        )
        suffix = "" if n == 0 else f"_{n + 1}"
        numbers |= {
            f"channels_shown{suffix}": channels,
            f"width{suffix}": width,
            f"token_embedding_range{suffix}": list(ranges[0]),
            f"output_range{suffix}": list(ranges[1]),
        }
    caption = (
        f"The {rows} positions of the start token, the prompt's {rec.text.prompt_length} tokens and the end token; "
        + "; ".join(sentences)
        + ("" if len(texts) == 1 else "; the UNet's context is the two outputs side by side")
        + "."
    )
    return Figure("embeddings", save(fig, out, "embeddings.png"), caption, numbers)


def _heat_map(fig, ax, title: str, values) -> tuple[float, float]:
    """Positions x channels (the first MAX_CHANNELS), coloured symmetrically about 0; the shown range."""
    width = values.shape[1]
    channels = min(width, MAX_CHANNELS)
    shown = values[:, :channels].float().numpy()
    limit = float(np.abs(shown).max()) or 1.0
    image = ax.imshow(shown, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("channel" + (f" (first {channels} of {width})" if channels < width else ""), fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.04)
    return float(shown.min()), float(shown.max())
