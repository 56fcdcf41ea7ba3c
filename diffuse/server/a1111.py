"""AUTOMATIC1111's /sdapi/v1 generation requests, read the way its clients write them.

A1111 builds its request model from its processing classes: every field optional, unknown keys
ignored (clients send many; here they are not kept either, nor echoed back in "parameters"),
A1111's own defaults for what is left out. Reading a request here checks every value diffuse
uses, and the limits the server was started with, before anything is decoded or allocated; a
bad one is a RequestError (answered 422) that names the field. What it makes is diffuse's own
GenerationRequest, inside an A1111Request with the fields only the server uses.

What differs from A1111, and why:
  - width and height default to the model's own size (A1111: 512, which is SD1's own size);
  - an unknown sampler or schedule type is an error rather than a silent fallback;
  - image URLs are never fetched, only base64 (raw or as a data URL);
  - the features diffuse does not have here (hires fix, face restoration, tiling, scripts, subseeds,
    styles) are ignored when switched off and refused when asked for, never silently skipped;
  - a refiner_checkpoint needs its refiner_switch_at (A1111 would run the refiner from the first step);
  - override_settings.sdxl_crop_top / sdxl_crop_left (A1111's settings) are refused by a model other
    than SDXL rather than ignored; sdxl_refiner_high/low_aesthetic_score (A1111's too) set the
    refiner's aesthetic scores, and unlike A1111 the PNG records them when they are not the defaults;
  - an inpainting mask is used as sent: mask_blur, inpainting_fill and resize_mode are not applied.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass, field, replace
from typing import Any

from PIL import Image, UnidentifiedImageError

from diffuse import inputs
from diffuse.request import (
    MAX_AESTHETIC_SCORE,
    MAX_CONDITIONED_PIXELS,
    GenerationRequest,
    is_aesthetic_score,
    whole_pixels,
)
from diffuse.samplers import SCHEDULE_TYPES
from diffuse.speedups import MAX_TOKEN_MERGING, Speedups

DEFAULT_SAMPLER = "Euler"  # A1111's, when neither sampler_name nor sampler_index is given
DEFAULT_STEPS = 50
DEFAULT_CFG = 7.0
DEFAULT_STRENGTH = 0.75


class RequestError(ValueError):
    """A request field that cannot be used; `field` names it."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (the server's --max-* options)."""

    max_side: int = 1024  # width and height, pixels
    max_steps: int = 150
    max_images: int = 8  # batch_size x n_iter
    max_image_pixels: int = 4096 * 4096  # of an uploaded image, read from its header before decoding
    max_image_bytes: int = 20 * 1024 * 1024  # of an uploaded image, encoded
    max_prompt_chars: int = 10_000


@dataclass(frozen=True)
class A1111Request:
    """One checked /sdapi/v1 txt2img or img2img request: the generation in diffuse's terms, and
    what only the server uses (rounds, the model to run it on, the answer's shape)."""

    kind: str  # the route, "txt2img" or "img2img" (inpainting is img2img with a mask)
    generation: GenerationRequest  # the first round's; round r draws seeds from seed + r * batch_size
    n_iter: int = 1
    send_images: bool = True
    model: str | None = None  # override_settings.sd_model_checkpoint: the model for this request
    restore_model: bool = True  # override_settings_restore_afterwards: back to the previous model after it
    refiner: str | None = None  # refiner_checkpoint: the SDXL model that takes over at generation.refiner_switch_at
    echo: dict[str, Any] = field(default_factory=dict)  # the request as A1111 echoes it in "parameters"


# A1111 fields diffuse has no feature for, and the values that mean "off".
_OFF = {
    "enable_hr": (None, False),
    "restore_faces": (None, False),
    "tiling": (None, False),
    "subseed_strength": (None, 0, 0.0),
    "script_name": (None, ""),
    "styles": (None, []),
}
REFINER_OFF = (None, "", "None")  # A1111's values of refiner_checkpoint for "no refiner"


