"""Measuring a model of the shapes world: does it draw what a prompt says, and how good are its parts?

    prompt adherence   held-out prompts (combinations no training image shows: a purple triangle,
                       a red circle above a blue square), one image each at the model's native size,
                       prompt i with seed `seed + i`. The analyzer (diffuse.shapes.analyze) reads each
                       image back, and the image counts as right only when every attribute the prompt
                       states is there: parse_caption(prompt) is the scene to find, so an attribute the
                       prompt leaves open (often the size) is not judged. Singles and pairs are
                       reported apart: the fraction all-correct, and each attribute's rate among the
                       prompts that state it. Scene seed 0 is the test set; other scene seeds draw
                       other scenes of the same held-out combinations, to choose settings on.
    VAE reconstruction PSNR (dB, pixels in [0, 1]) of posterior-mean reconstructions of shape images
                       drawn with a data seed no training config uses (they use 0, 1 and 2), and how
                       many reconstructions the analyzer still reads as their scene, one- and two-object
                       scenes apart: an image the UNet draws reaches the page through the same decoder,
                       so this is about the most adherence the model could show.
    caption retrieval  with the CLIP image tower a model folder may carry (image_tower/): for M of those
                       images and their M captions, how often an image's own caption is the most similar
                       one (a duplicate of its caption counts as its own). Skipped, with a note, without one.
    generation time    the median of 3 timed txt2img runs at the evaluation's settings, after a warm-up.

Everything but the timings is seeded: the same model and settings give the same numbers.

The one import from diffuse.train is the reader of the finished-component files: a model folder
keeps its image tower in that format, and one format should have one reader.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from diffuse import inputs
from diffuse.metadata import atomic_write
from diffuse.pipeline import Pipeline
from diffuse.shapes.analyze import analyze, matches
from diffuse.shapes.data import (
    DataConfig,
    ShapesDataset,
    caption,
    heldout_pair_scenes,
    heldout_single_scenes,
    parse_caption,
)
from diffuse.shapes.image_encoder import ImageTower
from diffuse.speedups import Speedups
from diffuse.train.components import IMAGE_TOWER_DIR, final_files, load_final

EVAL_DATA_SEED = 1000  # the rendered images' dataset seed: the training configs use 0, 1 and 2
PROMPT_KINDS = {"singles": heldout_single_scenes, "pairs": heldout_pair_scenes}
ATTRIBUTES = (
    "count",
    "shape",
    "colour",
    "size",
    "position",
    "relation",
    "background",
)  # matches()'s keys, in print order
TIMED_RUNS = 3


@dataclass(frozen=True)
class EvalSettings:
    singles: int = 100  # held-out one-object prompts
    pairs: int = 100  # held-out two-object prompts
    images: int = 100  # rendered images for the VAE's PSNR and for caption retrieval
    steps: int = 20
    sampler: str = "Euler a"
    cfg_scale: float = 7.5
    seed: int = 0  # prompt i of each kind is drawn with seed + i
    # The held-out scenes' seed. 0 draws the test set the model card reports; settings such as the
    # guidance scale are chosen on scenes from another seed, so the test set does not pick them.
    scene_seed: int = 0
    batch_size: int = 16  # prompts per txt2img call; each image has its own seed, so this only sets the speed
    speedups: Speedups = Speedups()  # the optional speed-ups, to measure what they cost in adherence

    def __post_init__(self) -> None:
        for name in ("singles", "pairs", "seed", "scene_seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if not isinstance(self.images, int) or self.images < 1:
            raise ValueError(f"images must be a positive integer, got {self.images!r}")
        inputs.check_steps(self.steps)
        inputs.check_number("cfg_scale", self.cfg_scale, 0.0, 100.0)
        inputs.check_batch_size(self.batch_size)


def evaluate(pipe: Pipeline, settings: EvalSettings = EvalSettings(), *, progress: bool = False) -> dict:
    """All the measurements of `pipe` (a loaded model folder or file) as one JSON-ready dict."""
    pipe.get_sampler(settings.sampler)  # an unknown sampler fails here, before any image is drawn
    size = pipe.config.image_size
    adherence = {}
    for kind in PROMPT_KINDS:
        prompts = heldout_prompts(kind, getattr(settings, kind), settings.scene_seed)
        images = generate(pipe, prompts, settings, progress=progress, label=kind)
        adherence[kind] = score_adherence(prompts, images)
    tower = load_image_tower(pipe.source)
    if tower is None:
        retrieval = {"skipped": f"{pipe.source} carries no CLIP image tower ({IMAGE_TOWER_DIR}/)"}
    else:
        retrieval = caption_retrieval(pipe, tower, settings.images)
    timing_prompt = heldout_prompts("singles", 1)[0]
    return {
        # The name and A1111's hash identify the weights wherever the folder is (a path would not).
        "model": pipe.model_name,
        "model_hash": pipe.model_hash,
        "settings": {
            **dataclasses.asdict(settings),
            "width": size,
            "height": size,
            "dtype": str(pipe.dtype),
            "quantize": pipe.quantize,
            "eval_data_seed": EVAL_DATA_SEED,
        },
        "prompt_adherence": adherence,
        "vae_reconstruction": vae_reconstruction(pipe, settings.images),
        "caption_retrieval": retrieval,
        "generation_time": generation_time(
            pipe,
            timing_prompt,
            steps=settings.steps,
            cfg_scale=settings.cfg_scale,
            sampler=settings.sampler,
            seed=settings.seed,
            speedups=settings.speedups,
        ),
    }


# ---- prompt adherence ----------------------------------------------------------------------------


def heldout_prompts(kind: str, count: int, scene_seed: int = 0) -> list[str]:
    """`count` captions of held-out scenes ("singles" or "pairs"); each phrasing from its own seeded rng."""
    scenes = PROMPT_KINDS[kind](count, seed=scene_seed)
    return [caption(scene, random.Random(f"eval-{kind}-{i}")) for i, scene in enumerate(scenes)]


def generate(
    pipe: Pipeline, prompts: list[str], settings: EvalSettings, *, progress: bool = False, label: str = ""
) -> list[Image.Image]:
    """One image per prompt at the native size, prompt i with seed settings.seed + i."""
    size = pipe.config.image_size
    images: list[Image.Image] = []
    with tqdm(total=len(prompts), desc=label, unit="image", file=sys.stderr, disable=not progress) as bar:
        for start in range(0, len(prompts), settings.batch_size):
            chunk = prompts[start : start + settings.batch_size]
            result = pipe.txt2img(
                chunk,
                width=size,
                height=size,
                steps=settings.steps,
                guidance_scale=settings.cfg_scale,
                sampler=settings.sampler,
                seed=settings.seed + start,
                speedups=settings.speedups,
            )
            images.extend(result.images)
            bar.update(len(chunk))
    return images


def score_adherence(prompts: list[str], images: list[Image.Image]) -> dict:
    """How many images show everything their prompt states, and each attribute's rate among the prompts stating it."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
    correct, stated, right = 0, Counter(), Counter()
    for prompt, image in zip(prompts, images):
        verdict = matches(parse_caption(prompt), analyze(image))  # all of it true: all_correct()
        correct += all(verdict.values())
        stated.update(verdict.keys())
        right.update(key for key, ok in verdict.items() if ok)
    return {
        "prompts": len(prompts),
        "all_correct": correct / len(prompts) if prompts else None,
        "attributes": {key: right[key] / stated[key] for key in ATTRIBUTES if stated[key]},
        "stated": {key: stated[key] for key in ATTRIBUTES if stated[key]},
    }


