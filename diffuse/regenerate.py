"""`diffuse regenerate IMAGE.png`: make an image again from the parameters its PNG carries, and
with --check say whether the pixels match.

A diffuse PNG records everything its image depends on (diffuse.metadata): the prompts, the
sampler with every setting its plan uses, the seed, the batch it was drawn in and its place
there, the model's sha256, dtype, quantization, device, speed-ups and the input image's and
mask's hashes. The whole batch is drawn again, because reduced-precision matrix products may
round differently at another batch size, and the image at the recorded position is kept. An
A1111 PNG is made again as far as its fields go (prompt, negative, steps, sampler and schedule
type, CFG, seed, size, clip skip, eta, denoising strength with --image); it cannot match
A1111's pixels.

An SDXL base -> refiner hand-off records its refiner as A1111 does ("Refiner: name [hash]",
"Refiner switch at"); the refiner is found by that hash among the models (those beside the
model, or in the folder --refiner names), or taken from --refiner itself, and checked, and the
base hands over to it at the same point.

Everything is checked before the model loads; a field that makes a match impossible (another
model or refiner, dtype, quantization, device or diffuse version, an A1111 image, another input
image) is named, and under --check ends the command before any work. The dtype, device and
quantization are the PNG's unless --dtype, --device or --quantize (none: off) say otherwise.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffuse import inputs
from diffuse.adapters.library import AddonError, AddonLibrary
from diffuse.adapters.prompt_tags import names_lora, rename_lora
from diffuse.checkpoints.diffusers_folder import is_diffusers_folder
from diffuse.conditioning_xl import AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE, SIZE_PAIRS
from diffuse.hashes import ModelHashes, model_hashes
from diffuse.metadata import (
    INFO_LABELS,
    info_from_infotext,
    numbered_path,
    parse_addon_hashes,
    parse_infotext,
    read_parameters,
    save_png,
)
from diffuse.pipeline import VERSION
from diffuse.recipe import sampler_from_record, speedups_from_info
from diffuse.request import GenerationRequest
from diffuse.runtime import QUANTIZE_CHOICES, check_quantize, resolve_device, resolve_dtype

# The largest pixel difference, in 1/255 levels, that --check accepts, by device type and dtype.
# On one machine a CPU gives exactly 0 at the same dtype (the seed's noise is drawn on the CPU
# and its kernels are deterministic); these bounds are for another machine. float32 then differs
# only in summation order (another SIMD width or core count), about a level after the sampler
# amplifies it; CUDA's cuDNN runs float32 convolutions in TF32 (10-bit mantissa) by default.
# bfloat16 and float16 round every product to 8 or 11 bits, which alone moves pixels by tens of
# levels across batch sizes on one CPU (bench/RESULTS.md), so another machine gets 32; so does
# int8 (quantize), whose activations are rounded to 8 bits at each quantized layer.
TOLERANCE = {
    ("cpu", "float32"): 2,
    ("cuda", "float32"): 4,
    ("mps", "float32"): 4,
    ("cpu", "bfloat16"): 32,
    ("cuda", "bfloat16"): 32,
    ("mps", "bfloat16"): 32,
    ("cpu", "float16"): 32,
    ("cuda", "float16"): 32,
    ("mps", "float16"): 32,
}

_TITLE = re.compile(r"^(.+) \[([0-9a-fA-F]{10})\]$")  # A1111's short title of a model, "name [hash]"

# Labels that describe an image without changing its pixels, or that `parse_infotext` fills in.
_DESCRIPTIVE = {
    "Prompt",
    "Negative prompt",
    "Size-1",
    "Size-2",
    "Version",
    "User",
    "RNG",
    "Clip skip",
    "Schedule type",
}


# The PNG's labels, for messages about the values check_settings reads.
_LABEL_NAMES = {
    "width": "Size (width)",
    "height": "Size (height)",
    "steps": "Steps",
    "guidance_scale": "CFG scale",
    "batch_size": "Batch size",
    "strength": "Denoising strength",
    "eta": "Eta",
}


@dataclass
class Recipe:
    """A PNG's parameters, typed, and what they ask for."""

    info: dict
    kind: str  # "txt2img", "img2img" or "inpaint"
    by_diffuse: bool  # written by diffuse (its Version), so every field a match needs is there
    not_reproduced: list[str] = field(default_factory=list)  # labels diffuse cannot honour

    @property
    def batch_size(self) -> int:
        return int(self.info.get("batch_size", 1))

    @property
    def batch_pos(self) -> int:
        return int(self.info.get("batch_pos", 0))

    @property
    def first_seed(self) -> int:
        return self.info["seed"] - self.batch_pos