def read_generation(kind: str, body: Any, limits: Limits) -> A1111Request:
    """The checked request from a parsed JSON body; RequestError on the first bad field."""
    if not isinstance(body, dict):
        raise RequestError("body", f"must be a JSON object, not {type(body).__name__}")
    for name, off in _OFF.items():
        if body.get(name) not in off:
            raise RequestError(name, "is not supported by diffuse; leave it out or switch it off")
    generation, n_iter = _generation(body, limits)
    send_images, model = _bool(body, "send_images", True), _model_override(body)
    restore_model = _bool(body, "override_settings_restore_afterwards", True)
    refiner, switch_at = _refiner(body)
    generation = replace(
        generation,
        clip_skip=_clip_skip(body),
        speedups=_speedups(body),
        refiner_switch_at=switch_at,
        **_crop(body),
        **_aesthetic_scores(body),
    )
    if kind == "img2img":
        generation = _with_images(generation, body, limits)
    request = A1111Request(
        kind=kind,
        generation=generation,
        n_iter=n_iter,
        send_images=send_images,
        model=model,
        restore_model=restore_model,
        refiner=refiner,
    )
    return replace(request, echo=_echo(body, request))


def _generation(body: dict, limits: Limits) -> tuple[GenerationRequest, int]:
    """The txt2img fields as one generation request, and n_iter (its rounds)."""
    prompt, negative = _text(body, "prompt", limits), _text(body, "negative_prompt", limits)
    width, height = _size(body, "width", limits), _size(body, "height", limits)
    steps = _int(body, "steps", DEFAULT_STEPS)
    if not 1 <= steps <= limits.max_steps:
        raise RequestError("steps", f"must be from 1 to {limits.max_steps} on this server, got {steps}")
    batch_size, n_iter = _int(body, "batch_size", 1), _int(body, "n_iter", 1)
    if batch_size < 1 or n_iter < 1 or batch_size * n_iter > limits.max_images:
        raise RequestError(
            "batch_size",
            f"batch_size x n_iter must be from 1 to {limits.max_images} images on this "
            f"server, got {batch_size} x {n_iter}",
        )
    sampler, schedule_type = _sampler(body)
    generation = GenerationRequest(
        prompt=prompt,
        negative_prompt=negative,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=_number(body, "cfg_scale", DEFAULT_CFG, 0.0, 100.0),
        sampler=sampler,
        schedule_type=schedule_type,
        seed=_seed(body, batch_size * n_iter),
        batch_size=batch_size,
        eta=_optional_number(body, "eta", 0.0, 1.0),
    )
    return generation, n_iter


def _with_images(generation: GenerationRequest, body: dict, limits: Limits) -> GenerationRequest:
    """The img2img fields: the strength, the image, and the mask if one is sent (inpainting)."""
    strength = _number(body, "denoising_strength", DEFAULT_STRENGTH, 0.0, 1.0)
    images = body.get("init_images")
    if not isinstance(images, list) or not images:
        raise RequestError("init_images", "img2img needs one base64 image in init_images")
    image = decode_image(images[0], "init_images[0]", limits)
    mask = None
    if body.get("mask") is not None:
        mask = decode_image(body["mask"], "mask", limits).convert("L")
        if body.get("inpainting_mask_invert") in (1, True):
            mask = Image.eval(mask, lambda value: 255 - value)
        if mask.size != image.size:
            raise RequestError("mask", f"is {mask.size[0]}x{mask.size[1]}, the image {image.size[0]}x{image.size[1]}")
    # Without a size the image's own is drawn: it must fit the same limit as an asked-for one.
    own_width, own_height = image.size
    for name, asked, own in (("width", generation.width, own_width), ("height", generation.height, own_height)):
        if asked is None and own > limits.max_side:
            raise RequestError(
                name,
                f"the image is {own_width}x{own_height}; give a {name} of at most "
                f"{limits.max_side} pixels (this server's limit) to draw it smaller",
            )
    return replace(generation, strength=strength, image=image, mask=mask)


