"""One generation request, and its checks against a model.

`GenerationRequest` is everything a user asks for: txt2img, img2img and inpaint differ only in
whether `image` and `mask` are set. `resolve` checks it once, before any network runs or any
latent is allocated, and turns it into a `Job`: one prompt, negative prompt and seed per image,
the sampler object, the image and mask as tensors. A new setting is one field here plus its
check in `resolve`; the stages read it from `job.request`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from diffuse import inputs
from diffuse.adapters.prompt_tags import LoraTag, split_lora_tags
from diffuse.conditioning_xl import AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE, SizeConditioning
from diffuse.models.configs import PipelineConfig
from diffuse.recipe import recorded_eta
from diffuse.samplers import Sampler, get_sampler
from diffuse.speedups import Speedups

DEFAULT_STRENGTH = {"txt2img": 1.0, "img2img": 0.75, "inpaint": 1.0}
# SDXL's size conditioning (original and target sizes, crop corners) in pixels: training images
# reach a few thousand; the bound keeps every value one the sinusoids tell apart.
MAX_CONDITIONED_PIXELS = 16384
# The refiner was trained on aesthetic scores from 0 to 10; the bound also keeps the sinusoids finite.
MAX_AESTHETIC_SCORE = 10


@dataclass(frozen=True)
class GenerationRequest:
    """What to make. Without `image` it is txt2img; with `image` img2img; with `image` and
    `mask` inpainting (white: paint here).

    width, height: None is the model's native size for txt2img and the image's own size rounded
    down to the autoencoder's multiple otherwise. strength: None is 0.75 for img2img and 1.0 for
    inpainting (txt2img starts from pure noise). sampler: an A1111 name, shaped by schedule_type
    and eta, or a ready Sampler, which carries its own. seed: None or -1 picks one; image i of the
    batch uses seed + i. keep_unmasked: paste the original pixels back outside the mask.
    refiner_switch_at: the fraction of the denoising after which the refiner given to
    Pipeline.generate takes over (A1111's "Refiner switch at"); None: no refiner.
    aesthetic_score, negative_aesthetic_score: what the SDXL refiner is told of the prompts' and
    the negative prompts' look (diffusers' defaults, A1111's sdxl_refiner_high/low_aesthetic_score);
    other models ignore them.
    crop_top, crop_left: the corner of the crop SDXL is told its training image was cut at
    (A1111's sdxl_crop_top / sdxl_crop_left; diffusers' crops_coords_top_left); 0, 0: uncropped.
    negative_original_size, negative_target_size (width, height) and negative_crop (top, left):
    SDXL's size conditioning for the negative prompts (diffusers' negative_original_size,
    negative_target_size, negative_crops_coords_top_left, whose sizes are (height, width));
    None: the prompts' own. Each applies on its own (diffusers reads the negative sizes only
    when both are given). The refiner reads no target size.
    """

    prompt: str | list[str]
    negative_prompt: str | list[str] = ""
    width: int | None = None
    height: int | None = None
    steps: int = 20
    guidance_scale: float = 7.5
    sampler: str | Sampler = "DPM++ 2M Karras"
    schedule_type: str | None = None
    seed: int | None = None
    batch_size: int = 1
    clip_skip: int = 1
    eta: float | None = None
    speedups: Speedups | None = None
    image: Image.Image | str | Path | None = None
    mask: Image.Image | str | Path | None = None
    strength: float | None = None
    keep_unmasked: bool = True
    refiner_switch_at: float | None = None
    aesthetic_score: float = AESTHETIC_SCORE
    negative_aesthetic_score: float = NEGATIVE_AESTHETIC_SCORE
    crop_top: int = 0
    crop_left: int = 0
    negative_original_size: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    negative_crop: tuple[int, int] | None = None

    @property
    def kind(self) -> str:
        """ "txt2img", "img2img" or "inpaint"."""
        if self.image is None:
            return "txt2img"
        return "img2img" if self.mask is None else "inpaint"

    def resolve(self, config: PipelineConfig, scheduler_config: dict | None = None) -> Job:
        """The request checked against a model and made concrete; ValueError names the first bad setting."""
        picture, mask_picture = self._pictures()
        width, height = self._size(config, picture)
        strength = self._strength()
        inputs.check_settings(
            width,
            height,
            self.steps,
            self.guidance_scale,
            self.batch_size,
            strength,
            self.eta,
            multiple=config.vae.downsample_factor,
        )
        inputs.check_clip_skip(self.clip_skip, (config.text_encoder or config.text_encoder_2).layers)
        self._check_for_xl(config)
        self._check_refiner_switch()
        self._check_aesthetic_scores()
        self._check_size_conditioning(config)
        prompts, negatives = self._prompts()
        texts, negative_texts, loras = lora_tags(prompts, negatives)
        first_seed = inputs.resolve_seed(self.seed, count=len(prompts))
        sampler = self._sampler(config, scheduler_config)
        image = None if picture is None else inputs.image_to_tensor(picture, width, height)
        mask = None if mask_picture is None else inputs.mask_to_tensor(mask_picture, width, height)
        return Job(
            request=self,
            prompts=prompts,
            negative_prompts=negatives,
            texts=texts,
            negative_texts=negative_texts,
            loras=loras,
            width=width,
            height=height,
            seeds=[first_seed + i for i in range(len(prompts))],
            sampler=sampler,
            strength=float(strength),
            eta=recorded_eta(sampler, self.eta),
            speedups=self.speedups or Speedups(),
            image=image,
            mask=mask,
        )

    def _check_for_xl(self, config: PipelineConfig) -> None:
        """What an SDXL model cannot take: clip skip (it reads both encoders' penultimate layer) and
        token merging (it merges at full resolution, where SDXL's UNet has no attention)."""
        if config.text_encoder_2 is None:
            return
        if self.clip_skip != 1:
            raise ValueError(f"clip_skip {self.clip_skip} does not apply to SDXL, which reads the penultimate layer")
        if self.speedups is not None and self.speedups.token_merging and not config.unet.attention_levels[0]:
            raise ValueError("token merging works on full-resolution attention, which this SDXL UNet does not have")

    def _check_refiner_switch(self) -> None:
        switch = self.refiner_switch_at
        if switch is None:
            return
        if not isinstance(switch, (int, float)) or isinstance(switch, bool) or not 0 < switch < 1:
            raise ValueError(f"refiner_switch_at {switch!r}: must be a fraction of the steps above 0 and below 1")

    def _check_aesthetic_scores(self) -> None:
        for name in ("aesthetic_score", "negative_aesthetic_score"):
            value = getattr(self, name)
            if not is_aesthetic_score(value):
                raise ValueError(f"{name} {value!r}: must be a number from 0 to {MAX_AESTHETIC_SCORE}")

    def _check_size_conditioning(self, config: PipelineConfig) -> None:
        """Each value a whole number of pixels within MAX_CONDITIONED_PIXELS, pairs of two; set only
        for SDXL, the one family whose UNet reads them."""
        pairs = {
            "crop_top, crop_left": (self.crop_top, self.crop_left),
            "negative_original_size": self.negative_original_size,
            "negative_target_size": self.negative_target_size,
            "negative_crop": self.negative_crop,
        }
        for name, pair in pairs.items():
            if pair is None:
                continue
            low = 0 if "crop" in name else 1
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(whole_pixels(v, low) for v in pair)):
                raise ValueError(
                    f"{name} {pair!r}: must be two whole numbers of pixels from {low} to {MAX_CONDITIONED_PIXELS}"
                )
        if config.text_encoder_2 is None and self._conditions_sizes():
            raise ValueError("crop and negative size conditioning are SDXL's; this model reads no size conditioning")

    def _conditions_sizes(self) -> bool:
        """Whether the request sets any of SDXL's size conditioning away from its default."""
        negatives = (self.negative_original_size, self.negative_target_size, self.negative_crop)
        return (self.crop_top, self.crop_left) != (0, 0) or any(pair is not None for pair in negatives)

    def _pictures(self) -> tuple[Image.Image | None, Image.Image | None]:
        """The input image and mask, opened now so that a broken file fails first."""
        if self.image is None:
            if self.mask is not None:
                raise ValueError("a mask needs the image it belongs to (inpaint takes both)")
            return None, None
        picture = inputs.open_image(self.image)
        if self.mask is None:
            return picture, None
        mask_picture = inputs.open_image(self.mask, what="mask")
        inputs.check_mask_matches(picture, mask_picture)
        return picture, mask_picture

    def _size(self, config: PipelineConfig, picture: Image.Image | None) -> tuple[int, int]:
        if picture is None:
            own_w = own_h = config.image_size
        else:
            own_w, own_h = inputs.default_size(picture, config.vae.downsample_factor)
        return (own_w if self.width is None else self.width), (own_h if self.height is None else self.height)

    def _strength(self) -> float:
        if self.strength is None:
            return DEFAULT_STRENGTH[self.kind]
        if self.image is None and self.strength != 1.0:
            raise ValueError(
                f"strength {self.strength!r} needs an input image (img2img, inpaint); txt2img starts from pure noise"
            )
        return self.strength

    def _prompts(self) -> tuple[list[str], list[str]]:
        """One prompt and one negative prompt per image: each prompt batch_size times in a row."""
        prompts = inputs.prompt_list(self.prompt, "prompt")
        negatives = inputs.prompt_list(self.negative_prompt, "negative_prompt", count=len(prompts))
        prompts = [p for p in prompts for _ in range(self.batch_size)]
        negatives = [n for n in negatives for _ in range(self.batch_size)]
        if len(prompts) > inputs.MAX_BATCH:
            raise ValueError(f"{len(prompts)} images requested at once; the limit is {inputs.MAX_BATCH}")
        return prompts, negatives

    def _sampler(self, config: PipelineConfig, scheduler_config: dict | None) -> Sampler:
        if not isinstance(self.sampler, Sampler):
            return model_sampler(self.sampler, config, scheduler_config, self.schedule_type, self.eta)
        given = [
            f"{name}={value!r}"
            for name, value in (("schedule_type", self.schedule_type), ("eta", self.eta))
            if value is not None
        ]
        if given:
            raise ValueError(
                f"{' and '.join(given)} would be ignored: a ready Sampler ({self.sampler.label}) "
                "carries its own schedule and eta; pass the sampler's name to set them"
            )
        return self.sampler


def whole_pixels(value: object, low: int) -> bool:
    """Whether `value` is a whole number of pixels from `low` to MAX_CONDITIONED_PIXELS (SDXL's size conditioning)."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= MAX_CONDITIONED_PIXELS


def is_aesthetic_score(value: object) -> bool:
    """Whether `value` is a number the refiner can be told as an aesthetic score."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= MAX_AESTHETIC_SCORE


def model_sampler(
    name: str,
    config: PipelineConfig,
    scheduler_config: dict | None = None,
    schedule_type: str | None = None,
    eta: float | None = None,
) -> Sampler:
    """A sampler by its A1111 name with the model's noise schedule and prediction type."""
    model_schedule = {**(scheduler_config or {}), "prediction_type": config.prediction_type}
    return get_sampler(name, scheduler_config=model_schedule, schedule_type=schedule_type, eta=eta)


def lora_tags(prompts: list[str], negatives: list[str]) -> tuple[list[str], list[str], tuple[LoraTag, ...]]:
    """The prompts without their `<lora:...>` tags, and the LoRAs those tags name in any of them.

    A batch runs on one set of merged weights, so a name given twice must have the same weights."""
    if not any("<" in text for text in (*prompts, *negatives)):  # no tag can be there
        return list(prompts), list(negatives), ()
    found: dict[str, LoraTag] = {}
    stripped: list[list[str]] = [[], []]
    for side, texts in enumerate((prompts, negatives)):
        for text in texts:
            plain, tags = split_lora_tags(text)
            stripped[side].append(plain)
            for tag in tags:
                first = found.setdefault(tag.name, tag)  # <lora:...> and <lyco:...> name the same file
                if (first.te_weight, first.unet_weight) != (tag.te_weight, tag.unet_weight):
                    raise ValueError(f"LoRA {tag.name!r} is given twice with different weights in one request")
    return stripped[0], stripped[1], tuple(found.values())


@dataclass(frozen=True, eq=False)  # tensors have no single truth value to compare by
class Job:
    """A checked request resolved against one model: what the generation stages read."""

    request: GenerationRequest
    prompts: list[str]  # one per image, as asked (add-on tags included: they are recorded)
    negative_prompts: list[str]
    texts: list[str]  # the prompts as encoded: <lora:...> tags taken out
    negative_texts: list[str]
    loras: tuple[LoraTag, ...]  # what the tags ask to apply
    width: int
    height: int
    seeds: list[int]
    sampler: Sampler
    strength: float
    eta: float | None  # as recorded: the eta the sampler uses, when asked for or not its default
    speedups: Speedups
    image: torch.Tensor | None = None  # [1, 3, H, W] in [-1, 1]
    mask: torch.Tensor | None = None  # [1, 1, H, W] in {0, 1}; 1 = paint here
    nan_fallback: list[str] = field(default_factory=list)  # components rerun in float32 after a non-finite output

    @property
    def from_noise(self) -> bool:
        """Whether sampling starts from pure noise (txt2img, inpainting at full strength) rather than
        from the image plus the noise slice of the strength's step."""
        return self.image is None or (self.mask is not None and self.strength == 1.0)

    @property
    def steps(self) -> int:
        return self.request.steps

    @property
    def guidance_scale(self) -> float:
        return float(self.request.guidance_scale)

    @property
    def clip_skip(self) -> int:
        return self.request.clip_skip

    @property
    def keep_unmasked(self) -> bool:
        return self.request.keep_unmasked

    @property
    def sizes(self) -> SizeConditioning:
        """SDXL's size conditioning for the prompts: the size asked for, at the crop asked for."""
        return SizeConditioning.plain(self.height, self.width, (self.request.crop_top, self.request.crop_left))

    @property
    def negative_sizes(self) -> SizeConditioning:
        """SDXL's size conditioning for the negative prompts: the prompts' but where the request sets its own."""
        r, own = self.request, self.sizes
        return SizeConditioning(
            own.original if r.negative_original_size is None else tuple(r.negative_original_size)[::-1],
            own.crop if r.negative_crop is None else tuple(r.negative_crop),
            own.target if r.negative_target_size is None else tuple(r.negative_target_size)[::-1],
        )