def read_recipe(text: str) -> Recipe:
    """The recipe in a parameters text, every field that needs no model checked; ValueError names the bad one."""
    parsed = parse_infotext(text)
    info = info_from_infotext(text)
    for key, label in (
        ("steps", "Steps"),
        ("sampler", "Sampler"),
        ("cfg_scale", "CFG scale"),
        ("seed", "Seed"),
        ("width", "Size"),
    ):
        if key not in info:
            raise ValueError(f"the parameters have no {label!r}, which making the image again needs")
    version = info.get("version", "")
    by_diffuse = version.startswith("diffuse ")
    hires = sorted(label for label in parsed if label.startswith("Hires"))
    if info.get("mask_hash") or (not by_diffuse and "mask_blur" in info and not hires):
        kind = "inpaint"
    elif info.get("init_image_hash") or ("denoising_strength" in info and not hires):
        kind = "img2img"
    else:
        kind = "txt2img"
    known = INFO_LABELS | _DESCRIPTIVE
    not_reproduced = sorted(label for label in parsed if label not in known)
    if not by_diffuse and "Mask blur" in parsed:
        not_reproduced.append("Mask blur")  # diffuse uses a mask as it is
    if not by_diffuse and parsed.get("RNG", "GPU") != "CPU":
        not_reproduced.append(f"RNG: {parsed.get('RNG', 'GPU')} (diffuse draws the noise on the CPU)")
    recipe = Recipe(info, kind, by_diffuse, not_reproduced)
    _check(recipe)
    return recipe


def _check(recipe: Recipe) -> None:
    info = recipe.info
    if "refiner" in info or "refiner_switch_at" in info:
        refiner_title(info)
        switch_at = info.get("refiner_switch_at")
        if switch_at is None or not 0 < switch_at < 1:
            raise ValueError(f"Refiner switch at must be a fraction above 0 and below 1, got {switch_at}")
    for first, second in SIZE_PAIRS.values():
        if (first in info) != (second in info):
            raise ValueError(f"the parameters record one of {first} and {second} without the other")
    inputs.prompt_list(info.get("prompt", ""), "Prompt")
    inputs.prompt_list(info.get("negative_prompt", ""), "Negative prompt")
    inputs.check_settings(
        info["width"],
        info["height"],
        info["steps"],
        info["cfg_scale"],
        recipe.batch_size,
        info.get("denoising_strength", 1.0) if recipe.kind != "txt2img" else 1.0,
        info.get("eta"),
        names=_LABEL_NAMES,
    )
    if recipe.kind != "txt2img" and "denoising_strength" not in info:
        raise ValueError(f"the parameters describe {recipe.kind} but have no 'Denoising strength'")
    if not 0 <= recipe.batch_pos < recipe.batch_size:
        raise ValueError(f"Batch pos {recipe.batch_pos} is not a place in a batch of {recipe.batch_size}")
    if recipe.first_seed < 0:
        raise ValueError(
            f"Seed {info['seed']} cannot be at Batch pos {recipe.batch_pos}: the batch would start at "
            f"seed {recipe.first_seed}"
        )
    inputs.resolve_seed(recipe.first_seed, recipe.batch_size)
    if info.get("clip_skip", 1) < 1:
        raise ValueError(f"Clip skip must be 1 or more, got {info['clip_skip']}")
    sampler_from_record(info["sampler"], info.get("schedule_type"), info.get("sampler_settings"), info.get("eta"))
    speedups_from_info(info)