def _echo(body: dict, request: A1111Request) -> dict[str, Any]:
    """A1111's "parameters" in the answer: the fields diffuse read, as it used them. Nothing else
    a client sent is kept or sent back (unknown keys could be megabytes); neither are the
    images, which A1111 echoes as megabytes of base64 nobody reads back."""
    generation = request.generation
    echo = {
        "prompt": generation.prompt,
        "negative_prompt": generation.negative_prompt,
        "width": generation.width,
        "height": generation.height,
        "steps": generation.steps,
        "cfg_scale": generation.guidance_scale,
        "sampler_name": generation.sampler,
        "scheduler": generation.schedule_type,
        "seed": generation.seed,
        "batch_size": generation.batch_size,
        "n_iter": request.n_iter,
        "eta": generation.eta,
        "send_images": request.send_images,
        "override_settings_restore_afterwards": request.restore_model,
        "refiner_checkpoint": request.refiner,
        "refiner_switch_at": generation.refiner_switch_at,
    }
    used = {
        "sd_model_checkpoint": request.model,
        "CLIP_stop_at_last_layers": generation.clip_skip,
        "token_merging_ratio": generation.speedups.token_merging,
        "sdxl_crop_top": generation.crop_top,
        "sdxl_crop_left": generation.crop_left,
        "sdxl_refiner_high_aesthetic_score": generation.aesthetic_score,
        "sdxl_refiner_low_aesthetic_score": generation.negative_aesthetic_score,
    }
    echo["override_settings"] = {key: value for key, value in used.items() if key in _override(body)}
    echo.update({name: body[name] for name in _OFF if name in body})  # checked above: each one off, small
    if request.kind == "img2img":
        echo["denoising_strength"] = generation.strength
        if "inpainting_mask_invert" in body:
            echo["inpainting_mask_invert"] = 1 if body["inpainting_mask_invert"] in (1, True) else 0
    return echo


def decode_image(value: Any, name: str, limits: Limits) -> Image.Image:
    """A base64 image (raw, or a data URL as browsers and some clients send), checked before decoding."""
    if not isinstance(value, str) or not value:
        raise RequestError(name, "must be a base64-encoded image")
    if value.startswith(("http://", "https://", "file:")):
        raise RequestError(name, "URLs are not fetched; send the image itself, base64-encoded")
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        if ";base64" not in header:
            raise RequestError(name, "a data URL must be base64-encoded")
    if len(value) > limits.max_image_bytes * 4 // 3 + 4:
        raise RequestError(name, f"is larger than this server's {limits.max_image_bytes} bytes")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(name, "is not valid base64") from None
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError:
        raise RequestError(name, f"has more than this server's {limits.max_image_pixels} pixels") from None
    except (UnidentifiedImageError, OSError):
        raise RequestError(name, "is not an image PIL can read") from None
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise RequestError(name, f"is {width}x{height}: more than this server's {limits.max_image_pixels} pixels")
    try:
        image.load()
    except (OSError, Image.DecompressionBombError, SyntaxError, ValueError) as error:
        raise RequestError(name, f"could not be decoded: {error}") from None
    return image


# ---- single fields -------------------------------------------------------------------------------


def _text(body: dict, name: str, limits: Limits) -> str:
    value = body.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RequestError(name, f"must be a string, got {type(value).__name__}")
    if len(value) > limits.max_prompt_chars:
        raise RequestError(name, f"is {len(value)} characters; this server takes at most {limits.max_prompt_chars}")
    return value


