"""Teach the shipped model a shape it never saw (a heart) with `diffuse train lora` and with
`diffuse train embedding`, then measure how often it draws one where asked, and what it costs.

1. Data: single-object scenes drawn as the shapes world draws them (diffuse/shapes/scenes.py:
   its colours, backgrounds, sizes and grid cells, supersampled polygons), each object a heart,
   captioned by the shapes world's own caption writer with the shape's word made "heart"
   ("a small red heart at the left, gray background"). The LoRA's folder adds some ordinary
   scenes of the old shapes with their captions, the prior-preservation images kohya calls
   regularisation images, so that learning hearts does not overwrite the old shapes. The
   embedding's folder holds the same hearts with "heart" written as its name, heart-ti ("a small
   red heart-ti at the left, ..."): every caption must name the embedding (its vectors are all
   it trains), and old shapes' images would teach it nothing.
2. Training, each from scratch and timed, on models/default (float32, frozen): configs/train_lora.json
   (the "heart" LoRA), the same with train_text_encoder false (the "heart-unet" LoRA), and
   configs/train_embedding.json (the heart-ti embedding).
3. The judge, template based as diffuse/shapes/analyze.py reads shapes: the largest object's
   coverage (each pixel's place between background and object colour) is compared by soft
   intersection over union with each known shape and the heart, drawn at its centroid and area
   at a few blurs; the best fit names it.
4. Measured as a user applies them, through pipelines loaded with lora_dirs / embedding_dirs: the
   base model, each LoRA by `<lora:name:w>` at each weight (appended to heart and old prompts
   alike), the embedding by its name in the heart prompts (old prompts unchanged). One image per
   prompt (seed = eval seed + i, the model card's settings: Euler a, 20 steps, CFG 4): how often
   held-out heart prompts give a heart (and in its colour), how the old shapes' held-out prompts
   still score (shapes world's judge), and how many old images are bit-identical to the base's.

    .venv/bin/python bench/taught_shape.py                  # all of it, into bench/cache/taught_shape/
    .venv/bin/python bench/taught_shape.py --what embedding # one part (lora, lora-unet, embedding)
    .venv/bin/python bench/taught_shape.py --what lora --lora-weights 1,0.5
    .venv/bin/python bench/taught_shape.py --quick          # a few steps and prompts: checks the bench runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import diffuse
from diffuse.adapters.embeddings import read_embedding
from diffuse.shapes.analyze import DETECTION_DISTANCE, analyze, label_components, shape_coverage
from diffuse.shapes.captions import caption
from diffuse.shapes.data import DataConfig, ShapesDataset
from diffuse.shapes.evaluate import EvalSettings, generate, heldout_prompts, score_adherence
from diffuse.shapes.scenes import BACKGROUNDS, COLOURS, SHAPES, SIZES, SUPERSAMPLE, Scene, unit_area
from diffuse.train.config_files import read_config
from diffuse.train.stages.embedding import EmbeddingTrainConfig, train_embedding
from diffuse.train.stages.lora import LoraTrainConfig, train_lora

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "default"
NEW = "heart"
TOKEN = "heart-ti"  # the embedding's name: its captions and prompts write it where the others say "heart"
PARTS = ("lora", "lora-unet", "embedding")
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


def named(text: str, word: str) -> str:
    """A heart caption with the shape's word written as `word` (an embedding's name)."""
    return re.sub(rf"\b{NEW}\b", word, text)


def write_data(folder: Path, hearts: int, old: int, size: int, word: str = NEW) -> None:
    """`hearts` heart images captioned with `word` for the shape, then `old` scenes of the old shapes."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (scene, text) in enumerate(heart_scenes(hearts, seed=11)):
        render_heart(scene, size).save(folder / f"heart{i:03d}.png")
        (folder / f"heart{i:03d}.txt").write_text(named(text, word) + "\n", encoding="utf-8")
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


# ---------------------------------------------------------------- the add-ons


@dataclasses.dataclass(frozen=True)
class Condition:
    """One way of drawing the held-out prompts: a pipeline and how each prompt names the add-on."""

    label: str
    pipe: diffuse.Pipeline
    heart_word: str = NEW  # what the heart prompts write for the shape (an embedding's name)
    tag: str = ""  # appended to every prompt, heart and old alike (a LoRA's <lora:name:w>)


def timed_training(train_fn, config, run: Path) -> tuple[Path, float]:
    """Train from scratch in `run` and time it (a resumed run would time only its last steps)."""
    if run.exists():
        shutil.rmtree(run)
    torch.manual_seed(0)
    started = time.perf_counter()
    path = train_fn(config, run, progress=True)
    return path, time.perf_counter() - started


