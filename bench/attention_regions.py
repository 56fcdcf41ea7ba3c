"""Do the report's cross-attention maps point at the objects their words name?

On the shipped model (models/default), each held-out two-object prompt of `diffuse eval`
(heldout_prompts("pairs", n), scene seed 0, image i with seed 0 + i, the model card's settings:
Euler a, 20 steps, CFG 4, 64x64) is generated once through diffuse.illustrate.record.record, which
gathers the maps as the report shows them: every cross-attention layer, every step, the
conditional half of the batch, averaged over heads (DAAM). The shapes world's analyzer
(diffuse/shapes/analyze.py) reads the drawn objects back; each object's region is the analyzer's
own template of the shape it read (shape_coverage at the object's centroid and area, coverage over
one half). An image counts when exactly two objects were read and their two shapes are the two
shapes the prompt names (then each word is matched to the object of its shape); otherwise it is
skipped, with the reason counted. For each counted image and each of its two shape words (a
word's map is the mean of its tokens' maps, upsampled bilinearly to the image): is the map's mean
inside that word's object higher than inside the other object? The issue's bar is 80% of cases.
The colour words are scored the same way, objects matched by shape, as a second number.

The cost of a report's recording: record()'s wall time beside a plain generate of the same request
(the first prompts, alternated), and the time the attention hooks took; with --sd15 also on
the full Stable Diffusion 1.5 architecture (bench/sd15.py's random weights, which time the same as
trained ones) at 512x512.

    OMP_NUM_THREADS=1 .venv/bin/python bench/attention_regions.py              # 100 prompts
    OMP_NUM_THREADS=1 .venv/bin/python bench/attention_regions.py --sd15 --count 0

Measured on a 2-core Intel Xeon (family 6, model 167), one torch thread, the host shared with other
work (bench/RESULTS.md, "Attention maps inside the drawn objects"): of 100 prompts, 88 images
counted (11 skipped because a drawn shape was not the stated one, 1 because 3 objects were read),
and in all 176 cases (100.0%) the shape word's map was stronger inside its own object (median
ratio own / other 2.67, lowest 1.20); the colour words 91.5%. Recording costs 1.15x a plain
generate on the shipped model (1.54 s against 1.34 s; the attention hooks 0.18 s, 13% of the
UNet's time, since its layers are tiny); on SD1.5 at 512x512, every layer and step gathered, the
hooks take 2.6% of the UNet's time (0.35 s over 2 guided steps), so no layer is left out there.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import diffuse
from diffuse.illustrate.record import record
from diffuse.illustrate.recording import Recording
from diffuse.shapes.analyze import SceneReading, analyze, shape_coverage
from diffuse.shapes.captions import parse_caption
from diffuse.shapes.evaluate import heldout_prompts
from diffuse.shapes.scenes import unit_area

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "default"
SETTINGS = {"steps": 20, "sampler": "Euler a", "cfg_scale": 4.0}  # the model card's


def object_regions(reading: SceneReading, size: int) -> list[np.ndarray]:
    """Each read object's region [size, size] (bool): the analyzer's template of the shape it read,
    drawn at the object's centroid and area."""
    regions = []
    for obj in reading.objects:
        extent = math.sqrt(obj.area * size * size / unit_area(obj.shape))
        centre = (obj.centroid[0] * size, obj.centroid[1] * size)
        regions.append(shape_coverage(obj.shape, centre, extent, size, size) > 0.5)
    return regions


def word_map(rec: Recording, tokenizer, word: str) -> np.ndarray:
    """The mean of the maps of the word's tokens (its first occurrence in the prompt), at image size."""
    ids, wanted = rec.text.ids, tokenizer.encode(word)
    starts = [p for p in rec.attention.positions if ids[p : p + len(wanted)] == wanted]
    if not starts:
        raise ValueError(f"{word!r} is not among the prompt's tokens {rec.attention.tokens}")
    rows = [rec.attention.positions.index(p) for p in range(starts[0], starts[0] + len(wanted))]
    maps = rec.attention.maps[rows].mean(0)[None, None]
    return F.interpolate(maps, size=(rec.height, rec.width), mode="bilinear")[0, 0].numpy()


def judge(rec: Recording, tokenizer) -> tuple[list[dict], str | None]:
    """The cases of one image (per stated object: its shape word's and colour word's means inside
    its own region and the other's), or the reason the image is skipped."""
    scene, reading = parse_caption(rec.prompt), analyze(rec.image)
    kinds = [o.kind for o in scene.objects]
    if kinds[0] == kinds[1]:
        return [], "the prompt names one shape twice"
    if len(reading.objects) != 2:
        return [], f"{len(reading.objects)} objects read, not 2"
    read = [o.shape for o in reading.objects]
    if sorted(read) != sorted(kinds):
        return [], "a drawn shape is not the stated one"
    regions = dict(zip(read, object_regions(reading, rec.height)))
    cases = []
    for wanted, other in zip(scene.objects, reversed(scene.objects)):
        case = {"word": wanted.kind}
        for what, word in (("shape", wanted.kind), ("colour", wanted.colour)):
            values = word_map(rec, tokenizer, word)
            case[what] = (float(values[regions[wanted.kind]].mean()), float(values[regions[other.kind]].mean()))
        cases.append(case)
    return cases, None