def recipe_request(recipe: Recipe, image: Image.Image | None, mask: Image.Image | None) -> GenerationRequest:
    """The request that makes the recipe's whole batch again: with diffuse's Sampler settings the
    exact recorded sampler, without them (an A1111 image) the sampler by name, schedule type and eta."""
    info = recipe.info
    if info.get("sampler_settings"):
        sampler = {"sampler": sampler_from_record(info["sampler"], info.get("schedule_type"), info["sampler_settings"])}
    else:
        sampler = {"sampler": info["sampler"], "schedule_type": info.get("schedule_type"), "eta": info.get("eta")}
    return GenerationRequest(
        info.get("prompt", ""),
        info.get("negative_prompt", ""),
        info["width"],
        info["height"],
        info["steps"],
        info["cfg_scale"],
        seed=recipe.first_seed,
        batch_size=recipe.batch_size,
        clip_skip=info.get("clip_skip", 1),
        speedups=speedups_from_info(info),
        image=image,
        mask=mask,
        strength=info["denoising_strength"] if recipe.kind != "txt2img" else None,
        keep_unmasked=info.get("keep_unmasked", True),
        refiner_switch_at=info.get("refiner_switch_at"),
        aesthetic_score=info.get("aesthetic_score", AESTHETIC_SCORE),
        negative_aesthetic_score=info.get("negative_aesthetic_score", NEGATIVE_AESTHETIC_SCORE),
        **size_conditioning(info),
        **sampler,
    )


def size_conditioning(info: dict) -> dict:
    """The request's SDXL crop and negative size conditioning as the parameters record them."""
    pairs = {name: (info[first], info[second]) for name, (first, second) in SIZE_PAIRS.items() if first in info}
    crop_top, crop_left = pairs.pop("crop", (0, 0))
    return {"crop_top": crop_top, "crop_left": crop_left, **pairs}


def refiner_title(info: dict) -> tuple[str, str]:
    """(name, short hash) of a hand-off's "Refiner: name [hash]"; ValueError without the hash to find it by."""
    title = info.get("refiner")
    if title is None:
        raise ValueError("the parameters have a 'Refiner switch at' but no 'Refiner'")
    found = _TITLE.match(title)
    if found is None:
        raise ValueError(f"Refiner {title!r} is not 'name [hash]': the refiner cannot be found by its hash")
    return found.group(1), found.group(2).lower()


def find_refiner(recipe: Recipe, given: str | None, model: Path) -> tuple[Path, ModelHashes, list[str]]:
    """A hand-off's refiner, its hashes and what rules out a match: `given` itself when it is a model,
    else the model with the recorded hash in the folder `given` names (default: the model's own
    folder), those named as recorded hashed first. ValueError when none has it."""
    name, short = refiner_title(recipe.info)
    place = Path(given).expanduser() if given is not None else model.parent
    if place.is_file() or is_diffusers_folder(place):
        hashes = model_hashes(place)
        wrong = [] if hashes.short == short else [f"Refiner hash {short} is not {place}'s ({hashes.short})"]
        return place, hashes, wrong
    if not place.is_dir():
        raise ValueError(f"--refiner {place}: no such file or folder")
    from diffuse.loader import model_paths

    for path in sorted(model_paths(place), key=lambda path: path.stem != name):
        hashes = model_hashes(path)
        if hashes.short == short:
            return path, hashes, []
    raise ValueError(
        f"the PNG's Refiner {name!r} (hash {short}) is none of the models in {place}; give it with --refiner"
    )