def _int(body: dict, name: str, default: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # some clients send 20.0
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(name, f"must be an integer, got {value!r}")
    return value


def _optional_int(body: dict, name: str) -> int | None:
    return None if body.get(name) is None else _int(body, name, 0)


def _size(body: dict, name: str, limits: Limits) -> int | None:
    """A width or height within the server's limit, a multiple of 8; None: the model's or the image's own."""
    value = _optional_int(body, name)
    if value is not None and not 8 <= value <= limits.max_side:
        raise RequestError(name, f"must be from 8 to {limits.max_side} pixels on this server, got {value}")
    if value is not None and value % 8:
        raise RequestError(name, f"must be a multiple of 8, got {value}")
    return value


def _number(body: dict, name: str, default: float, low: float, high: float, field: str | None = None) -> float:
    """body[name] checked to lie in [low, high] (default when absent); errors name `field`, else `name`."""
    value = body.get(name)
    if value is None:
        return default
    try:
        return inputs.check_number(name, value, low, high)
    except ValueError as error:
        raise RequestError(field or name, str(error).removeprefix(f"{name} ")) from None


def _optional_number(body: dict, name: str, low: float, high: float) -> float | None:
    return None if body.get(name) is None else _number(body, name, 0.0, low, high)


def _bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(name, f"must be true or false, got {value!r}")
    return value


def _seed(body: dict, count: int) -> int:
    """The first of `count` seeds, every one in A1111's range (a random pick leaves room for all)."""
    value = body.get("seed")
    if value in (None, "", -1):
        value = -1
    elif not isinstance(value, int) or isinstance(value, bool):
        raise RequestError("seed", f"must be -1 (random) or an integer from 0 to {inputs.MAX_SEED}, got {value!r}")
    try:
        return inputs.resolve_seed(value, count=count)
    except ValueError as error:
        raise RequestError("seed", str(error)) from None


def _sampler(body: dict) -> tuple[str, str | None]:
    """(sampler label, schedule type or None): sampler_name, else the legacy sampler_index, else Euler."""
    name = body.get("sampler_name") or body.get("sampler_index") or DEFAULT_SAMPLER
    if not isinstance(name, str):
        raise RequestError("sampler_name", f"must be a string, got {name!r}")
    scheduler = body.get("scheduler")
    if scheduler is None:
        return name, None
    if not isinstance(scheduler, str):
        raise RequestError("scheduler", f"must be a string, got {scheduler!r}")
    for label in SCHEDULE_TYPES:  # A1111 matches a scheduler by name ("karras") or label ("Karras")
        if scheduler.lower() == label.lower():
            return name, label
    raise RequestError(
        "scheduler", f"unknown or unsupported schedule type {scheduler!r}; diffuse has {', '.join(SCHEDULE_TYPES)}"
    )


def _override(body: dict) -> dict:
    value = body.get("override_settings") or {}
    if not isinstance(value, dict):
        raise RequestError("override_settings", "must be an object of setting names and values")
    return value


def _clip_skip(body: dict) -> int:
    value = _override(body).get("CLIP_stop_at_last_layers", 1)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 12:
        raise RequestError(
            "override_settings.CLIP_stop_at_last_layers", f"must be an integer from 1 to 12, got {value!r}"
        )
    return value


def _speedups(body: dict) -> Speedups:
    """override_settings.token_merging_ratio sets token merging; diffuse's other speed-ups stay off."""
    ratio = _number(
        _override(body),
        "token_merging_ratio",
        0.0,
        0.0,
        MAX_TOKEN_MERGING,
        field="override_settings.token_merging_ratio",
    )
    return Speedups(token_merging=ratio)


def _refiner(body: dict) -> tuple[str | None, float | None]:
    """(refiner_checkpoint, refiner_switch_at), or (None, None) for no refiner, whose switch A1111 ignores."""
    name = body.get("refiner_checkpoint")
    if name in REFINER_OFF:
        return None, None
    if not isinstance(name, str):
        raise RequestError("refiner_checkpoint", f"must be a model title or name, got {name!r}")
    if body.get("refiner_switch_at") is None:
        raise RequestError(
            "refiner_switch_at", "a refiner_checkpoint needs the fraction of the steps to switch at (A1111's page: 0.8)"
        )
    switch_at = _number(body, "refiner_switch_at", 0.0, 0.0, 1.0)
    if not 0 < switch_at < 1:
        raise RequestError("refiner_switch_at", f"must be above 0 and below 1, got {switch_at!r}")
    return name, switch_at


def _crop(body: dict) -> dict[str, int]:
    """override_settings.sdxl_crop_top and sdxl_crop_left: the corner SDXL is told its image was cut at."""
    crop = {}
    for name, setting in (("crop_top", "sdxl_crop_top"), ("crop_left", "sdxl_crop_left")):
        value = _override(body).get(setting, 0)
        if not whole_pixels(value, 0):
            raise RequestError(
                f"override_settings.{setting}",
                f"must be whole pixels from 0 to {MAX_CONDITIONED_PIXELS}, got {value!r}",
            )
        crop[name] = value
    return crop


def _aesthetic_scores(body: dict) -> dict[str, float]:
    """override_settings.sdxl_refiner_high_aesthetic_score and ..._low_...: what the SDXL refiner is
    told of the prompts' and the negative prompts' look."""
    scores = {}
    for name, setting in (
        ("aesthetic_score", "sdxl_refiner_high_aesthetic_score"),
        ("negative_aesthetic_score", "sdxl_refiner_low_aesthetic_score"),
    ):
        if setting not in _override(body):
            continue
        value = _override(body)[setting]
        if not is_aesthetic_score(value):
            raise RequestError(
                f"override_settings.{setting}", f"must be a number from 0 to {MAX_AESTHETIC_SCORE}, got {value!r}"
            )
        scores[name] = float(value)
    return scores


def _model_override(body: dict) -> str | None:
    value = _override(body).get("sd_model_checkpoint")
    if value is not None and not isinstance(value, str):
        raise RequestError("override_settings.sd_model_checkpoint", f"must be a model title or name, got {value!r}")
    return value
