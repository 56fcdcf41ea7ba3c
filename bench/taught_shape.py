"""Teach the shipped model a shape it never saw (a heart) with `diffuse train lora`, then measure it.

1. Data: single-object scenes drawn as the shapes world draws them (diffuse/shapes/scenes.py:
   its colours, backgrounds, sizes and grid cells, supersampled polygons), each object a heart,
   captioned by the shapes world's own caption writer with the shape's word made "heart"
   ("a small red heart at the left, gray background"). Beside them some ordinary scenes of the
   old shapes with their captions, the prior-preservation images kohya calls regularisation
   images, so that learning hearts does not overwrite the old shapes.
2. Training: configs/train_lora.json on models/default (float32, frozen), timed.
3. The judge, template based as diffuse/shapes/analyze.py reads shapes: the largest object's
   coverage (each pixel's place between background and object colour) is compared by soft
   intersection over union with each known shape and the heart, drawn at its centroid and area
   at a few blurs; the best fit names it.
4. Measured with and without the LoRA, one image per prompt (seed = eval seed + i, the model
   card's settings: Euler a, 20 steps, CFG 4): how often held-out heart prompts give a heart
   (and its colour), and how the old shapes' held-out prompts still score (shapes world's judge).

    .venv/bin/python bench/taught_shape.py                 # writes bench/cache/taught_shape/
    .venv/bin/python bench/taught_shape.py --quick         # a few steps and prompts: checks the bench runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import diffuse
from diffuse.adapters import LoraMerge, read_lora
from diffuse.shapes.analyze import DETECTION_DISTANCE, analyze, label_components, shape_coverage
from diffuse.shapes.captions import caption
from diffuse.shapes.data import DataConfig, ShapesDataset
from diffuse.shapes.evaluate import EvalSettings, generate, heldout_prompts, score_adherence
from diffuse.shapes.scenes import BACKGROUNDS, COLOURS, SHAPES, SIZES, SUPERSAMPLE, Scene, unit_area
from diffuse.train.config_files import read_config
from diffuse.train.stages.lora import LoraTrainConfig, train_lora

ROOT = Path(__file__).resolve().parents[1]
NEW = "heart"
BLURS = (0.0, 0.7, 1.3)  # pixels (Gaussian sigma) a generated edge may be softer by


def heart_outline(cx: float, cy: float, extent: float, vertices: int = 96) -> list[tuple[float, float]]:
    """A heart (point down) with its area centroid at (cx, cy) and the circle's area at `extent`."""
    ts = [2 * math.pi * i / vertices for i in range(vertices)]
    raw = [
        (16 * math.sin(t) ** 3, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)))
        for t in ts
    ]
    pairs = list(zip(raw, raw[1:] + raw[:1]))
    cross = [x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in pairs]
    area = 0.5 * sum(cross)
    mx = sum((x0 + x1) * c for ((x0, _), (x1, _)), c in zip(pairs, cross)) / (6 * area)
    my = sum((y0 + y1) * c for ((_, y0), (_, y1)), c in zip(pairs, cross)) / (6 * area)
    scale = extent * math.sqrt(unit_area("circle") / abs(area))
    return [(cx + (x - mx) * scale, cy + (y - my) * scale) for x, y in raw]


def render_heart(scene: Scene, size: int) -> Image.Image:
    """The scene's one object drawn as a heart, exactly as scenes.render draws the other shapes."""
    big = size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    obj = scene.objects[0]
    points = heart_outline(obj.centre[0] * big, obj.centre[1] * big, SIZES[obj.size] * big)
    ImageDraw.Draw(canvas).polygon([(x - 0.5, y - 0.5) for x, y in points], fill=COLOURS[obj.colour])
    return canvas.reduce(SUPERSAMPLE)


def heart_scenes(count: int, seed: int) -> list[tuple[Scene, str]]:
    """`count` single-object scenes of the shapes world with their captions, the shape said as "heart"."""
    dataset, found, index = ShapesDataset(DataConfig(seed=seed)), [], 0
    while len(found) < count:
        scene, _ = dataset.describe(index)
        index += 1
        if len(scene.objects) == 1:
            text = caption(scene, random.Random(f"heart-{seed}-{index}")).replace(scene.objects[0].kind, NEW)
            found.append((scene, text))
    return found