def find_addons(recipe: Recipe, lora_dirs: list[str], embedding_dirs: list[str]) -> None:
    """Find the recipe's LoRAs and embeddings in the folders by their recorded hashes, as A1111 does when
    it pastes parameters: a LoRA found under another name has its `<lora:NAME...>` and `<lyco:NAME...>` tags renamed to it.
    AddonError (a ValueError) names the first add-on that is not there."""

    info = recipe.info
    loras, embeddings = parse_addon_hashes(info.get("lora_hashes")), parse_addon_hashes(info.get("ti_hashes"))
    if not loras and not embeddings:
        return
    library = AddonLibrary(lora_dirs, embedding_dirs)
    prompts = info.get("prompt", "") + "\n" + info.get("negative_prompt", "")
    for name, short in loras:
        if not names_lora(prompts, name):
            continue  # listed but named by no tag: the image does not depend on it
        found = library.lora_by_hash(short)
        if found is None:
            where = ", ".join(lora_dirs) or "no folder: give one with --lora-dir"
            raise AddonError(f"the PNG's LoRA {name!r} (hash {short}) is in none of the LoRA folders ({where})")
        for key in ("prompt", "negative_prompt"):
            info[key] = rename_lora(info.get(key, ""), name, found.name)
    for name, short in embeddings:
        found = library.embedding_by_hash(short)
        if found is None or found.name != name:
            where = ", ".join(embedding_dirs) or "no folder: give one with --embeddings-dir"
            elsewhere = "" if found is None else f"; a file with its hash is named {found.name!r}"
            raise AddonError(
                f"the PNG's embedding {name!r} (hash {short}) is in none of the embedding folders ({where}){elsewhere}"
            )


def tolerance(device: torch.device, dtype: torch.dtype, quantize: str | None = None) -> int:
    limit = TOLERANCE[(device.type, str(dtype).removeprefix("torch."))]
    return limit if quantize is None else max(limit, TOLERANCE[(device.type, "bfloat16")])


def difference(made: Image.Image, original: Image.Image) -> tuple[int, float]:
    """The largest and the mean absolute difference of two same-sized images' RGB pixels, in 1/255 levels."""
    a = np.asarray(made.convert("RGB"), dtype=np.int16)
    b = np.asarray(original.convert("RGB"), dtype=np.int16)
    diff = np.abs(a - b)
    return int(diff.max()), float(diff.mean())


def add_regenerate_options(p: argparse.ArgumentParser, device_help: str) -> None:
    p.add_argument("png", metavar="IMAGE.png", help="a PNG made by diffuse (or A1111) with its parameters")
    p.add_argument("--model", default=None, help="the model (default: the shipped model)")
    p.add_argument("--out", default="outputs", help="where the new PNG goes (default ./outputs)")
    p.add_argument(
        "--check",
        action="store_true",
        help="compare with the original's pixels; exit 1 when they differ by more than the tolerance "
        "for the dtype and device, or when a match is impossible",
    )
    p.add_argument("--image", default=None, help="img2img/inpaint: the input image (checked against its hash)")
    p.add_argument("--mask", default=None, help="inpaint: the mask (checked against its hash)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto (default: the PNG's)")
    p.add_argument("--device", default=None, help=f"{device_help} (default: the PNG's)")
    add_quantize_option(p, regenerating=True)
    p.add_argument(
        "--refiner",
        default=None,
        help="a base -> refiner image's refiner: the model, or a folder to find it in by its hash "
        "(default: the model's own folder)",
    )
    add_addon_options(p)


def add_quantize_option(p: argparse.ArgumentParser, regenerating: bool = False) -> None:
    """--quantize: int8 networks (diffuse.runtime.prepare), off by default; regenerate's default is the PNG's."""
    if regenerating:
        choices, default = (*QUANTIZE_CHOICES, "none"), "the PNG's; none: off"
    else:
        choices, default = QUANTIZE_CHOICES, "off"
    p.add_argument(
        "--quantize",
        choices=choices,
        default=None,
        help=f"int8: run the networks' chosen layers on 8-bit integers (bfloat16 on the CPU), faster, the image "
        f"a little different (default: {default})",
    )


def add_addon_options(p: argparse.ArgumentParser) -> None:
    """--lora-dir and --embeddings-dir, each repeatable: the folders whose add-ons prompts may name."""
    p.add_argument(
        "--lora-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder of LoRA files (.safetensors, .pt, .ckpt) that <lora:NAME:WEIGHT> in a prompt names (repeatable)",
    )
    p.add_argument(
        "--embeddings-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder of textual-inversion embeddings, used by writing their file name in a prompt (repeatable)",
    )


