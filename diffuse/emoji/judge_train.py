"""Training the emoji judge (diffuse.emoji.judge) and measuring it on held-out renders.

The network sees what judge.read gives it: a picture's square crop, CROP_MARGIN around its
drawn part, at CROP_SIZE. Training crops are made in torch, a batch at a time, from the
catalogue's 64 px pictures: each picture placed with a little scale and shift (a blob's box is
never exact), over one of the world's backgrounds or a random colour, brought down to the
pixels it would cover in a scene (14 to 72: a small picture at 64 px is a ~17 px crop, a large
one at 128 px ~54; larger crops hold no more than the 64 px source) and on to CROP_SIZE, then,
for some, blurred, softened the way a VAE decoder softens, colour-jittered and noised, so
generated images still read.

The report reads whole scenes through judge.read, as the evaluation will: each name rendered
alone at both sizes, at a random cell, on a background it stands out on, from a generator
seeded apart from training's; clean, and again blurred, noised and JPEG-compressed.
"""

from __future__ import annotations

import io
import math
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import nn

from diffuse.emoji.catalogue import EVALUATED_CATEGORIES, PICTURE_SIZE, load_catalogue
from diffuse.emoji.scenes import (
    BACKGROUNDS,
    POSITIONS,
    SIZES,
    Picture,
    PictureCache,
    Scene,
    backgrounds_for,
    cell_centre,
    render,
)

CROP_SIZE = 24  # the network's input side: a small picture at 64 px (a 17 px crop) already fills it
CROP_MARGIN = 1.2  # a crop's side over its blob's longer side, so the outline is inside
WIDTHS = (32, 48, 96, 192)
REPORT_FILE = "report.json"
MEASURED = ("top1", "position", "size")  # of a one-picture render's first reading, as the evaluation scores
DRAWN_ALPHA = 0.25  # a pixel counts as drawn (for a picture's bounds) from this opacity
SMALLEST_CROP, LARGEST_CROP = 14, 72  # crop sides in scene pixels a training crop is brought down to
GROUPS = 4  # parts of a batch, each brought to its own crop side
POSITION_JITTER, BORDER_MARGIN = 0.02, 0.03  # as the dataset places pictures (diffuse.emoji.data)


class Judge(Protocol):
    def read(self, image: Image.Image) -> list: ...