def regions_score(pipe, count: int, seed: int) -> dict:
    cases, skipped, seconds = [], {}, []
    for i, prompt in enumerate(heldout_prompts("pairs", count)):
        rec = record(pipe, prompt, seed=seed + i, **SETTINGS)
        seconds.append(rec.timings["total"])
        found, reason = judge(rec, pipe.tokenizer)
        cases += found
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
        print(f"\r{i + 1}/{count} prompts", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    rate = {what: sum(c[what][0] > c[what][1] for c in cases) / max(len(cases), 1) for what in ("shape", "colour")}
    ratios = [c["shape"][0] / c["shape"][1] for c in cases]
    return {"cases": len(cases), "images": len(cases) // 2, "skipped": skipped, "rate": rate, "ratios": ratios}


def cost(pipe, prompts: list[str], settings: dict, rounds: int) -> dict:
    """record() against a plain generate of the same request, alternated; hooks' share of the UNet time."""
    recorded, plain, hooks, unet = [], [], [], []
    request = {"guidance_scale": settings["cfg_scale"], **{k: v for k, v in settings.items() if k != "cfg_scale"}}
    pipe.generate(diffuse.GenerationRequest(prompt=prompts[0], **{**request, "steps": 1}))  # first-call setup untimed
    for _ in range(rounds):
        for i, prompt in enumerate(prompts):
            began = time.perf_counter()
            pipe.generate(diffuse.GenerationRequest(prompt=prompt, seed=i, **request))
            plain.append(time.perf_counter() - began)
            rec = record(pipe, prompt, seed=i, **settings)
            recorded.append(rec.timings["total"])
            hooks.append(rec.timings["attention_maps"])
            unet.append(rec.timings["unet"])
    return {
        "record_s": statistics.median(recorded),
        "plain_s": statistics.median(plain),
        "ratio": statistics.median(r / p for r, p in zip(recorded, plain)),
        "hooks_s": statistics.median(hooks),
        "hooks_share_of_unet": statistics.median(h / u for h, u in zip(hooks, unet)),
    }


def host() -> str:
    from speed import cpu_model

    return f"{cpu_model()}, torch {torch.__version__} on {torch.get_num_threads()} thread(s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100, help="held-out two-object prompts (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="prompt i is drawn with seed + i (default 0)")
    parser.add_argument("--cost-prompts", type=int, default=3, help="prompts the cost is timed on (default 3)")
    parser.add_argument("--rounds", type=int, default=2, help="timing rounds (default 2)")
    parser.add_argument("--sd15", action="store_true", help="also time the recording on SD1.5 at 512x512")
    parser.add_argument("--sd15-steps", type=int, default=2, help="steps of the SD1.5 runs (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the host is shared)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"host: {host()}")
    pipe = diffuse.load_pipeline(MODEL)
    settings = ", ".join(f"{k} {v}" for k, v in SETTINGS.items())
    if args.count:
        score = regions_score(pipe, args.count, args.seed)
        skipped = ", ".join(f"{n} {why}" for why, n in score["skipped"].items()) or "none"
        print(f"shipped model ({pipe.dtype}), {args.count} held-out pairs, {settings}, seed {args.seed} + i")
        print(f"  counted: {score['cases']} cases from {score['images']} images; skipped images: {skipped}")
        print(f"  shape word's map stronger inside its own object: {100 * score['rate']['shape']:.1f}% (bar 80%)")
        print(f"  colour word's map stronger inside its own object: {100 * score['rate']['colour']:.1f}%")
        ratios = score["ratios"]
        if ratios:
            print(
                f"  shape word, mean inside own / inside other: median {statistics.median(ratios):.2f}, min {min(ratios):.2f}"
            )
    if args.cost_prompts:
        timing = cost(pipe, heldout_prompts("pairs", args.cost_prompts), SETTINGS, args.rounds)
        print_cost("shipped model 64x64, " + settings, timing)
    if args.sd15:
        sys.path.insert(0, str(ROOT / "bench"))
        from sd15 import sd15_folder

        big = diffuse.load_pipeline(sd15_folder())
        sd15 = {"steps": args.sd15_steps, "sampler": "Euler", "cfg_scale": 7.5, "width": 512, "height": 512}
        timing = cost(big, ["a red circle and a blue square"], sd15, args.rounds)
        print_cost(f"SD1.5 ({big.dtype}) 512x512, {args.sd15_steps} steps", timing)


def print_cost(label: str, timing: dict) -> None:
    print(
        f"{label}: record {timing['record_s']:.2f} s, plain generate {timing['plain_s']:.2f} s (median ratio "
        f"{timing['ratio']:.3f}); attention hooks {timing['hooks_s']:.3f} s, "
        f"{100 * timing['hooks_share_of_unet']:.1f}% of the UNet's time"
    )


if __name__ == "__main__":
    main()
