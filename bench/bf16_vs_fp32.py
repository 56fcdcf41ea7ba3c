"""bfloat16 against float32 on the shipped model: how far apart the images are, how often
bf16 draws another picture, and which network that comes from.

Prompts: the evaluation's held-out prompts (diffuse.shapes.evaluate.heldout_prompts, scene seed 0,
the model card's test set), half one-object and half two-object, interleaved. Prompt i is
drawn with seed SEED + i at the settings `make run` uses: the model's native 64x64, guidance
4 (Makefile), the CLI's default sampler and steps (DPM++ 2M Karras, 20), one image per call.
Each dtype's pipeline is loaded once; the mixed pipelines below reuse their networks.

Per image: the mean and max absolute difference of the 8-bit channels, in 1/255 levels;
whether the picture changed, i.e. the analyzer (diffuse.shapes.analyze) reads another scene
(background, each object's shape, colour, size and cell, the relation); and whether its
verdict "the prompt was drawn right" (all_correct) differs.

Then, against the same images:
  batch     the same prompts and seeds in batches of 4 (image i of a batch keeps its seed),
            in each dtype (and bf16 with its text encoder in fp32), against the same images
            drawn one at a time; and each dtype with one thread against all of them;
  where     bf16 with one network (text encoder, UNet, VAE) in float32, and float32 with one
            network in bf16, against float32; the text encoder's bf16 context against its
            float32 one; and how far apart bf16's and float32's clean-latent estimates are
            after a few of the sampler's steps.

    .venv/bin/python bench/bf16_vs_fp32.py                    # everything (10-30 minutes on 2 shared cores)
    .venv/bin/python bench/bf16_vs_fp32.py --prompts 20 --skip-batch --skip-where --sampler "Euler a"
    .venv/bin/python bench/bf16_vs_fp32.py --save-images here.npz    # then, on another host:
    .venv/bin/python bench/bf16_vs_fp32.py --against here.npz        # the same seed's images across hosts
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

import diffuse.kernels
from diffuse.cli import DEFAULT_MODEL
from diffuse.loader import load_pipeline
from diffuse.pipeline import Pipeline
from diffuse.shapes.analyze import SceneReading, all_correct, analyze
from diffuse.shapes.data import parse_caption
from diffuse.shapes.evaluate import heldout_prompts
from diffuse.shapes.scenes import INVERSE_RELATION

SEED = 0
CFG = 4.0  # the Makefile's guidance for the shipped model
SAMPLER, STEPS = "DPM++ 2M Karras", 20  # the CLI's defaults (`diffuse eval` samples with "Euler a")
BATCH = 4
THRESHOLDS = (1, 4, 16)  # mean differences (1/255 levels) counted over
TRACE_STEPS = (1, 2, 5, 10, 15, 20)


# ---- drawing --------------------------------------------------------------------------------------


def bench_prompts(count: int) -> list[str]:
    """`count` held-out prompts, one-object and two-object alternating."""
    singles, pairs = heldout_prompts("singles", (count + 1) // 2), heldout_prompts("pairs", count // 2)
    mixed = [p for pair in zip(singles, pairs) for p in pair]
    return mixed + singles[len(pairs) :]


def draw(
    pipe: Pipeline, prompts: list[str], batch: int = 1, trace: bool = False, sampler: str = SAMPLER, cfg: float = CFG
) -> dict:
    """Images (uint8 arrays) of prompts[i] with seed SEED + i, `batch` prompts per call; with
    `trace`, each image's clean-latent estimate after every step as well."""
    images, traces = [], []
    size = pipe.config.image_size
    for start in range(0, len(prompts), batch):
        chunk, steps = prompts[start : start + batch], []
        callback = (lambda step, into=steps: into.append(step.denoised.float().clone())) if trace else None
        result = pipe.txt2img(
            chunk,
            width=size,
            height=size,
            steps=STEPS,
            guidance_scale=cfg,
            sampler=sampler,
            seed=SEED + start,
            callback=callback,
        )
        images += [np.asarray(image, dtype=np.int16) for image in result.images]
        if trace:
            traces += [torch.stack([s[i] for s in steps]) for i in range(len(chunk))]
    return {"images": images, "traces": traces}