def record(config, path: Path, seconds: float, images: dict) -> dict:
    return {
        "images": images,
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k not in ("model", "data")},
        "seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "file": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
        "bytes": path.stat().st_size,
    }


def train_heart_lora(out: Path, data: Path, name: str, quick: bool, images: dict, **changes) -> dict:
    """configs/train_lora.json on the hearts (with `changes`), its file copied into out/loras."""
    config = read_config(LoraTrainConfig, ROOT / "configs" / "train_lora.json")
    config = dataclasses.replace(config, model=str(MODEL), data=str(data), output_name=name, **changes)
    if quick:
        config = dataclasses.replace(config, steps=3, checkpoint_every=3)
    path, seconds = timed_training(train_lora, config, out / "runs" / name)
    (out / "loras").mkdir(parents=True, exist_ok=True)
    return record(config, Path(shutil.copyfile(path, out / "loras" / path.name)), seconds, images)


def train_heart_embedding(out: Path, data: Path, quick: bool, images: dict) -> dict:
    """configs/train_embedding.json on the hearts captioned with TOKEN, copied into out/embeddings."""
    config = read_config(EmbeddingTrainConfig, ROOT / "configs" / "train_embedding.json")
    config = dataclasses.replace(config, model=str(MODEL), data=str(data), token=TOKEN)
    if quick:
        config = dataclasses.replace(config, steps=3, checkpoint_every=3)
    path, seconds = timed_training(train_embedding, config, out / "runs" / TOKEN)
    (out / "embeddings").mkdir(parents=True, exist_ok=True)
    result = record(config, Path(shutil.copyfile(path, out / "embeddings" / path.name)), seconds, images)
    return {**result, "vectors_near": vectors_near(path, config.init_text)}


def vectors_near(path: Path, init_text: str) -> dict:
    """How far the trained vectors went: each one's cosine with the init text's and the shape words' token vectors."""
    vectors = read_embedding(path).vectors
    pipe = diffuse.load_pipeline(MODEL, dtype="float32")
    table = pipe.text_encoder.embeddings.token_embedding.weight.detach().float()
    words = dict.fromkeys([init_text, *SHAPES, NEW])
    return {
        word: [
            round(c, 3) for c in torch.cosine_similarity(vectors, table[pipe.tokenizer.encode(word)[0]][None]).tolist()
        ]
        for word in words
    }


# ---------------------------------------------------------------- the measurement