def _inputs(recipe: Recipe, args: argparse.Namespace) -> tuple[Image.Image | None, Image.Image | None, list[str]]:
    """The input image and mask the recipe needs, opened and checked against their recorded hashes."""
    info, problems = recipe.info, []
    needs_image, needs_mask = recipe.kind != "txt2img", recipe.kind == "inpaint"
    for flag, given, needed in (("--image", args.image, needs_image), ("--mask", args.mask, needs_mask)):
        if needed and given is None:
            raise ValueError(f"this PNG was made by {recipe.kind}: give its input with {flag}")
        if not needed and given is not None:
            raise ValueError(f"this PNG was made by {recipe.kind}, which takes no {flag}")
    image = inputs.open_image(args.image, what="--image") if needs_image else None
    mask = inputs.open_image(args.mask, what="--mask") if needs_mask else None
    if mask is not None:
        inputs.check_mask_matches(image, mask)
    size = (info["width"], info["height"])
    for label, key, given, sha in (
        ("Init image hash", "init_image_hash", image, inputs.image_sha256),
        ("Mask hash", "mask_hash", mask, inputs.mask_sha256),
    ):
        if given is None:
            continue
        to_tensor = inputs.image_to_tensor if key == "init_image_hash" else inputs.mask_to_tensor
        recorded = info.get(key)
        if recorded is None:
            problems.append(f"the PNG records no {label}, so the input cannot be checked")
        elif len(recorded) != 64:
            problems.append(
                f"{label} {recorded} is not diffuse's sha256 of the pixels (A1111's), so the input cannot be checked"
            )
        elif sha(to_tensor(given, *size)) != recorded:
            problems.append(f"the {label} differs: this is not the input the image was made from")
    return image, mask, problems


def _match_problems(
    recipe: Recipe, hashes: ModelHashes, device: torch.device, dtype: torch.dtype, quantize: str | None
) -> list[str]:
    """Every recorded fact that rules out an exact match with this model, device, dtype and quantization."""
    info, problems = recipe.info, []
    if not recipe.by_diffuse:
        made_by = f"Version {info['version']}" if info.get("version") else "no Version"
        problems.append(
            f"an A1111-style image ({made_by}): made again as far as its fields go, its pixels "
            "are not expected to match"
        )
    elif info["version"] != VERSION:
        problems.append(f"made by {info['version']}, this is {VERSION}")
    if info.get("model_sha256"):
        if info["model_sha256"] != hashes.sha256:
            problems.append(f"Model sha256 {info['model_sha256']} is not the loaded model's ({hashes.sha256})")
    elif info.get("model_hash"):
        if info["model_hash"] != hashes.short:
            problems.append(f"Model hash {info['model_hash']} is not the loaded model's ({hashes.short})")
    else:
        problems.append("the PNG records no model hash")
    for key, label, value in (("dtype", "Dtype", str(dtype).removeprefix("torch.")), ("device", "Device", device.type)):
        if recipe.by_diffuse and info.get(key) is None:
            problems.append(f"the PNG records no {label}")
        elif info.get(key) is not None and info[key] != value:
            problems.append(f"{label} {info[key]} is not this run's ({value})")
    if info.get("quantize") != quantize:  # no Quantize: made without
        problems.append(f"Quantize {info.get('quantize') or 'off'} is not this run's ({quantize or 'off'})")
    if recipe.by_diffuse and info.get("sampler_settings") is None:
        problems.append("the PNG records no Sampler settings")
    if recipe.not_reproduced:
        problems.append(f"not reproduced by diffuse: {', '.join(recipe.not_reproduced)}")
    return problems