# ---- the parts -------------------------------------------------------------------------------------


def eval_dataset(pipe: Pipeline) -> ShapesDataset:
    return ShapesDataset(DataConfig(seed=EVAL_DATA_SEED, image_size=pipe.config.image_size))


@torch.no_grad()
def vae_reconstruction(pipe: Pipeline, count: int, chunk: int = 32) -> dict:
    """PSNR of the VAE's reconstructions (decode of the posterior mean) of `count` held-out images,
    and the fraction of one- and two-object reconstructions the analyzer reads as their scene."""
    dataset, values, read_right = eval_dataset(pipe), [], {"singles": [], "pairs": []}
    for start in range(0, count, chunk):
        images, _, scenes = dataset.batch(start, min(chunk, count - start))
        mean = pipe.vae.encode(images.to(pipe.device, pipe.dtype)).mean
        rebuilt = pipe.vae.decode(mean).float().cpu().clamp(-1, 1)
        mse = ((rebuilt - images) / 2).pow(2).mean(dim=(1, 2, 3))  # [-1, 1] -> [0, 1] halves the differences
        values.extend((10 * torch.log10(1 / mse.clamp(min=1e-10))).tolist())  # 100 dB at most: exact stays finite
        as_saved = ((rebuilt + 1) * 127.5).round().to(torch.uint8)  # judged as 8-bit pixels, like generated images
        for scene, pixels in zip(scenes, as_saved.permute(0, 2, 3, 1).numpy()):
            kind = "singles" if len(scene.objects) == 1 else "pairs"
            read_right[kind].append(all(matches(scene, analyze(pixels)).values()))
    return {
        "images": count,
        "psnr_db_mean": statistics.fmean(values),
        "psnr_db_worst": min(values),
        "read_right": {kind: statistics.fmean(v) if v else None for kind, v in read_right.items()},
        "read_right_images": {kind: len(v) for kind, v in read_right.items()},
    }