@dataclass(frozen=True)
class TrainSettings:
    steps: int | None = None  # stop after this many steps, or
    minutes: float | None = None  # after this long (the learning rate follows the elapsed share)
    batch: int = 128
    learning_rate: float = 3e-3
    seed: int = 0
    widths: tuple[int, ...] = WIDTHS
    # How often crops are degraded: 1 gives each degradation its usual share, 2 doubles the shares
    # (at most all crops), for a judge of worn generated images; 0 trains on clean crops only.
    degrade: float = 1.0

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.minutes is None):
            raise ValueError("give the judge's training either steps or minutes")
        if self.steps is not None and (not isinstance(self.steps, int) or not 1 <= self.steps <= 10**7):
            raise ValueError(f"steps must be an integer from 1 to 10^7, got {self.steps!r}")
        if self.minutes is not None and not 0 < self.minutes <= 24 * 60:
            raise ValueError(f"minutes must be above 0 and at most a day, got {self.minutes!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not 0 < self.learning_rate <= 1:
            raise ValueError(f"learning_rate must be above 0 and at most 1, got {self.learning_rate!r}")
        if not 0 <= self.degrade <= 4:
            raise ValueError(f"degrade must be from 0 to 4, got {self.degrade!r}")
        if not isinstance(self.batch, int) or not 2 <= self.batch <= 4096:
            raise ValueError(f"batch must be an integer from 2 to 4096, got {self.batch!r}")


class PictureBank:
    """Every name's picture (the first record of a name) as premultiplied RGBA [N, 4, 64, 64] in [0, 1]."""

    def __init__(self, folder: str | Path) -> None:
        self.cache = PictureCache(folder, load_catalogue(folder))
        self.names = list(self.cache.emoji)
        pictures = np.stack([np.asarray(self.cache.rgba(n), dtype=np.float32) / 255 for n in self.names])
        rgba = torch.from_numpy(pictures).permute(0, 3, 1, 2)
        self.pictures = torch.cat([rgba[:, :3] * rgba[:, 3:], rgba[:, 3:]], dim=1)
        self.bounds = [drawn_bounds(alpha) for alpha in pictures[..., 3]]

    def category(self, name: str) -> str:
        return self.cache.record(name).category


def drawn_bounds(alpha: np.ndarray) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a picture's drawn part, fractions of its square (the whole square if none)."""
    ys, xs = np.nonzero(alpha >= DRAWN_ALPHA)
    if not len(xs):
        return (0.0, 0.0, 1.0, 1.0)
    side = alpha.shape[0]
    return (xs.min() / side, ys.min() / side, (xs.max() + 1) / side, (ys.max() + 1) / side)


class JudgeNet(nn.Module):
    """Conv blocks (3x3 convs, each block but the last halving the side), a global average pool and a
    linear layer over the names."""

    def __init__(self, classes: int, widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        self.widths = tuple(widths)
        layers, channels = [], 3
        for i, width in enumerate(widths):
            for _ in range(2 if 0 < i < len(widths) - 1 else 1):  # one conv at the full and the last side
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
                channels = width
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.classify = nn.Linear(channels, classes)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """crops [B, 3, CROP_SIZE, CROP_SIZE] in [-1, 1] -> logits [B, classes]."""
        return self.classify(self.features(crops).mean(dim=(2, 3)))


# ---------------------------------------------------------------- training crops


def training_crops(
    bank: PictureBank, classes: torch.Tensor, rng: torch.Generator, degrade: float = 1.0
) -> torch.Tensor:
    """Crops [B, 3, CROP_SIZE, CROP_SIZE] in [-1, 1] of the pictures `classes` names, as read would
    cut them; `degrade` scales how many are blurred, softened, jittered and noised (TrainSettings)."""
    framed = _framed(bank, classes, rng)  # [B, 4, 64, 64] premultiplied, in the crop's frame
    images = framed[:, :3] + (1 - framed[:, 3:]) * _backgrounds(len(classes), rng)
    parts = []
    for part in images.chunk(GROUPS):
        side = round(math.exp(_uniform(rng, 1, math.log(SMALLEST_CROP), math.log(LARGEST_CROP)).item()))
        part = F.interpolate(part, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        part = torch.round(part.clamp(0, 1) * 255) / 255  # 8-bit pixels, as an image holds them
        parts.append(F.interpolate(part, size=(CROP_SIZE,) * 2, mode="bilinear", antialias=True, align_corners=False))
    crops = torch.cat(parts)
    if degrade > 0:
        crops = _degrade(crops, rng, degrade)
    return crops.clamp(0, 1) * 2 - 1


def _uniform(rng: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=rng)


def _framed(bank: PictureBank, classes: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Each picture resampled into its crop's frame: its drawn bounds' square times CROP_MARGIN,
    rescaled and shifted a little as a blob's box would be."""
    n = len(classes)
    bounds = torch.tensor([bank.bounds[i] for i in classes.tolist()])
    centre = (bounds[:, :2] + bounds[:, 2:]) / 2
    side = (bounds[:, 2:] - bounds[:, :2]).max(dim=1).values * CROP_MARGIN
    side = side * torch.exp(_uniform(rng, n, -0.1, 0.12))
    centre = centre + (torch.rand(n, 2, generator=rng) - 0.5) * 0.14 * side[:, None]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = side
    theta[:, :, 2] = centre * 2 - 1
    grid = F.affine_grid(theta, [n, 4, PICTURE_SIZE, PICTURE_SIZE], align_corners=False)
    return F.grid_sample(bank.pictures[classes], grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _backgrounds(n: int, rng: torch.Generator) -> torch.Tensor:
    """[n, 3, 64, 64]: a slice of one of the world's backgrounds (a crop spans a fifth to half of
    the image's height), or a random colour, plain or graded."""
    ends = torch.tensor(list(BACKGROUNDS.values()), dtype=torch.float32) / 255  # [K, 2, 3]
    chosen = ends[torch.randint(len(ends), (n,), generator=rng)]
    random_colours = torch.rand(n, 2, 3, generator=rng)
    random_colours[:, 1] = random_colours[:, 0] + (torch.rand(n, 3, generator=rng) - 0.5) * 0.3
    chosen = torch.where((torch.rand(n, generator=rng) < 0.25)[:, None, None], random_colours, chosen)
    start = torch.rand(n, generator=rng) * 0.7
    span = _uniform(rng, n, 0.2, 0.5)
    rows = torch.linspace(0, 1, PICTURE_SIZE)
    t = (start[:, None] + span[:, None] * rows).clamp(0, 1)  # [n, 64]
    colour = chosen[:, 0, :, None] * (1 - t[:, None]) + chosen[:, 1, :, None] * t[:, None]  # [n, 3, 64]
    return colour.clamp(0, 1)[..., None].expand(n, 3, PICTURE_SIZE, PICTURE_SIZE)


def _degrade(crops: torch.Tensor, rng: torch.Generator, strength: float) -> torch.Tensor:
    """Blur, a VAE-like softening, colour jitter and noise, each to a random share of the crops."""
    n = len(crops)

    def some(p: float) -> torch.Tensor:
        return (torch.rand(n, generator=rng) < min(1.0, p * strength))[:, None, None, None]

    sigma = _uniform(rng, n, 0.3, 1.0)
    taps = torch.exp(-(torch.arange(-1.0, 2.0)[None] ** 2) / (2 * sigma[:, None] ** 2))
    taps = taps / taps.sum(dim=1, keepdim=True)  # [n, 3]
    kernel = (taps[:, :, None] * taps[:, None, :]).repeat_interleave(3, dim=0)[:, None]  # [3n, 1, 3, 3]
    padded = F.pad(crops.reshape(1, 3 * n, CROP_SIZE, CROP_SIZE), (1, 1, 1, 1), mode="replicate")
    blurred = F.conv2d(padded, kernel, groups=3 * n).reshape_as(crops)
    crops = torch.where(some(0.4), blurred, crops)
    half = F.interpolate(crops, scale_factor=0.5, mode="bilinear", antialias=True, align_corners=False)
    crops = torch.where(some(0.25), F.interpolate(half, size=(CROP_SIZE,) * 2, mode="bilinear"), crops)
    mean = crops.mean(dim=(1, 2, 3), keepdim=True)
    grey = crops.mean(dim=1, keepdim=True)
    jittered = grey + (crops - grey) * _uniform(rng, n, 0.75, 1.25)[:, None, None, None]
    jittered = mean + (jittered - mean) * _uniform(rng, n, 0.85, 1.15)[:, None, None, None]
    jittered = jittered + _uniform(rng, n, -0.08, 0.08)[:, None, None, None]
    crops = torch.where(some(0.5), jittered, crops)
    noise = torch.randn(crops.shape, generator=rng) * _uniform(rng, n, 0.0, 0.04)[:, None, None, None]
    return torch.where(some(0.4), crops + noise, crops)


# ---------------------------------------------------------------- training


def fit(bank: PictureBank, settings: TrainSettings, net: JudgeNet | None = None, *, log_every: int = 100) -> JudgeNet:
    """A network trained to name every picture of the bank from its training crops (from `net`'s
    weights where given, else from random ones)."""
    torch.manual_seed(settings.seed)
    net = (net or JudgeNet(len(bank.names), settings.widths)).train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.learning_rate, weight_decay=5e-4)
    rng = torch.Generator().manual_seed(settings.seed)
    start, step, order = time.monotonic(), 0, []
    while (done := _progress(settings, step, start)) < 1:
        for group in optimizer.param_groups:  # a short warm-up, then a cosine decay to zero
            group["lr"] = settings.learning_rate * min(1.0, done * 30) * 0.5 * (1 + math.cos(math.pi * done))
        classes = _next_classes(order, len(bank.names), settings.batch, rng)
        crops = training_crops(bank, classes, rng, settings.degrade).contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(net(crops), classes, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if log_every and step % log_every == 0:
            print(f"step {step}  loss {loss.item():.3f}  {time.monotonic() - start:.0f} s", flush=True)
    return net.to(memory_format=torch.contiguous_format)


def _next_classes(order: list[int], count: int, batch: int, rng: torch.Generator) -> torch.Tensor:
    """The next batch of classes from shuffled rounds over all of them, so each is seen as often."""
    while len(order) < batch:
        order.extend(torch.randperm(count, generator=rng).tolist())
    taken = order[:batch]
    del order[:batch]
    return torch.tensor(taken)


def _progress(settings: TrainSettings, step: int, start: float) -> float:
    if settings.steps is not None:
        return step / settings.steps
    return (time.monotonic() - start) / (settings.minutes * 60)


# ---------------------------------------------------------------- the report


def report_scenes(bank: PictureBank, image_size: int, seed: int) -> list[Scene]:
    """Each name alone at each size, at a random cell, on a background it stands out on (seeded apart from training)."""
    rng = random.Random(f"emoji-judge-report-{seed}")
    scenes = []
    for name in bank.names:
        for size in SIZES:
            position = rng.choice(tuple(POSITIONS))
            half = SIZES[size] / 2
            x, y = (
                min(
                    max(c + rng.uniform(-POSITION_JITTER, POSITION_JITTER), BORDER_MARGIN + half),
                    1 - BORDER_MARGIN - half,
                )
                for c in cell_centre(position)
            )
            background = rng.choice(backgrounds_for(bank.cache, [name]))
            scenes.append(Scene((Picture(name, size, position, (x, y)),), background))
    return scenes


def degraded(image: Image.Image, rng: random.Random) -> Image.Image:
    """A render as a generator might leave it: softened, blurred a little, noised and JPEG-compressed."""
    side = image.width
    image = image.resize((side // 2, side // 2), Image.Resampling.BILINEAR).resize(
        (side, side), Image.Resampling.BILINEAR
    )
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 0.6)))
    pixels = np.asarray(image, dtype=np.float32)
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, rng.uniform(2, 8), pixels.shape)
    image = Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=rng.randint(60, 85))
    return Image.open(buffer).convert("RGB")


def measure(judge: Judge, folder: str | Path, image_size: int = 64, seed: int = 0) -> dict:
    """Top-1, position and size rates of the judge on each name's held-out renders, clean and degraded,
    over all names, the evaluated ones and per category."""
    bank = PictureBank(folder)
    scenes = report_scenes(bank, image_size, seed)
    rng = random.Random(f"emoji-judge-degrade-{seed}")
    results = {}
    for kind in ("clean", "degraded"):
        counts: dict[str, Counter] = {}
        for scene in scenes:
            image = render(scene, image_size, bank.cache)
            image = degraded(image, rng) if kind == "degraded" else image
            _count(counts, bank.category(scene.objects[0].name), scene.objects[0], judge.read(image))
        results[kind] = _rates(counts)
    return {"image_size": image_size, "seed": seed, "scenes": len(scenes), "names": len(bank.names), **results}


def _count(counts: dict[str, Counter], category: str, wanted: Picture, readings: list) -> None:
    first = readings[0] if readings else None
    right = {
        "top1": first is not None and first.name == wanted.name,
        "position": first is not None and first.position == wanted.position,
        "size": first is not None and first.size == wanted.size,
    }
    groups = ["all", category] + (["evaluated"] if category in EVALUATED_CATEGORIES else [])
    for group in groups:
        counter = counts.setdefault(group, Counter())
        counter["n"] += 1
        counter.update(k for k, v in right.items() if v)


def _rates(counts: dict[str, Counter]) -> dict:
    """Each group's rates: all names, the evaluated ones, then each category by name."""
    order = ["all", "evaluated"] + sorted(set(counts) - {"all", "evaluated"})
    return {
        group: {"n": counts[group]["n"], **{k: round(counts[group][k] / counts[group]["n"], 4) for k in MEASURED}}
        for group in order
        if group in counts
    }


def format_measure(results: dict) -> str:
    lines = [f"{results['names']} names, {results['scenes']} scenes at {results['image_size']} px"]
    lines.append(f"{'':24} {'n':>5}  {'top1':>6} {'pos':>6} {'size':>6} | degraded {'top1':>6} {'pos':>6} {'size':>6}")
    for group, clean in results["clean"].items():
        worn = results["degraded"][group]
        cells = " ".join(f"{clean[k]:6.3f}" for k in MEASURED)
        worn_cells = " ".join(f"{worn[k]:6.3f}" for k in MEASURED)
        lines.append(f"{group:24} {clean['n']:5d}  {cells} |          {worn_cells}")
    return "\n".join(lines)