def measure(condition: Condition, hearts: list[tuple[Scene, str]], old_prompts: list[str], settings, out: Path):
    """Heart prompts (the shape named as the condition names it) and old prompts, one image each."""
    heart_prompts = [named(text, condition.heart_word) + condition.tag for _, text in hearts]
    images = generate(condition.pipe, heart_prompts, settings)
    old_images = generate(condition.pipe, [prompt + condition.tag for prompt in old_prompts], settings)
    sheet = Image.new("RGB", (64 * 10, 64 * 2))
    for i, image in enumerate(images[:10] + old_images[:10]):
        sheet.paste(image.resize((64, 64)), (64 * (i % 10), 64 * (i // 10)))
    sheet.save(out / f"sheet_{re.sub(r'[^a-z0-9.]+', '_', condition.label.lower())}.png")
    # The shapes world's judge knows only the old shapes, so a heart drawn for an old prompt is
    # counted by the heart judge.
    old_hearts = sum(read_shape(image)[0] == NEW for image in old_images)
    result = {
        "label": condition.label,
        "example_heart_prompt": heart_prompts[0],
        "heart_prompts": heart_report(heart_prompts, [s for s, _ in hearts], images),
        "old_prompts": score_adherence(old_prompts, old_images),  # scored on the prompts' own words
        "old_prompts_drawn_as_heart": old_hearts / len(old_images),
    }
    return result, old_images


def conditions(args, out: Path) -> list[Condition]:
    """The base model, then each trained add-on at each weight, each applied as a user applies it."""
    found = [Condition("without add-ons", diffuse.load_pipeline(MODEL, dtype="float32"))]
    loras = [name for name in ("heart", "heart-unet") if (out / "loras" / f"{name}.safetensors").is_file()]
    if "lora" in args.parts or "lora-unet" in args.parts:
        pipe = diffuse.load_pipeline(MODEL, dtype="float32", lora_dirs=[out / "loras"])
        for name in loras:
            if {"heart": "lora", "heart-unet": "lora-unet"}[name] in args.parts:
                found += [Condition(f"{name} LoRA at {w:g}", pipe, tag=f" <lora:{name}:{w:g}>") for w in args.weights]
    if "embedding" in args.parts:
        pipe = diffuse.load_pipeline(MODEL, dtype="float32", embedding_dirs=[out / "embeddings"])
        found.append(Condition(f"{TOKEN} embedding", pipe, heart_word=TOKEN))
    return found


def percent(share: float, n: int) -> str:
    return f"{100 * share:3.0f}% ±{100 * math.sqrt(share * (1 - share) / n):.0f}"


def table(results: dict) -> str:
    n = results["prompts"]
    rows = [
        f"{'':<28}{'heart drawn':>13}{'in its colour':>15}{'old: all right':>16}{'old: colour':>13}"
        f"{'old: a heart':>14}{'old: same image':>17}"
    ]
    for c in results["conditions"]:
        heart, old = c["heart_prompts"], c["old_prompts"]
        rows.append(
            f"{c['label']:<28}{percent(heart['heart'], n):>13}{percent(heart['heart_and_colour'], n):>15}"
            f"{percent(old['all_correct'], n):>16}{percent(old['attributes']['colour'], n):>13}"
            f"{percent(c['old_prompts_drawn_as_heart'], n):>14}"
            f"{c['old_images_identical_to_base']:>13}/{n}"
        )
    rows.append(f"± one standard error, {n} prompts each: at most {100 * math.sqrt(0.25 / n):.1f} points (a 50% share)")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="default bench/cache/taught_shape (taught_shape_quick with --quick)")
    parser.add_argument("--quick", action="store_true", help="a few steps and prompts: checks the bench runs")
    parser.add_argument("--what", default="all", help="comma list of lora, lora-unet, embedding; all: every one")
    parser.add_argument("--lora-weights", default="1,0.75,0.5", help="the weights each LoRA is drawn at")
    parser.add_argument("--prompts", type=int, default=200, help="held-out heart prompts and old prompts, each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training and drawing")
    args = parser.parse_args()
    args.parts = set(PARTS) if args.what == "all" else set(args.what.split(","))
    args.weights = [float(w) for w in args.lora_weights.split(",")]
    if not args.parts <= set(PARTS) or not args.weights:
        parser.error(f"--what takes some of {', '.join(PARTS)} or all; --lora-weights one weight or more")
    torch.set_num_threads(args.threads)
    out = args.out or ROOT / "bench" / "cache" / ("taught_shape_quick" if args.quick else "taught_shape")
    hearts, old, count = (6, 2, 4) if args.quick else (40, 20, args.prompts)
    for folder, old_images, word in ((out / "data", old, NEW), (out / "data_embedding", 0, TOKEN)):
        if not folder.is_dir():
            write_data(folder, hearts, old_images, 64, word)
    training = {}
    if "lora" in args.parts:
        images = {"hearts": hearts, "old_shapes": old}
        training["heart"] = train_heart_lora(out, out / "data", "heart", args.quick, images)
    if "lora-unet" in args.parts:
        images = {"hearts": hearts, "old_shapes": old}
        training["heart-unet"] = train_heart_lora(
            out, out / "data", "heart-unet", args.quick, images, train_text_encoder=False
        )
    if "embedding" in args.parts:
        training[TOKEN] = train_heart_embedding(out, out / "data_embedding", args.quick, {"hearts": hearts})
    settings = EvalSettings(cfg_scale=4.0, steps=20, sampler="Euler a")
    held_hearts = heart_scenes(count, seed=1000)  # another seed than the training scenes
    old_prompts = heldout_prompts("singles", count)
    measured, base_images = [], None
    for condition in conditions(args, out):
        started = time.perf_counter()
        result, old_images = measure(condition, held_hearts, old_prompts, settings, out)
        base_images = base_images or old_images
        same = sum(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(old_images, base_images))
        measured.append({**result, "old_images_identical_to_base": int(same)})
        print(f"{condition.label}: {time.perf_counter() - started:.0f} s", flush=True)
    results = {
        "training": training,
        "settings": {"steps": settings.steps, "sampler": settings.sampler, "cfg_scale": settings.cfg_scale},
        "prompts": count,
        "threads": torch.get_num_threads(),
        "conditions": measured,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    for name, run in training.items():
        print(f"{name}: trained in {run['seconds']} s on {run['threads']} thread(s), {run['bytes']} bytes")
        if "vectors_near" in run:
            print(f"{name}: its vectors' cosine with the token vectors of {run['vectors_near']}")
    print(table(results))


if __name__ == "__main__":
    main()