def write_data(folder: Path, hearts: int, old: int, size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (scene, text) in enumerate(heart_scenes(hearts, seed=11)):
        render_heart(scene, size).save(folder / f"heart{i:03d}.png")
        (folder / f"heart{i:03d}.txt").write_text(text + "\n", encoding="utf-8")
    dataset = ShapesDataset(DataConfig(seed=12, image_size=size))
    for i in range(old):
        image, text, _ = dataset.sample(i)
        Image.fromarray(((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)).save(
            folder / f"old{i:03d}.png"
        )
        (folder / f"old{i:03d}.txt").write_text(text + "\n", encoding="utf-8")


# ---------------------------------------------------------------- the judge


def _box3(x: np.ndarray) -> np.ndarray:
    padded = np.pad(x, [(1, 1), (1, 1)] + [(0, 0)] * (x.ndim - 2), mode="edge")
    h, w = x.shape[:2]
    return sum(padded[i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9.0


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    if sigma == 0:
        return x
    offsets = np.arange(x.shape[0])
    m = np.exp(-((offsets[:, None] - offsets[None, :]) ** 2) / (2 * sigma**2))
    m /= m.sum(axis=1, keepdims=True)
    return m @ x @ m.T


def heart_coverage(centre: tuple[float, float], extent: float, side: int) -> np.ndarray:
    big = Image.new("L", (side * SUPERSAMPLE, side * SUPERSAMPLE), 0)
    points = heart_outline(centre[0] * SUPERSAMPLE, centre[1] * SUPERSAMPLE, extent * SUPERSAMPLE)
    ImageDraw.Draw(big).polygon([(x - 0.5, y - 0.5) for x, y in points], fill=255)
    return np.asarray(big.reduce(SUPERSAMPLE), dtype=np.float64) / 255.0


def read_shape(image: Image.Image) -> tuple[str | None, dict[str, float]]:
    """(best-fitting shape of the largest object or None when there is none, each shape's fit)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    side = rgb.shape[0]
    ring = np.ones(rgb.shape[:2], bool)
    ring[2:-2, 2:-2] = False
    background = np.median(rgb[ring], axis=0)
    smooth = _box3(rgb)
    distance = np.linalg.norm(smooth - background, axis=2)
    labels, count = label_components(distance > DETECTION_DISTANCE)
    if count == 0:
        return None, {}
    blob = labels == int(np.argmax(np.bincount(labels[labels >= 0], minlength=count)))
    if blob.sum() < 8:
        return None, {}
    colour = np.median(rgb[blob & (distance >= 0.75 * np.percentile(distance[blob], 90))], axis=0)
    direction = colour - background
    alpha = np.clip((smooth - background) @ direction / max(float(direction @ direction), 1e-6), 0, 1)
    near = _box3(_box3(blob.astype(float))) > 0
    alpha = np.where(near, alpha, 0.0)
    area = float(alpha.sum())
    ys, xs = np.mgrid[0:side, 0:side] + 0.5
    centre = (float((alpha * xs).sum() / area), float((alpha * ys).sum() / area))
    templates = {kind: shape_coverage(kind, centre, math.sqrt(area / unit_area(kind)), side, side) for kind in SHAPES}
    templates[NEW] = heart_coverage(centre, math.sqrt(area / unit_area("circle")), side)
    fits = {}
    for kind, template in templates.items():
        template = _box3(template)
        fits[kind] = max(
            float(np.minimum(alpha, t).sum() / np.maximum(alpha, t).sum()) for t in (_blur(template, s) for s in BLURS)
        )
    return max(fits, key=fits.get), fits


def heart_report(prompts: list[str], scenes: list[Scene], images: list[Image.Image]) -> dict:
    read = [read_shape(image) for image in images]
    readings = [analyze(image) for image in images]
    colour_right = [
        bool(r.objects) and max(r.objects, key=lambda o: o.area).colour == s.objects[0].colour
        for r, s in zip(readings, scenes)
    ]
    kinds = [kind for kind, _ in read]
    return {
        "prompts": len(prompts),
        "heart": kinds.count(NEW) / len(kinds),
        "heart_and_colour": sum(k == NEW and c for k, c in zip(kinds, colour_right)) / len(kinds),
        "read_as": {kind: kinds.count(kind) for kind in (*SHAPES, NEW, None) if kinds.count(kind)},
        "mean_heart_fit": float(np.mean([fits.get(NEW, 0.0) for _, fits in read])),
    }


# ---------------------------------------------------------------- the run


def measure(pipe, lora, settings: EvalSettings, count: int, out: Path) -> dict:
    hearts = heart_scenes(count, seed=1000)  # another seed than the training scenes
    heart_prompts = [text for _, text in hearts]
    old_prompts = heldout_prompts("singles", count)
    results = {}
    merge = LoraMerge({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    for label, selection in (("without", []), ("with", [(lora, 1.0, 1.0)])):
        merge.apply(selection)
        images = generate(pipe, heart_prompts, settings)
        results[f"heart_prompts_{label}_lora"] = heart_report(heart_prompts, [s for s, _ in hearts], images)
        old_images = generate(pipe, old_prompts, settings)
        results[f"old_prompts_{label}_lora"] = score_adherence(old_prompts, old_images)
        sheet = Image.new("RGB", (64 * 10, 64 * 2))
        for i, image in enumerate(images[:10] + old_images[:10]):
            sheet.paste(image.resize((64, 64)), (64 * (i % 10), 64 * (i // 10)))
        sheet.save(out / f"sheet_{label}_lora.png")
    merge.restore()
    results["example_heart_prompts"] = heart_prompts[:5]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "cache" / "taught_shape")
    parser.add_argument("--quick", action="store_true", help="a few steps and prompts: checks the bench runs")
    parser.add_argument("--prompts", type=int, default=50)
    args = parser.parse_args()
    out = args.out
    model = ROOT / "models" / "default"
    config = read_config(LoraTrainConfig, ROOT / "configs" / "train_lora.json")
    hearts, old, count = (40, 20, args.prompts) if not args.quick else (6, 2, 4)
    data = out / "data"
    if not data.is_dir():
        write_data(data, hearts, old, 64)
    config = dataclasses.replace(config, model=str(model), data=str(data), output_name="heart")
    if args.quick:
        config = dataclasses.replace(config, steps=3, checkpoint_every=3)
    torch.manual_seed(0)
    started = time.perf_counter()
    path = train_lora(config, out / "run", progress=True)
    train_seconds = time.perf_counter() - started
    pipe = diffuse.load_pipeline(model, dtype="float32")
    settings = EvalSettings(cfg_scale=4.0, steps=20, sampler="Euler a")
    results = {
        "training": {
            "images": {"hearts": hearts, "old_shapes": old},
            "config": {k: v for k, v in dataclasses.asdict(config).items() if k not in ("model", "data")},
            "seconds": round(train_seconds, 1),
            "threads": torch.get_num_threads(),
            "file": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
        },
        "settings": {"steps": settings.steps, "sampler": settings.sampler, "cfg_scale": settings.cfg_scale},
        **measure(pipe, read_lora(path), settings, count, out),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