class TextEncoderIn(torch.nn.Module):
    """A text encoder of one dtype in a pipeline of another: its context comes out in `dtype`."""

    def __init__(self, encoder: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.encoder, self.dtype = encoder, dtype

    def forward(self, ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        return self.encoder(ids, clip_skip=clip_skip).to(self.dtype)


class DecoderIn(torch.nn.Module):
    """A VAE of one dtype in a pipeline of another: latents are cast to the VAE's own dtype."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.to(next(self.vae.parameters()).dtype))


def mixed(networks: dict[str, Pipeline], text_encoder: str, unet: str, vae: str) -> Pipeline:
    """A pipeline whose text encoder, UNet and VAE come from the pipelines named ("fp32"/"bf16")."""
    base = networks[unet]
    return dataclasses.replace(
        base,
        text_encoder=TextEncoderIn(networks[text_encoder].text_encoder, base.dtype),
        vae=DecoderIn(networks[vae].vae),
    )


# ---- comparing ------------------------------------------------------------------------------------


def picture(reading: SceneReading) -> tuple:
    """What the analyzer says the image shows, without its measurements: a changed picture is a changed tuple."""
    objects = [(o.shape, o.colour, o.size, o.position) for o in reading.objects]
    relation = None
    if reading.relation is not None:
        a, rel, b = objects[0], reading.relation[1], objects[1]
        relation = (a, rel, b) if a <= b else (b, INVERSE_RELATION[rel], a)  # one way to say each relation
    return reading.background, tuple(sorted(objects)), relation


def judge(images: list[np.ndarray], prompts: list[str]) -> list[dict]:
    readings = [analyze(image.astype(np.uint8)) for image in images]
    return [{"picture": picture(r), "right": all_correct(parse_caption(p), r)} for r, p in zip(readings, prompts)]


def compare(reference: list[np.ndarray], other: list[np.ndarray], prompts: list[str]) -> dict:
    """Per-image pixel differences and analyzer changes of `other` against `reference`."""
    diffs = [np.abs(a - b) for a, b in zip(reference, other)]
    judged_ref, judged_other = judge(reference, prompts), judge(other, prompts)
    return {
        "mean": [float(d.mean()) for d in diffs],
        "max": [int(d.max()) for d in diffs],
        "changed": [a["picture"] != b["picture"] for a, b in zip(judged_ref, judged_other)],
        "verdict_changed": [a["right"] != b["right"] for a, b in zip(judged_ref, judged_other)],
        "right": (sum(j["right"] for j in judged_ref), sum(j["right"] for j in judged_other)),
    }


def summary(c: dict) -> str:
    means, n = np.array(c["mean"]), len(c["mean"])
    p = np.percentile(means, [50, 90, 99])
    over = ", ".join(f">{t}: {int((means > t).sum())}" for t in THRESHOLDS)
    return (
        f"mean diff /255: min {means.min():.2f}  median {p[0]:.2f}  p90 {p[1]:.2f}  p99 {p[2]:.2f}  "
        f"max {means.max():.2f}  (images over {over})\n"
        f"      max diff /255: median {np.median(c['max']):.0f}, max {max(c['max'])}; "
        f"other picture: {sum(c['changed'])}/{n}; prompt-drawn-right verdict differs: "
        f"{sum(c['verdict_changed'])}/{n} (right: {c['right'][0]} vs {c['right'][1]})"
    )


def drift(reference: list[torch.Tensor], other: list[torch.Tensor], which: list[bool]) -> dict[int, float]:
    """Median over the chosen images of |other - reference| / |reference| of the clean-latent
    estimate after each step in TRACE_STEPS."""
    chosen = [(a, b) for a, b, keep in zip(reference, other, which) if keep]
    if not chosen:
        return {}
    return {
        s: float(np.median([(b[s - 1] - a[s - 1]).norm() / a[s - 1].norm() for a, b in chosen]))
        for s in TRACE_STEPS
        if s <= STEPS
    }


def against(path: Path, drawn: dict, prompts: list[str], settings: np.ndarray) -> dict:
    """This host's images of each dtype against another host's (--save-images) of the same prompts and settings."""
    other = np.load(path)
    if list(other["prompts"]) != prompts or list(other["settings"]) != list(settings):
        raise ValueError(
            f"{path}: drawn with other prompts or settings ({[str(v) for v in other['settings']]}); "
            f"run both hosts with the same --prompts, --sampler and --cfg"
        )
    host_line = json.loads(str(other["host"]))
    print(
        f"\nthis host against {path} ({host_line.get('Model name', '?')}, family {host_line.get('CPU family', '?')}, "
        f"model {host_line.get('Model', '?')}), same dtype, same seed:"
    )
    results = {}
    for name, images in drawn.items():
        results[name] = c = compare(list(other[name].astype(np.int16)), images["images"], prompts)
        print(f"  {name}: {summary(c)}")
    return results


# ---- the host -------------------------------------------------------------------------------------


def host() -> dict:
    fields = {}
    try:
        out = subprocess.run(["lscpu"], check=False, capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU family", "Model", "Stepping"):
                fields[key.strip()] = value.strip()
    except (OSError, subprocess.SubprocessError) as error:
        fields["lscpu"] = f"not run: {error}"
    flags = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return {
        **fields,
        "machine": platform.machine(),
        "bf16 flags": {f: f in flags for f in ("avx512_bf16", "amx_bf16", "amx_tile")},
        "torch": torch.__version__,
        "cpu capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }


# ---- main -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=100, help="how many prompts (default 100)")
    parser.add_argument("--skip-batch", action="store_true", help="skip the batch-size and thread comparisons")
    parser.add_argument("--skip-where", action="store_true", help="skip the one-network-swapped runs")
    parser.add_argument("--sampler", default=SAMPLER, help=f"default {SAMPLER!r}, the CLI's")
    parser.add_argument("--cfg", type=float, default=CFG, help=f"guidance scale (default {CFG:g}, the Makefile's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the per-image numbers here")
    parser.add_argument(
        "--save-images", type=Path, default=None, help="write both dtypes' images (.npz) for another host's --against"
    )
    parser.add_argument(
        "--against",
        type=Path,
        default=None,
        help="another host's --save-images file: how far this host's images are from its",
    )
    args = parser.parse_args()
    generate = functools.partial(draw, sampler=args.sampler, cfg=args.cfg)
    began = time.perf_counter()
    prompts = bench_prompts(args.prompts)
    pipes = {
        "fp32": load_pipeline(DEFAULT_MODEL, dtype="float32"),
        "bf16": load_pipeline(DEFAULT_MODEL, dtype="bfloat16"),
    }
    drawn = {name: generate(pipe, prompts, trace=True) for name, pipe in pipes.items()}
    info = host()
    print(
        f"host: {info.get('Model name', '?')} (family {info.get('CPU family', '?')}, model {info.get('Model', '?')}, "
        f"stepping {info.get('Stepping', '?')}), {info['machine']}, {info['threads']} threads"
    )
    print(f"bf16 native: {info['bf16 flags']}; torch {info['torch']}, CPU capability {info['cpu capability']}")
    print(f"kernels: {diffuse.kernels.status()}")
    print(
        f"model {DEFAULT_MODEL}: {len(prompts)} held-out prompts (scene seed 0, {(len(prompts) + 1) // 2} "
        f"one-object, {len(prompts) // 2} two-object), seeds {SEED}..{SEED + len(prompts) - 1}, "
        f"{pipes['fp32'].config.image_size}x{pipes['fp32'].config.image_size}, {args.sampler}, {STEPS} steps, "
        f"cfg {args.cfg:g}"
    )
    main_cmp = compare(drawn["fp32"]["images"], drawn["bf16"]["images"], prompts)
    print(f"\nbf16 vs fp32, one image per call:\n      {summary(main_cmp)}")
    changed = [i for i, c in enumerate(main_cmp["changed"]) if c]
    print(f"      other pictures: {[(i, prompts[i], round(main_cmp['mean'][i], 1)) for i in changed]}")
    results = {"host": info, "prompts": prompts, "bf16_vs_fp32": main_cmp}
    settings = np.array([args.sampler, str(args.cfg), str(STEPS), str(SEED)])
    if args.save_images is not None:
        np.savez_compressed(
            args.save_images,
            prompts=np.array(prompts),
            settings=settings,
            host=np.array(json.dumps(info)),
            **{n: np.stack(d["images"]) for n, d in drawn.items()},
        )
    if args.against is not None:
        results["against"] = against(args.against, drawn, prompts, settings)

    if not args.skip_batch:
        print(f"\nbatch of {BATCH} (same prompt and seed per image) vs one image per call:")
        for name, pipe in pipes.items():
            batched = generate(pipe, prompts, batch=BATCH)["images"]
            results[f"{name}_batch"] = c = compare(drawn[name]["images"], batched, prompts)
            print(f"  {name}: {summary(c)}")
        # The text encoder in fp32 is the cheap remedy for other pictures (see "where"): does it also stop these?
        text_fp32 = mixed(pipes, "fp32", "bf16", "bf16")
        alone, batched = generate(text_fp32, prompts)["images"], generate(text_fp32, prompts, batch=BATCH)["images"]
        results["bf16_text_encoder_fp32_batch"] = c = compare(alone, batched, prompts)
        print(f"  bf16 with the text encoder in fp32: {summary(c)}")
        threads = torch.get_num_threads()
        for name, pipe in pipes.items():  # other kernels (another host, another thread count) round otherwise
            torch.set_num_threads(1)
            one_thread = generate(pipe, prompts)["images"]
            torch.set_num_threads(threads)
            results[f"{name}_threads"] = c = compare(drawn[name]["images"], one_thread, prompts)
            print(f"  {name}, 1 thread vs {threads}: {summary(c)}")

    if not args.skip_where:
        print("\nwhere it comes from: one network swapped, against fp32 (images one per call):")
        for te, unet, vae in [
            ("fp32", "bf16", "bf16"),
            ("bf16", "fp32", "bf16"),
            ("bf16", "bf16", "fp32"),
            ("bf16", "fp32", "fp32"),
            ("fp32", "bf16", "fp32"),
            ("fp32", "fp32", "bf16"),
        ]:
            label = f"text encoder {te}, UNet {unet}, VAE {vae}"
            images = generate(mixed(pipes, te, unet, vae), prompts)["images"]
            results[label] = c = compare(drawn["fp32"]["images"], images, prompts)
            print(f"  {label}:\n      {summary(c)}")
        with torch.no_grad():
            context = {name: pipe.encode_prompt(prompts).float() for name, pipe in pipes.items()}
        relative = ((context["bf16"] - context["fp32"]).norm(dim=-1) / context["fp32"].norm(dim=-1)).flatten()
        print(
            f"  text encoder context, bf16 vs fp32, per token: relative difference median {relative.median():.2e}, "
            f"max {relative.max():.2e}"
        )
        everyone = [True] * len(prompts)
        for label, which in (
            ("all images", everyone),
            ("other pictures", main_cmp["changed"]),
            ("same pictures", [not c for c in main_cmp["changed"]]),
        ):
            steps = drift(drawn["fp32"]["traces"], drawn["bf16"]["traces"], which)
            print(
                f"  clean-latent estimate after step n, |bf16 - fp32| / |fp32|, median over {label}: "
                + ", ".join(f"{s}: {v:.3f}" for s, v in steps.items())
            )
    print(f"\n({time.perf_counter() - began:.0f} s)")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