def load_image_tower(model: Path) -> ImageTower | None:
    """A model folder's CLIP image tower (image_tower/final_image_tower.*), or None when it has none."""
    folder = Path(model) / IMAGE_TOWER_DIR
    if not final_files(folder, "image_tower")[1].is_file():
        return None
    tower, _, _ = load_final(folder, "image_tower")
    return tower


@torch.no_grad()
def caption_retrieval(pipe: Pipeline, tower: ImageTower, count: int) -> dict:
    """Top-1 image -> caption retrieval among `count` held-out images and their captions."""
    size = pipe.config.image_size
    if tower.cfg.image_encoder.image_size != size or tower.cfg.text_width != pipe.config.text_encoder.width:
        return {
            "skipped": f"the image tower reads {tower.cfg.image_encoder.image_size}px images and "
            f"{tower.cfg.text_width}-wide text states; the model draws {size}px images and its "
            f"text encoder is {pipe.config.text_encoder.width} wide"
        }
    dataset = eval_dataset(pipe)
    images, captions, _ = dataset.batch(0, count)
    similarity = tower.image_embeddings(images) @ _text_embeddings(pipe, tower, captions).T  # [images, captions]
    best = similarity.argmax(dim=1).tolist()
    correct = sum(captions[j] == captions[i] for i, j in enumerate(best))
    copies = Counter(captions)
    # Which way a relation points: each of `count` two-object images against its own caption
    # and the same words with the relation reversed (chance 0.5). Contrastive batches rarely
    # hold both, so a text encoder can do well above and still be blind here.
    reversed_captions = {i: text for i in range(20 * count) if (text := dataset.swapped_caption(i)) is not None}
    pairs = [(dataset.sample(i), text) for i, text in itertools.islice(reversed_captions.items(), count)]
    image_embeds = tower.image_embeddings(torch.stack([image for (image, _, _), _ in pairs]))
    own = _text_embeddings(pipe, tower, [caption for (_, caption, _), _ in pairs])
    reversed_ = _text_embeddings(pipe, tower, [text for _, text in pairs])
    prefers_own = ((image_embeds * own).sum(-1) > (image_embeds * reversed_).sum(-1)).float().mean().item()
    return {
        "images": count,
        "top1": correct / count,
        "chance": statistics.fmean(copies[text] / count for text in captions),
        "relation_vs_reversed": {"pairs": len(pairs), "own_caption_preferred": prefers_own},
    }


def _text_embeddings(pipe: Pipeline, tower: ImageTower, captions: list[str]) -> torch.Tensor:
    ids = pipe.tokenizer(captions)
    hidden = pipe.text_encoder(ids.to(pipe.device)).float().cpu()
    return tower.text_embeddings(pipe.text_encoder.pooled(hidden, ids, pipe.tokenizer.eos_token_id))