def run(args: argparse.Namespace, default_model: Path) -> int:
    """The `diffuse regenerate` command: 0 done (and matched, with --check), 1 no match, ValueError for bad input."""
    text = read_parameters(args.png)
    if text is None:
        raise ValueError(f"{args.png}: no generation parameters in this image")
    recipe = read_recipe(text)
    find_addons(recipe, args.lora_dir, args.embeddings_dir)  # a missing add-on is named before the model loads
    image, mask, problems = _inputs(recipe, args)
    device, dtype = _device_and_dtype(args, recipe.info)
    quantize = _quantize(args, recipe.info)
    check_quantize(quantize, device, dtype)  # int8 with another dtype or device: refused before any hashing
    inputs.check_output_folder(args.out, "--out")
    model = Path(args.model).expanduser() if args.model is not None else default_model
    hashes = model_hashes(model)  # the model's files only: nothing loads yet
    if args.refiner is not None and "refiner" not in recipe.info:
        raise ValueError("this PNG was made without a refiner, which takes no --refiner")
    refiner = find_refiner(recipe, args.refiner, model) if "refiner" in recipe.info else None
    problems = _match_problems(recipe, hashes, device, dtype, quantize) + (refiner[2] if refiner else []) + problems
    for problem in problems:
        print(f"diffuse regenerate: {'cannot match' if args.check else 'note'}: {problem}", file=sys.stderr)
    if args.check and problems:
        return 1

    from diffuse.loader import load_pipeline

    # The refiner loads as the model does: the parameters record one dtype and one Quantize for both.
    settings = {"dtype": dtype, "device": device, "quantize": quantize}
    addons = {"lora_dirs": args.lora_dir, "embedding_dirs": args.embeddings_dir}
    pipe = load_pipeline(model, **settings, **addons)
    pipe.model_hashes = hashes  # hashed above from the same files: no second read
    refiner_pipe = None
    if refiner is not None:
        refiner_pipe = load_pipeline(refiner[0], **settings, **addons)
        refiner_pipe.model_hashes = refiner[1]
    result = pipe.generate(recipe_request(recipe, image, mask), refiner=refiner_pipe)
    made, made_text = result.images[recipe.batch_pos], result.infotexts[recipe.batch_pos]
    print(save_png(made, numbered_path(args.out, recipe.info["seed"]), made_text, overwrite=False))
    return _compare(made, args.png, device, dtype, quantize) if args.check else 0


def _device_and_dtype(args: argparse.Namespace, info: dict) -> tuple[torch.device, torch.dtype]:
    """The options' device and dtype, else the PNG's."""
    try:
        device = resolve_device(args.device or info.get("device") or "cpu")
    except ValueError as e:
        if args.device is not None:
            raise
        raise ValueError(f"{e} (the PNG's Device); pass --device to make it on another") from None
    return device, resolve_dtype(args.dtype or info.get("dtype") or "auto", device)


def _quantize(args: argparse.Namespace, info: dict) -> str | None:
    """The option's quantization ("none": off), else the PNG's (no Quantize: off)."""
    if args.quantize is not None:
        return None if args.quantize == "none" else args.quantize
    recorded = info.get("quantize")
    if recorded is not None and recorded not in QUANTIZE_CHOICES:
        raise ValueError(
            f"the PNG's Quantize {recorded!r} is not one this diffuse has ({', '.join(QUANTIZE_CHOICES)}); "
            "pass --quantize to choose"
        )
    return recorded


def _compare(
    made: Image.Image, original_path: str, device: torch.device, dtype: torch.dtype, quantize: str | None
) -> int:
    """Print how far the new image is from the original; 0 within the tolerance, 1 past it."""
    with Image.open(original_path) as original:
        if original.size != made.size:
            print(
                f"DIFFERS: the new image is {made.size[0]}x{made.size[1]}, the original "
                f"{original.size[0]}x{original.size[1]}"
            )
            return 1
        largest, mean = difference(made, original)
    limit = tolerance(device, dtype, quantize)
    verdict = "matches" if largest <= limit else "DIFFERS"
    how = str(dtype).removeprefix("torch.") + ("" if quantize is None else f" {quantize}")
    print(
        f"{verdict}: largest pixel difference {largest}/255, mean {mean:.3f}/255 "
        f"(tolerance {limit}/255 for {how} on {device.type})"
    )
    return 0 if largest <= limit else 1
