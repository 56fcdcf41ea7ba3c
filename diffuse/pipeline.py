"""The Stable Diffusion pipeline: prompt (and image, mask) in, images out.

    prompt ─tokenizer/text encoder─▶ context ─┐
    seed ─▶ noise latents ─▶ sampler loop: x ← step(x, unet(x, t, context)) ─▶ vae.decode ─▶ images
    (img2img / inpaint: vae.encode(image) plus a noise slice at the strength's step)

Everything a run used — seeds included — comes back in `Result.info`, so any
image can be made again.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from PIL import Image

from . import inputs
from .hashes import ModelHashes, model_hashes
from .metadata import infotext
from .models.clip import CLIPTextEncoder
from .models.configs import PipelineConfig
from .models.unet import UNet
from .models.vae import AutoencoderKL
from .numerics import Fallback, network_dtype
from .preview import latents_to_rgb_cheap, to_pil
from .prompts import encode_prompt_pair, encode_prompts
from .recipe import sampler_settings
from .samplers import Sampler, get_sampler
from .samplers.schedule import make_denoiser
from .speedups import DrivenUNet, Speedups
from .tokenizer import CLIPTokenizer

VERSION = "diffuse 0.1.0"


@dataclass
class Step:
    """What a per-step callback sees: step `index` of `total`, the timestep the UNet was told,
    the current noisy `latents` (in the UNet's scale) and the sampler's clean estimate `denoised`;
    `preview_matrix` is the model's latent -> RGB map (None: SD's)."""

    index: int
    total: int
    timestep: float
    latents: torch.Tensor
    denoised: torch.Tensor
    preview_matrix: Optional[torch.Tensor] = None

    def preview(self) -> list[Image.Image]:
        """A cheap look at the image emerging: a linear map from latents to RGB, no VAE (latent-sized)."""
        rgb = latents_to_rgb_cheap(self.denoised.float(), self.preview_matrix)
        return to_pil(rgb * 2 - 1)


@dataclass
class Result:
    images: list[Image.Image]
    seeds: list[int]
    info: dict  # the settings used (seed = the first image's)
    infotexts: list[str]  # A1111 "parameters" text per image, for PNG metadata


@dataclass
class _Job:
    """One validated request: everything the denoising loop needs, checked before any heavy work."""

    prompts: list[str]
    negative_prompts: list[str]
    width: int
    height: int
    steps: int
    guidance_scale: float
    sampler: Sampler
    seeds: list[int]
    clip_skip: int
    strength: float = 1.0
    image: Optional[torch.Tensor] = None  # [1, 3, H, W] in [-1, 1]
    mask: Optional[torch.Tensor] = None  # [1, 1, H, W] in {0, 1}; 1 = paint here
    keep_unmasked: bool = True
    eta: Optional[float] = None  # as asked for (None: the sampler's default)
    speedups: Speedups = field(default_factory=Speedups)
    nan_fallback: list[str] = field(default_factory=list)  # components the loop reran in float32 after a NaN


@dataclass
class Pipeline:
    """The tokenizer, the three networks and their config, and the generation entry points.

    `source` is the checkpoint file or folder the weights came from; `scheduler_config`
    the model's diffusers scheduler settings (empty: Stable Diffusion's defaults);
    `preview_matrix` the latent -> RGB map fitted to this model's VAE for step previews
    (diffuse.preview; None: SD 1.x/2.x's, right only for their VAE).
    """

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextEncoder
    unet: UNet
    vae: AutoencoderKL
    config: PipelineConfig
    source: Path
    scheduler_config: dict = field(default_factory=dict)
    preview_matrix: Optional[torch.Tensor] = None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @functools.cached_property
    def model_hashes(self) -> ModelHashes | None:
        """A1111's short model hash and the model's full sha256 (diffuse.hashes), from one read of
        its files, computed once.

        None for weights built in memory (no file at `source`): generating must not fail at
        the end, after the work, over a label."""
        if not self.source.exists():
            return None
        return model_hashes(self.source)

    @property
    def model_hash(self) -> str | None:
        """A1111's "Model hash": 10 hex digits of the checkpoint file's sha256 (a folder's UNet file's)."""
        return None if self.model_hashes is None else self.model_hashes.short

    @property
    def model_sha256(self) -> str | None:
        """The whole model's sha256: the file's, or for a folder one over all its parts' (diffuse.hashes)."""
        return None if self.model_hashes is None else self.model_hashes.sha256

    @property
    def model_name(self) -> str:
        return self.source.stem if self.source.is_file() else self.source.name

    @torch.no_grad()
    def encode_prompt(self, prompts: str | list[str], clip_skip: int = 1) -> torch.Tensor:
        """Text conditioning: prompts → token ids (75-token chunks, (word:1.2) weights) → context [B, 77·k, D]."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return encode_prompts(self.tokenizer, self.text_encoder, prompts, clip_skip=clip_skip)

    def get_sampler(self, name: str, schedule_type: str | None = None, eta: float | None = None) -> Sampler:
        """A sampler by its A1111 name ("Euler a", "DPM++ 2M Karras", ...) with this model's noise schedule."""
        config = {**self.scheduler_config, "prediction_type": self.config.prediction_type}
        return get_sampler(name, scheduler_config=config, schedule_type=schedule_type, eta=eta)

    # ---- the three entry points -------------------------------------------------------------

    def txt2img(self, prompt: str | list[str], negative_prompt: str | list[str] = "", width: int | None = None,
                height: int | None = None, steps: int = 20, guidance_scale: float = 7.5,
                sampler: str | Sampler = "DPM++ 2M Karras", seed: int | None = None, batch_size: int = 1,
                clip_skip: int = 1, callback: Callable[[Step], None] | None = None, schedule_type: str | None = None,
                eta: float | None = None, speedups: Speedups | None = None) -> Result:
        """Generate images from text, starting from pure noise.

        Width and height default to the size the model was trained at (512 for SD1, 768 for
        SD2's v-prediction models, 64 for the shipped model). `speedups` (diffuse.speedups,
        off by default) trade a small change of the image for time."""
        native = self.config.image_size
        width, height = (native if width is None else width), (native if height is None else height)
        job = self._job(prompt, negative_prompt, width, height, steps, guidance_scale, sampler, schedule_type,
                        seed, batch_size, clip_skip, eta=eta, speedups=speedups)
        return self._run(job, callback)

    def img2img(self, image: Image.Image | str | Path, prompt: str | list[str], strength: float = 0.75,
                negative_prompt: str | list[str] = "", width: int | None = None, height: int | None = None,
                steps: int = 20, guidance_scale: float = 7.5, sampler: str | Sampler = "DPM++ 2M Karras",
                seed: int | None = None, batch_size: int = 1, clip_skip: int = 1,
                callback: Callable[[Step], None] | None = None, schedule_type: str | None = None,
                eta: float | None = None, speedups: Speedups | None = None) -> Result:
        """Repaint an image: encode it, add the noise of step `strength`·steps, and denoise from there.

        Width and height default to the image's own size (rounded down to a multiple of 8)."""
        picture = inputs.open_image(image)
        width, height = self._size_for(picture, width, height)
        job = self._job(prompt, negative_prompt, width, height, steps, guidance_scale, sampler, schedule_type,
                        seed, batch_size, clip_skip, strength=strength, eta=eta, speedups=speedups)
        job.image = inputs.image_to_tensor(picture, width, height)
        return self._run(job, callback)

    def inpaint(self, image: Image.Image | str | Path, mask: Image.Image | str | Path, prompt: str | list[str],
                strength: float = 1.0, negative_prompt: str | list[str] = "", width: int | None = None,
                height: int | None = None, steps: int = 20, guidance_scale: float = 7.5,
                sampler: str | Sampler = "DPM++ 2M Karras", seed: int | None = None, batch_size: int = 1,
                clip_skip: int = 1, callback: Callable[[Step], None] | None = None, schedule_type: str | None = None,
                eta: float | None = None, keep_unmasked: bool = True, speedups: Speedups | None = None) -> Result:
        """Repaint only where the mask is white.

        A 9-channel inpainting UNet sees the mask and the masked image directly; a
        normal one is steered by putting the known region back (noised to the
        current step) after every step. With `keep_unmasked` the original pixels
        outside the mask are pasted back over the decoded result."""
        picture = inputs.open_image(image)
        mask_picture = inputs.open_image(mask, what="mask")
        inputs.check_mask_matches(picture, mask_picture)
        width, height = self._size_for(picture, width, height)
        job = self._job(prompt, negative_prompt, width, height, steps, guidance_scale, sampler, schedule_type,
                        seed, batch_size, clip_skip, strength=strength, eta=eta, speedups=speedups)
        job.image = inputs.image_to_tensor(picture, width, height)
        job.mask = inputs.mask_to_tensor(mask_picture, width, height)
        job.keep_unmasked = keep_unmasked
        return self._run(job, callback)

    # ---- checking a request -----------------------------------------------------------------

    def _size_for(self, picture: Image.Image, width: int | None, height: int | None) -> tuple[int, int]:
        own_w, own_h = inputs.default_size(picture, self.config.vae.downsample_factor)
        return (own_w if width is None else width), (own_h if height is None else height)

    def _job(self, prompt, negative_prompt, width, height, steps, guidance_scale, sampler_name, schedule_type,
             seed, batch_size, clip_skip, strength: float = 1.0, eta: float | None = None,
             speedups: Speedups | None = None) -> _Job:
        inputs.check_settings(width, height, steps, guidance_scale, batch_size, strength, eta,
                              multiple=self.config.vae.downsample_factor)
        inputs.check_clip_skip(clip_skip, self.config.text_encoder.layers)
        prompts = inputs.prompt_list(prompt, "prompt")
        prompts = [p for p in prompts for _ in range(batch_size)]
        negatives = inputs.prompt_list(negative_prompt, "negative_prompt", count=len(prompts) // batch_size)
        negatives = [n for n in negatives for _ in range(batch_size)]
        if len(prompts) > inputs.MAX_BATCH:
            raise ValueError(f"{len(prompts)} images requested at once; the limit is {inputs.MAX_BATCH}")
        first = inputs.resolve_seed(seed, count=len(prompts))
        # A ready Sampler (e.g. from sampler_from_diffusers_config) is used as it is.
        sampler = sampler_name if isinstance(sampler_name, Sampler) else self.get_sampler(sampler_name, schedule_type, eta)
        return _Job(prompts=prompts, negative_prompts=negatives, width=width, height=height, steps=steps,
                    guidance_scale=float(guidance_scale), sampler=sampler, seeds=[first + i for i in range(len(prompts))],
                    clip_skip=clip_skip, strength=float(strength), eta=None if eta is None else float(eta),
                    speedups=speedups or Speedups())

    def describe(self, prompt: str | list[str], negative_prompt: str | list[str] = "", *, width: int, height: int,
                 steps: int, guidance_scale: float, sampler: str | Sampler, seed: int, batch_size: int = 1,
                 clip_skip: int = 1, schedule_type: str | None = None, eta: float | None = None,
                 speedups: Speedups | None = None, strength: float = 1.0, image: Image.Image | None = None,
                 mask: Image.Image | None = None, keep_unmasked: bool = True) -> tuple[dict, list[str]]:
        """The generation info and the per-image parameters texts that a run with these settings
        records, without running it: for images made outside the loop (the server's interrupted
        rounds), so every PNG carries the same fields from this one place."""
        job = self._job(prompt, negative_prompt, width, height, steps, guidance_scale, sampler, schedule_type,
                        seed, batch_size, clip_skip, strength=strength, eta=eta, speedups=speedups)
        if image is not None:
            job.image = inputs.image_to_tensor(inputs.open_image(image), width, height)
        if mask is not None:
            job.mask = inputs.mask_to_tensor(inputs.open_image(mask, what="mask"), width, height)
            job.keep_unmasked = keep_unmasked
        return self._info(job)

    # ---- the denoising loop -----------------------------------------------------------------

    @torch.no_grad()
    def _run(self, job: _Job, callback: Callable[[Step], None] | None) -> Result:
        device, latent_scale = self.device, self.config.vae.scaling_factor
        factor = self.config.vae.downsample_factor
        shape = (self.config.vae.latent_channels, job.height // factor, job.width // factor)
        # One CPU generator per image, seeded seed + i (as A1111 does): image i is the same
        # whatever the batch size or device.
        generators = [torch.Generator("cpu").manual_seed(s) for s in job.seeds]

        def draw_noise() -> torch.Tensor:
            return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)

        # Each network output is checked; a non-finite one reruns that network in float32 (diffuse.numerics).
        fallback = Fallback(job.nan_fallback)

        def encode_image(pixels: torch.Tensor) -> torch.Tensor:
            """One picture [1, 3, H, W] → latents [B, ...]: a posterior sample per image, from its own generator."""
            posterior = fallback.run(self.vae, "VAE encoder",
                                     lambda: self.vae.encode(pixels.to(device, network_dtype(self.vae))),
                                     outputs=lambda p: (p.mean, p.std))
            return torch.cat([posterior.sample(g).float() for g in generators]) * latent_scale

        cond, uncond = self._conditioning(job)
        # txt2img, and inpainting at full strength, start from pure noise; img2img and
        # partial inpainting from the image plus the noise slice of the strength's step.
        from_noise = job.image is None or (job.mask is not None and job.strength == 1.0)
        plan = job.sampler.plan(job.steps)
        if not from_noise:
            plan = plan.from_strength(job.strength)
        sigmas = plan.sigmas.to(device)

        inpaint_unet = self.config.unet.in_channels == 9
        image_latents = mask_latents = masked_latents = None
        if job.image is not None and not (inpaint_unet and from_noise):
            image_latents = encode_image(job.image)
        noise = draw_noise()
        x = noise * plan.init_noise_scale if from_noise else image_latents + sigmas[0] * noise
        if job.mask is not None:
            mask_latents = torch.nn.functional.interpolate(job.mask, size=shape[1:]).to(device)
            if inpaint_unet:
                masked = job.image * (job.mask < 0.5)
                masked_latents = encode_image(masked)

        speed = job.speedups
        unet = DrivenUNet(self.unet, speed, shape[1:])
        # Guidance stops once the timestep falls to that of the first unguided step.
        guided_steps = round(speed.guidance_cutoff * plan.steps)
        last_guided_t = float(plan.timesteps[guided_steps]) if guided_steps < plan.steps else -1.0
        steps_done = 0

        def run_unet(x_in: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            """One UNet call, checked. After a non-finite output in a reduced precision the call is made
            again in float32, and the UNet stays float32 for the rest of this sampling: the same
            request then takes the same path again."""
            kept = unet.state()  # a retry must see the speed-ups as the first try did

            def compute() -> torch.Tensor:
                unet.restore(kept)
                dtype = network_dtype(self.unet)
                return unet(x_in.to(dtype), t, context.to(dtype))

            where = f" at step {steps_done + 1} of {plan.steps}"
            return fallback.run(self.unet, "UNet", compute, where=where, stay=True).float()

        def predict(x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            """The UNet's noise (or v) prediction with classifier-free guidance, as one batch of 2."""
            if inpaint_unet:
                x_vp = torch.cat([x_vp, mask_latents.expand(len(x_vp), -1, -1, -1), masked_latents], dim=1)
            if uncond is None or float(t.reshape(-1)[0]) <= last_guided_t:
                return run_unet(x_vp, t, cond)
            out = run_unet(torch.cat([x_vp, x_vp]), t, torch.cat([uncond, cond]))
            out_uncond, out_cond = out.chunk(2)
            return out_uncond + job.guidance_scale * (out_cond - out_uncond)

        def after_step(i: int, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor | None:
            nonlocal steps_done
            steps_done = i + 1
            if image_latents is not None and job.mask is not None and not inpaint_unet:
                # Keep the known region on track: the original latents, noised to the next step's level.
                s = sigmas[i + 1]
                last = i == plan.steps - 1
                known = image_latents * (1 + s**2) ** 0.5 if last else image_latents + s * noise
                x = (1 - mask_latents) * known + mask_latents * x
            if callback is not None:
                scale = (1 + sigmas[i + 1] ** 2) ** -0.5
                callback(Step(i, plan.steps, float(plan.timesteps[i]), x * scale, denoised, self.preview_matrix))
            return x

        denoise = make_denoiser(predict, self.config.prediction_type)  # what the model predicts is the model's fact
        with fallback:  # a UNet moved to float32 goes back to its own dtype however sampling ends
            x = job.sampler.run(denoise, x, plan, draw_noise, after_step)
        latents = x / (1 + sigmas[-1] ** 2) ** 0.5
        images = [to_pil(self.decode_latents(latents[i : i + 1], job.nan_fallback))[0] for i in range(len(latents))]
        if job.mask is not None and job.keep_unmasked:
            images = [_paste_unmasked(img, job.image, job.mask) for img in images]
        return self._result(job, images)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, nan_fallback: list[str] | None = None) -> torch.Tensor:
        """Latents (UNet scale) → pixels in [-1, 1], [B, 3, H, W].

        Checked to be finite: a non-finite decode in a reduced precision is redone in float32
        (and "VAE float32" added to `nan_fallback`); in float32 it raises NonFiniteError."""
        z = latents / self.config.vae.scaling_factor
        pixels = Fallback(nan_fallback).run(self.vae, "VAE decoder",
                                            lambda: self.vae.decode(z.to(network_dtype(self.vae))))
        return pixels.float()

    def _conditioning(self, job: _Job) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Context for the prompts and, when guidance is on, for the negative prompts (same length);
        checked to be finite, recomputed in float32 if it is not (diffuse.numerics)."""
        def encode() -> tuple[torch.Tensor, torch.Tensor | None]:
            if job.guidance_scale <= 1.0:  # no guidance: the unconditional pass would be wasted
                return encode_prompts(self.tokenizer, self.text_encoder, job.prompts, clip_skip=job.clip_skip), None
            return encode_prompt_pair(self.tokenizer, self.text_encoder, job.prompts, job.negative_prompts,
                                      clip_skip=job.clip_skip)

        return Fallback(job.nan_fallback).run(self.text_encoder, "text encoder", encode,
                                              outputs=lambda pair: tuple(c for c in pair if c is not None))

    def _result(self, job: _Job, images: list[Image.Image]) -> Result:
        info, texts = self._info(job)
        return Result(images=images, seeds=list(job.seeds), info=info, infotexts=texts)

    def _info(self, job: _Job) -> tuple[dict, list[str]]:
        """The first image's generation info, and every image's parameters text: what a PNG needs to
        be made again (diffuse.regenerate) and to tell whether that can match exactly."""
        info = {
            "prompt": job.prompts[0], "negative_prompt": job.negative_prompts[0], "steps": job.steps,
            "sampler": job.sampler.name, "schedule_type": job.sampler.schedule_type, "cfg_scale": job.guidance_scale,
            "seed": job.seeds[0], "width": job.width, "height": job.height, "model_hash": self.model_hash,
            "model": self.model_name, "clip_skip": job.clip_skip,
            "denoising_strength": job.strength if job.image is not None else None, "eta": job.eta,
            **job.speedups.info(),
            "init_image_hash": inputs.image_sha256(job.image) if job.image is not None else None,
            "mask_hash": inputs.mask_sha256(job.mask) if job.mask is not None else None,
            "keep_unmasked": job.keep_unmasked if job.mask is not None else None,
            "nan_fallback": ", ".join(job.nan_fallback) or None,
            # bf16 GEMMs may round differently at another batch size: exactness needs the same batch.
            "batch_size": len(job.seeds), "batch_pos": 0,
            "model_sha256": self.model_sha256, "dtype": str(self.dtype).removeprefix("torch."),
            "device": self.device.type, "sampler_settings": sampler_settings(job.sampler),
            "version": VERSION,
        }
        texts = [infotext({**info, "prompt": p, "negative_prompt": n, "seed": s, "batch_pos": i})
                 for i, (p, n, s) in enumerate(zip(job.prompts, job.negative_prompts, job.seeds))]
        return info, texts


def _paste_unmasked(generated: Image.Image, image: torch.Tensor, mask: torch.Tensor) -> Image.Image:
    """The original pixels outside the mask, the new ones inside (A1111's overlay)."""
    original = to_pil(image)[0]
    keep = Image.fromarray(((1 - mask[0, 0]) * 255).to(torch.uint8).numpy(), mode="L")
    return Image.composite(original, generated, keep)