def generation_time(
    pipe: Pipeline,
    prompt: str,
    *,
    steps: int,
    cfg_scale: float,
    sampler: str,
    seed: int,
    speedups: Speedups = Speedups(),
    size: int | None = None,
) -> dict:
    """Seconds for one txt2img of `size` (default: the model's own) at these settings: the median
    of TIMED_RUNS after a warm-up."""
    size = size or pipe.config.image_size

    def run() -> float:
        start = time.perf_counter()
        pipe.txt2img(
            prompt,
            width=size,
            height=size,
            steps=steps,
            guidance_scale=cfg_scale,
            sampler=sampler,
            seed=seed,
            speedups=speedups,
        )
        return time.perf_counter() - start

    run()  # the first run pays for allocations and lazy set-up
    runs = [run() for _ in range(TIMED_RUNS)]
    return {"size": size, "median_s": statistics.median(runs), "runs_s": runs, "torch_threads": torch.get_num_threads()}


# ---- the report ------------------------------------------------------------------------------------


def _speedups_text(speedups: dict | None) -> str:
    """ ", speed-ups: ..." for the ones used (None: a report written before they existed)."""
    used = {k: v for k, v in Speedups(**speedups).info().items() if v is not None} if speedups else {}
    return ", speed-ups: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in used.items()) if used else ""


def format_report(results: dict) -> str:
    """The results as a table a person reads."""
    s = results["settings"]
    lines = [
        f"model: {results['model']} [{results['model_hash']}]",
        f"  {s['width']}x{s['height']}, {s['sampler']}, {s['steps']} steps, cfg {s['cfg_scale']}, "
        f"seed {s['seed']}, scene seed {s.get('scene_seed', 0)}, "  # absent from reports before it existed: 0
        f"{s['dtype'].replace('torch.', '')}{', ' + s['quantize'] if s.get('quantize') else ''}"
        f"{_speedups_text(s.get('speedups'))}",
        "",
        f"{'prompt adherence (held-out)':<30}{'singles':>10}{'pairs':>10}",
    ]
    kinds = [results["prompt_adherence"][kind] for kind in PROMPT_KINDS]

    def cell(value) -> str:
        return f"{value:>10.3f}" if value is not None else f"{'-':>10}"

    lines.append(f"{'  all correct':<30}" + "".join(cell(k["all_correct"]) for k in kinds))
    for key in ATTRIBUTES:
        if any(key in k["attributes"] for k in kinds):
            lines.append(f"{'  ' + key:<30}" + "".join(cell(k["attributes"].get(key)) for k in kinds))
    lines.append(f"{'  prompts':<30}" + "".join(f"{k['prompts']:>10}" for k in kinds))
    lines.append("")
    vae = results["vae_reconstruction"]
    lines.append(
        f"{'VAE reconstruction PSNR':<30}{vae['psnr_db_mean']:.2f} dB mean, {vae['psnr_db_worst']:.2f} dB "
        f"worst ({vae['images']} images)"
    )
    lines.append(
        f"{'  read back right':<30}"
        + "".join(cell(vae["read_right"][kind]) for kind in PROMPT_KINDS)
        + "   ("
        + ", ".join(f"{n} {kind}" for kind, n in vae["read_right_images"].items())
        + ")"
    )
    retrieval = results["caption_retrieval"]
    if "skipped" in retrieval:
        lines.append(f"{'caption retrieval':<30}skipped: {retrieval['skipped']}")
    else:
        lines.append(
            f"{'caption retrieval top-1':<30}{retrieval['top1']:.3f} (chance {retrieval['chance']:.3f}, "
            f"{retrieval['images']} images)"
        )
        if "relation_vs_reversed" in retrieval:  # absent from reports written before it was measured
            relation = retrieval["relation_vs_reversed"]
            lines.append(
                f"{'  own vs reversed relation':<30}{relation['own_caption_preferred']:.3f} (chance 0.5, "
                f"{relation['pairs']} two-object images)"
            )
    timing = results["generation_time"]
    lines.append(
        f"{'generation time':<30}{timing['median_s']:.3f} s median of {len(timing['runs_s'])} "
        f"({timing['torch_threads']} torch threads)"
    )
    return "\n".join(lines)


def write_report(results: dict, path: str | Path) -> Path:
    """The results as JSON at `path`, written atomically."""
    text = json.dumps(results, indent=2) + "\n"
    return atomic_write(Path(path), lambda f: f.write(text.encode("utf-8")))
