"""The Stable Diffusion pipeline: a GenerationRequest (prompt, and image, mask) in, images out.

    prompt ─tokenizer/text encoder─▶ context ─┐
    seed ─▶ noise latents ─▶ sampler loop: x ← step(x, unet(x, t, context)) ─▶ vae.decode ─▶ images
    (img2img / inpaint: vae.encode(image) plus a noise slice at the strength's step)

`Pipeline.generate` checks the request (diffuse.request) and runs its stages in this order:
conditioning, the plan of noise levels, the initial latents, the denoising loop, decoding.
txt2img, img2img and inpaint are the same call with their own keywords. Everything a run
used, seeds included, comes back in `Result.info`, so any image can be made again.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from diffuse import handoff, inputs
from diffuse.adapters.embeddings import embeddings_used, load_embeddings, load_sdxl_embeddings, per_encoder
from diffuse.adapters.library import AddonLibrary, LoraFile, LoraUse, MergedLoras
from diffuse.conditioning_xl import (
    AESTHETIC_SCORE,
    SizeConditioning,
    aesthetic_info,
    encode_prompt_pair_xl,
    encode_prompts_xl,
    size_info,
    vector_conditioning,
)
from diffuse.generation import (
    AfterStep,
    NoisePredictor,
    Start,
    Step,
    draw_noise,
    last_guided_timestep,
    paste_unmasked,
)
from diffuse.hashes import ModelHashes, model_hashes
from diffuse.metadata import format_addon_hashes, infotext
from diffuse.models.clip import CLIPTextEncoder
from diffuse.models.configs import PipelineConfig
from diffuse.models.unet import UNet
from diffuse.models.vae import AutoencoderKL
from diffuse.numerics import Fallback, network_dtype
from diffuse.preview import to_pil
from diffuse.prompts import encode_prompt_pair, encode_prompts
from diffuse.recipe import sampler_settings
from diffuse.request import GenerationRequest, Job, model_sampler
from diffuse.runtime import vae_tiles
from diffuse.samplers import Sampler
from diffuse.samplers.schedule import Plan, make_denoiser
from diffuse.speedups import DrivenUNet, Speedups
from diffuse.tokenizer import CLIPTokenizer

VERSION = "diffuse 0.1.0"
Callback = Callable[[Step], None]
Pair = tuple[torch.Tensor, torch.Tensor | None]  # for the prompts and, with guidance, the negative prompts


@dataclass
class Result:
    images: list[Image.Image]
    seeds: list[int]
    info: dict  # the settings used (seed = the first image's)
    infotexts: list[str]  # A1111 "parameters" text per image, for PNG metadata


@dataclass
class Pipeline:
    """The tokenizer, the three networks and their config, and the generation entry points.

    `source` is the checkpoint file or folder the weights came from; `scheduler_config`
    the model's diffusers scheduler settings (empty: Stable Diffusion's defaults);
    `preview_matrix` the latent -> RGB map fitted to this model's VAE for step previews
    (diffuse.preview; None: SD 1.x/2.x's, right only for their VAE); `addons` the LoRA and
    embedding folders whose files the prompts may name (diffuse.adapters.library; None: none).

    SDXL models also have a second tokenizer and text encoder (OpenCLIP bigG; None for SD 1/2);
    `zeros_for_empty_prompt` is their folder's `force_zeros_for_empty_prompt` (diffuse.conditioning_xl).
    The SDXL refiner has the second alone (`tokenizer` and `text_encoder` None): it continues
    another model's generation (`generate(request, refiner=...)`) or repaints an image.

    `quantize` is what the networks were prepared with (diffuse.runtime.prepare; None: not
    quantized, "int8"): set by load_pipeline, recorded in every image's parameters.
    """

    tokenizer: CLIPTokenizer | None
    text_encoder: CLIPTextEncoder | None
    unet: UNet
    vae: AutoencoderKL
    config: PipelineConfig
    source: Path
    scheduler_config: dict = field(default_factory=dict)
    preview_matrix: torch.Tensor | None = None
    addons: AddonLibrary | None = None
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextEncoder | None = None
    zeros_for_empty_prompt: bool = True
    quantize: str | None = None
    _merged: MergedLoras = field(init=False, repr=False)
    _embeddings: object = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        networks = {"unet": self.unet, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
        self._merged = MergedLoras({name: net for name, net in networks.items() if net is not None})
        self._embeddings = self._load_embeddings()

    @property
    def is_xl(self) -> bool:
        """An SDXL model: two text encoders, and size conditioning added to the time embedding."""
        return self.text_encoder_2 is not None

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
        """Text conditioning: prompts → token ids (75-token chunks, (word:1.2) weights) → context [B, 77·k, D].

        For SDXL the context is both encoders' side by side (its pooled vector: diffuse.conditioning_xl)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if self.is_xl:
            if clip_skip != 1:
                raise ValueError("clip_skip does not apply to SDXL, which reads both encoders' penultimate layer")
            return encode_prompts_xl(self._tokenizers(), self._text_encoders(), prompts, self._xl_embeddings())[0]
        return encode_prompts(self.tokenizer, self.text_encoder, prompts, clip_skip=clip_skip)

    def unet_conditioning(
        self, prompts: str | list[str], width: int, height: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the UNet reads for prompts at an image size: the context and, for SDXL, the vector y
        (the pooled text and the size conditioning; None for SD 1/2)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not self.is_xl:
            return self.encode_prompt(prompts), None
        context, pooled = encode_prompts_xl(self._tokenizers(), self._text_encoders(), prompts, self._xl_embeddings())
        score = AESTHETIC_SCORE if self.config.aesthetic_score else None  # the request's default
        sizes = SizeConditioning.plain(height, width)
        return context, vector_conditioning(pooled, sizes, self.config.size_embed_dim, score)

    def get_sampler(self, name: str, schedule_type: str | None = None, eta: float | None = None) -> Sampler:
        """A sampler by its A1111 name ("Euler a", "DPM++ 2M Karras", ...) with this model's noise schedule."""
        return model_sampler(name, self.config, self.scheduler_config, schedule_type, eta)

    # ---- add-ons -------------------------------------------------------------------------------

    def loras(self) -> list[LoraFile]:
        """The LoRA files the prompts may name (`<lora:NAME:W>`), as found in the LoRA folders."""
        return [] if self.addons is None else list(self.addons.loras)

    def embeddings(self):
        """The embeddings found in the embedding folders: (loaded, skipped), as diffuse.adapters.embeddings
        reads them (skipped: files that do not fit this model's text encoder, with the reason)."""
        return self._embeddings if self._embeddings is not None else ({}, {})

    def refresh_addons(self) -> None:
        """Look in the add-on folders again; the next generation sees files added, changed or removed."""
        if self.addons is not None:
            self.addons.refresh()
            self._embeddings = self._load_embeddings()

    def check_addons(self, request: GenerationRequest) -> None:
        """Every LoRA the request's prompts name is in the folders (ValueError naming the first that is not)."""
        self._lora_uses(request.resolve(self.config, self.scheduler_config))

    def restore_weights(self) -> None:
        """Take any merged LoRAs out: the networks are again bit for bit as loaded."""
        self._merged.restore()

    def _load_embeddings(self):
        if self.addons is None or not self.addons.embedding_dirs:
            return None
        if self.is_xl:  # a half per encoder (clip_l, clip_g); the refiner has bigG's alone
            first = None if self.text_encoder is None else self.text_encoder.cfg.width
            return load_sdxl_embeddings(self.addons.embedding_dirs, (first, self.text_encoder_2.cfg.width))
        return load_embeddings(self.addons.embedding_dirs, self.config.text_encoder.width)

    def _xl_embeddings(self) -> list[dict] | None:
        """Each SDXL text encoder's halves of the embeddings, in the order of _text_encoders()."""
        if self._embeddings is None:
            return None
        halves = per_encoder(self._embeddings[0])
        return list(halves if self.text_encoder is not None else halves[1:])

    def _lora_uses(self, job: Job) -> list[LoraUse]:
        """The files the job's `<lora:...>` tags name; an unknown name is an error before any work."""
        if not job.loras:
            return []
        if self.addons is None:
            raise ValueError(f"the prompt names LoRA {job.loras[0].name!r}, but no LoRA folder was given")
        return [LoraUse(self.addons.find_lora(t.name), t.te_weight, t.unet_weight) for t in job.loras]

    def _encode_options(self) -> dict:
        """The embeddings for the prompt encoder, when there are any."""
        return {} if self._embeddings is None else {"embeddings": self._embeddings[0]}

    # ---- the entry points -------------------------------------------------------------------

    def generate(
        self, request: GenerationRequest, callback: Callback | None = None, refiner: Pipeline | None = None
    ) -> Result:
        """Make the images a request asks for; `callback` sees every sampler step (Step).

        The request is checked in full before any network runs (ValueError names the setting), and
        the LoRAs its prompts name are found before any is merged. They stay merged for the next
        generation with the same set and are taken out when the set changes.

        `refiner`, another loaded SDXL pipeline (usually the SDXL refiner), takes over at
        `request.refiner_switch_at` of the denoising: this model walks the noise levels down to
        that point and the refiner the rest from its latents, with its own conditioning, and
        decodes (A1111's refiner; diffusers' denoising_end and denoising_start)."""
        job = request.resolve(self.config, self.scheduler_config)
        self._check_refiner(job, refiner)
        return self._run(job, self._lora_uses(job), callback, refiner)

    def describe(self, request: GenerationRequest, refiner: Pipeline | None = None) -> tuple[dict, list[str]]:
        """The generation info and the per-image parameters texts that running `request` records,
        without running it: for images made outside the loop (the server's interrupted rounds),
        so every PNG carries the same fields from this one place."""
        return self._info(request.resolve(self.config, self.scheduler_config), refiner)

    def txt2img(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] = "",
        width: int | None = None,
        height: int | None = None,
        steps: int = 20,
        guidance_scale: float = 7.5,
        sampler: str | Sampler = "DPM++ 2M Karras",
        seed: int | None = None,
        batch_size: int = 1,
        clip_skip: int = 1,
        callback: Callback | None = None,
        schedule_type: str | None = None,
        eta: float | None = None,
        speedups: Speedups | None = None,
    ) -> Result:
        """Generate images from text, starting from pure noise (GenerationRequest without an image).

        Width and height default to the size the model was trained at (512 for SD1, 768 for
        SD2's v-prediction models, 64 for the shipped model). `speedups` (diffuse.speedups,
        off by default) trade a small change of the image for time."""
        request = GenerationRequest(
            prompt=prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            steps=steps,
            guidance_scale=guidance_scale,
            sampler=sampler,
            schedule_type=schedule_type,
            seed=seed,
            batch_size=batch_size,
            clip_skip=clip_skip,
            eta=eta,
            speedups=speedups,
        )
        return self.generate(request, callback)

    def img2img(
        self,
        image: Image.Image | str | Path,
        prompt: str | list[str],
        strength: float = 0.75,
        negative_prompt: str | list[str] = "",
        width: int | None = None,
        height: int | None = None,
        steps: int = 20,
        guidance_scale: float = 7.5,
        sampler: str | Sampler = "DPM++ 2M Karras",
        seed: int | None = None,
        batch_size: int = 1,
        clip_skip: int = 1,
        callback: Callback | None = None,
        schedule_type: str | None = None,
        eta: float | None = None,
        speedups: Speedups | None = None,
    ) -> Result:
        """Repaint an image: encode it, add the noise of step `strength`·steps, and denoise from there.

        Width and height default to the image's own size (rounded down to a multiple of 8)."""
        _given(image=image)
        request = GenerationRequest(
            prompt=prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            steps=steps,
            guidance_scale=guidance_scale,
            sampler=sampler,
            schedule_type=schedule_type,
            seed=seed,
            batch_size=batch_size,
            clip_skip=clip_skip,
            eta=eta,
            speedups=speedups,
            image=image,
            strength=strength,
        )
        return self.generate(request, callback)

    def inpaint(
        self,
        image: Image.Image | str | Path,
        mask: Image.Image | str | Path,
        prompt: str | list[str],
        strength: float = 1.0,
        negative_prompt: str | list[str] = "",
        width: int | None = None,
        height: int | None = None,
        steps: int = 20,
        guidance_scale: float = 7.5,
        sampler: str | Sampler = "DPM++ 2M Karras",
        seed: int | None = None,
        batch_size: int = 1,
        clip_skip: int = 1,
        callback: Callback | None = None,
        schedule_type: str | None = None,
        eta: float | None = None,
        keep_unmasked: bool = True,
        speedups: Speedups | None = None,
    ) -> Result:
        """Repaint only where the mask is white.

        A 9-channel inpainting UNet sees the mask and the masked image directly; a
        normal one is steered by putting the known region back (noised to the
        current step) after every step. With `keep_unmasked` the original pixels
        outside the mask are pasted back over the decoded result."""
        _given(image=image, mask=mask)
        request = GenerationRequest(
            prompt=prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            steps=steps,
            guidance_scale=guidance_scale,
            sampler=sampler,
            schedule_type=schedule_type,
            seed=seed,
            batch_size=batch_size,
            clip_skip=clip_skip,
            eta=eta,
            speedups=speedups,
            image=image,
            mask=mask,
            strength=strength,
            keep_unmasked=keep_unmasked,
        )
        return self.generate(request, callback)

    # ---- the stages of a generation ---------------------------------------------------------

    @torch.no_grad()
    def _run(
        self, job: Job, loras: list[LoraUse], callback: Callback | None, refiner: Pipeline | None = None
    ) -> Result:
        # One CPU generator per image, seeded seed + i (as A1111 does): image i is the same
        # whatever the batch size or device.
        generators = [torch.Generator("cpu").manual_seed(s) for s in job.seeds]
        # Each network output is checked; a non-finite one reruns that network in float32 (diffuse.numerics).
        fallback = Fallback(job.nan_fallback)
        self._merged.use(loras)  # before encoding: a LoRA changes the text encoder too
        context, vectors = self._conditioning(job) if not self.is_xl else self._conditioning_xl(job)
        plan = self._plan(job)
        start = self._initial_latents(job, plan, generators, fallback)
        sampler = job.sampler
        if refiner is not None:
            plan, rest = handoff.split_plan(plan, job.request.refiner_switch_at, self._train_timesteps())
            sampler = handoff.head_sampler(sampler)
            callback, refiner_callback = (
                handoff.counted(callback, 0, plan.steps + rest.steps),
                handoff.counted(callback, plan.steps, plan.steps + rest.steps),
            )
        latents = self._denoise(job, plan, start, context, generators, fallback, callback, vectors, sampler)
        if refiner is not None:
            images = refiner._refine(job, rest, latents, generators, fallback, refiner_callback)
            return self._result(job, images, refiner)
        return self._result(job, self._decode(job, latents))

    def _check_refiner(self, job: Job, refiner: Pipeline | None) -> None:
        """A hand-off needs both the switch point and the refiner, SDXL models on the same latents,
        and what the refiner's part cannot take yet refused before any work."""
        switch = job.request.refiner_switch_at
        if refiner is None:
            if switch is not None:
                raise ValueError(f"refiner_switch_at {switch} needs a refiner pipeline to switch to")
            return
        if switch is None:
            raise ValueError(
                "a refiner was given without refiner_switch_at (the fraction of the steps to hand over at)"
            )
        if not (self.is_xl and refiner.is_xl):
            raise ValueError("the refiner hand-off is for SDXL models: both the model and its refiner must be SDXL")
        if refiner.quantize != self.quantize:  # the parameters record one Quantize for both
            raise ValueError(
                f"the refiner was loaded with quantize={refiner.quantize!r} and the model with "
                f"quantize={self.quantize!r}: load both alike"
            )
        if (refiner.config.vae.latent_channels, refiner.config.vae.downsample_factor) != (
            self.config.vae.latent_channels,
            self.config.vae.downsample_factor,
        ):
            raise ValueError(f"the refiner {refiner.model_name!r} works on other latents than {self.model_name!r}")
        if refiner.config.unet.in_channels != refiner.config.vae.latent_channels:
            raise ValueError(f"the refiner {refiner.model_name!r} is an inpainting model, which cannot continue")
        handoff.split_plan(self._plan(job), switch, self._train_timesteps())  # both parts must get steps

    def _train_timesteps(self) -> int:
        return int(self.scheduler_config.get("num_train_timesteps", 1000))

    def _refine(
        self, job: Job, plan: Plan, latents: torch.Tensor, generators: list, fallback: Fallback, callback
    ) -> list[Image.Image]:
        """The refiner's part of a hand-off: its own conditioning (bigG alone, the aesthetic scores),
        the rest of the plan from the base's latents, and its VAE's decoding.

        No noise is drawn for the start: the latents carry the base's. Inpainting puts the base's
        latents back outside the mask after each step, noised to the next level with a slice drawn
        now, as diffusers' SDXL inpainting pipeline does from denoising_start (the base's part
        ends with the image's own latents there)."""
        context, vectors = self._conditioning_xl(job)
        latents = latents.to(self.device)
        x = latents * (1 + plan.sigmas[0] ** 2) ** 0.5  # back to the sampler's scale
        start = Start(x, torch.zeros_like(x))
        if job.mask is not None:
            noise = draw_noise(generators, self._latent_shape(job), self.device)
            start = Start(x, noise, latents, self._latent_mask(job))
        return self._decode(job, self._denoise(job, plan, start, context, generators, fallback, callback, vectors))

    def _conditioning(self, job: Job) -> tuple[Pair, None]:
        """Context for the prompts and, when guidance is on, for the negative prompts (same length);
        checked to be finite, recomputed in float32 if it is not (diffuse.numerics). SD 1/2 have
        no vector conditioning (None)."""

        def encode() -> tuple[torch.Tensor, torch.Tensor | None]:
            options = {"clip_skip": job.clip_skip, **self._encode_options()}
            if job.guidance_scale <= 1.0:  # no guidance: the unconditional pass would be wasted
                return encode_prompts(self.tokenizer, self.text_encoder, job.texts, **options), None
            return encode_prompt_pair(self.tokenizer, self.text_encoder, job.texts, job.negative_texts, **options)

        contexts = Fallback(job.nan_fallback).run(
            self.text_encoder, "text encoder", encode, outputs=lambda pair: tuple(c for c in pair if c is not None)
        )
        return contexts, None

    def _tokenizers(self) -> tuple[CLIPTokenizer, ...]:
        """SDXL's tokenizers, in the order their contexts are joined (the refiner: bigG's alone)."""
        return tuple(t for t in (self.tokenizer, self.tokenizer_2) if t is not None)

    def _text_encoders(self) -> tuple[CLIPTextEncoder, ...]:
        return tuple(e for e in (self.text_encoder, self.text_encoder_2) if e is not None)

    def _conditioning_xl(self, job: Job) -> tuple[Pair, Pair]:
        """SDXL's contexts and vectors y (pooled text and sizes), for the prompts and, when guidance
        is on, the negative prompts; a non-finite output reruns both encoders in float32."""
        tokenizers, encoders, embeddings = self._tokenizers(), self._text_encoders(), self._xl_embeddings()

        def encode():
            if job.guidance_scale <= 1.0:
                return encode_prompts_xl(tokenizers, encoders, job.texts, embeddings), None
            negatives, zeros = job.negative_texts, self.zeros_for_empty_prompt
            return encode_prompt_pair_xl(tokenizers, encoders, job.texts, negatives, zeros, embeddings)

        cond, uncond = Fallback(job.nan_fallback).run(
            torch.nn.ModuleList(encoders),
            "text encoder",
            encode,
            outputs=lambda pair: tuple(t for side in pair if side is not None for t in side),
        )
        dim = self.config.size_embed_dim
        # The refiner's y ends with an aesthetic score: high for the prompts, low for the negative ones.
        scores = job.request.aesthetic_score, job.request.negative_aesthetic_score
        score, negative_score = scores if self.config.aesthetic_score else (None, None)
        y = vector_conditioning(cond[1], job.sizes, dim, score)
        if uncond is None:
            return (cond[0], None), (y, None)
        return (cond[0], uncond[0]), (y, vector_conditioning(uncond[1], job.negative_sizes, dim, negative_score))

    @staticmethod
    def _plan(job: Job) -> Plan:
        """The noise levels to walk: all of them from pure noise, the last strength·steps from an image."""
        plan = job.sampler.plan(job.steps)
        return plan if job.from_noise else plan.from_strength(job.strength)

    def _latent_shape(self, job: Job) -> tuple[int, int, int]:
        factor = self.config.vae.downsample_factor
        return self.config.vae.latent_channels, job.height // factor, job.width // factor

    def _initial_latents(self, job: Job, plan: Plan, generators: list[torch.Generator], fallback: Fallback) -> Start:
        """Pure noise, or the image's latents plus the noise slice of the plan's first level; for
        inpainting also the mask at latent size and, for a 9-channel UNet, the masked image's latents.

        The generators are drawn in a fixed order (image posterior, noise, masked image) so that
        a seed gives the same picture however the request is made."""
        shape, device = self._latent_shape(job), self.device
        inpaint_unet = self.config.unet.in_channels == 9
        image_latents = mask_latents = masked_latents = None
        if job.image is not None and not (inpaint_unet and job.from_noise):
            image_latents = self._encode_image(job.image, generators, fallback)
        noise = draw_noise(generators, shape, device)
        sigmas = plan.sigmas.to(device)
        x = noise * plan.init_noise_scale if job.from_noise else image_latents + sigmas[0] * noise
        if job.mask is not None:
            mask_latents = self._latent_mask(job)
            if inpaint_unet:
                masked_latents = self._encode_image(job.image * (job.mask < 0.5), generators, fallback)
        return Start(x, noise, image_latents, mask_latents, masked_latents)

    def _latent_mask(self, job: Job) -> torch.Tensor:
        """The mask at latent size (nearest pixel, as diffusers takes it)."""
        return torch.nn.functional.interpolate(job.mask, size=self._latent_shape(job)[1:]).to(self.device)

    @torch.no_grad()
    def encode_posterior(self, pixels: torch.Tensor, fallback: Fallback | None = None):
        """The VAE encoder's Gaussian over raw (unscaled) latents for pixels [B, 3, H, W] in [-1, 1], as
        img2img draws from it; retried in float32 where a half precision gives a non-finite mean or
        spread (recorded in `fallback`, a fresh one if None)."""
        return (fallback or Fallback()).run(
            self.vae,
            "VAE encoder",
            lambda: self.vae.encode(pixels.to(self.device, network_dtype(self.vae))),
            outputs=lambda p: (p.mean, p.std),
        )

    def _encode_image(
        self, pixels: torch.Tensor, generators: list[torch.Generator], fallback: Fallback
    ) -> torch.Tensor:
        """One picture [1, 3, H, W] → latents [B, ...]: a posterior sample per image, from its own generator."""
        posterior = self.encode_posterior(pixels, fallback)
        return torch.cat([posterior.sample(g).float() for g in generators]) * self.config.vae.scaling_factor

    def _denoise(
        self,
        job: Job,
        plan: Plan,
        start: Start,
        context: tuple[torch.Tensor, torch.Tensor | None],
        generators: list[torch.Generator],
        fallback: Fallback,
        callback: Callback | None,
        vectors: Pair | None = None,
        sampler: Sampler | None = None,
    ) -> torch.Tensor:
        """The sampler's loop from `start`, guided by the prompts (and for SDXL the vectors y); the
        final latents in the UNet's scale. `sampler`: the job's unless given (a hand-off's first part)."""
        sampler = sampler or job.sampler
        shape, sigmas = self._latent_shape(job), plan.sigmas.to(self.device)
        driven = DrivenUNet(self.unet, job.speedups, shape[1:])
        inpaint_unet = self.config.unet.in_channels == 9
        predictor = NoisePredictor(
            self.unet,
            driven,
            fallback,
            context,
            job.guidance_scale,
            last_guided_timestep(plan.timesteps, plan.steps, job.speedups.guidance_cutoff),
            plan.steps,
            (start.mask, start.masked_image) if inpaint_unet else None,
            vectors,
        )
        blend_known = start.image is not None and start.mask is not None and not inpaint_unet
        after_step = AfterStep(predictor, plan, sigmas, start, blend_known, callback, self.preview_matrix)
        denoise = make_denoiser(predictor, self.config.prediction_type)  # what the model predicts is the model's fact
        with fallback:  # a UNet moved to float32 goes back to its own dtype however sampling ends
            x = sampler.run(denoise, start.x, plan, lambda: draw_noise(generators, shape, self.device), after_step)
        return x / (1 + sigmas[-1] ** 2) ** 0.5

    def _decode(self, job: Job, latents: torch.Tensor) -> list[Image.Image]:
        """Each image decoded alone; inpainting pastes the original pixels back outside the mask if asked."""
        images = [to_pil(self.decode_latents(latents[i : i + 1], job.nan_fallback))[0] for i in range(len(latents))]
        if job.mask is not None and job.keep_unmasked:
            images = [paste_unmasked(img, job.image, job.mask) for img in images]
        return images

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, nan_fallback: list[str] | None = None) -> torch.Tensor:
        """Latents (UNet scale) → pixels in [-1, 1], [B, 3, H, W].

        Checked to be finite: a non-finite decode in a reduced precision is redone in float32
        (and "VAE float32" added to `nan_fallback`); in float32 it raises NonFiniteError."""
        z = latents / self.config.vae.scaling_factor
        pixels = Fallback(nan_fallback).run(
            self.vae, "VAE decoder", lambda: vae_tiles.decode(self.vae, z.to(network_dtype(self.vae)))
        )
        return pixels.float()

    # ---- what a run records -----------------------------------------------------------------

    def _result(self, job: Job, images: list[Image.Image], refiner: Pipeline | None = None) -> Result:
        info, texts = self._info(job, refiner)
        return Result(images=images, seeds=list(job.seeds), info=info, infotexts=texts)

    def _info(self, job: Job, refiner: Pipeline | None = None) -> tuple[dict, list[str]]:
        """The first image's generation info, and every image's parameters text: what a PNG needs to
        be made again (diffuse.regenerate) and to tell whether that can match exactly."""
        info = {
            "prompt": job.prompts[0],
            "negative_prompt": job.negative_prompts[0],
            "steps": job.steps,
            "sampler": job.sampler.name,
            "schedule_type": job.sampler.schedule_type,
            "cfg_scale": job.guidance_scale,
            "seed": job.seeds[0],
            "width": job.width,
            "height": job.height,
            "model_hash": self.model_hash,
            "model": self.model_name,
            "clip_skip": job.clip_skip,
            "denoising_strength": job.strength if job.image is not None else None,
            "eta": job.eta,
            **handoff.refiner_info(refiner, job.request.refiner_switch_at),
            **self._aesthetic_info(job, refiner),
            **size_info(job.sizes, job.negative_sizes),
            **job.speedups.info(),
            "init_image_hash": inputs.image_sha256(job.image) if job.image is not None else None,
            "mask_hash": inputs.mask_sha256(job.mask) if job.mask is not None else None,
            "keep_unmasked": job.keep_unmasked if job.mask is not None else None,
            "nan_fallback": ", ".join(job.nan_fallback) or None,
            **self._addon_hashes(job),
            # Reduced-precision GEMMs may round differently at another batch size: exactness needs the same batch.
            "batch_size": len(job.seeds),
            "batch_pos": 0,
            "model_sha256": self.model_sha256,
            "dtype": str(self.dtype).removeprefix("torch."),
            "quantize": self.quantize,
            "device": self.device.type,
            "sampler_settings": sampler_settings(job.sampler),
            "version": VERSION,
        }
        texts = [
            infotext({**info, "prompt": p, "negative_prompt": n, "seed": s, "batch_pos": i})
            for i, (p, n, s) in enumerate(zip(job.prompts, job.negative_prompts, job.seeds))
        ]
        return info, texts

    def _aesthetic_info(self, job: Job, refiner: Pipeline | None) -> dict:
        """The aesthetic scores where a refiner reads them: the hand-off's, or this model's if it is one."""
        if not (refiner or self).config.aesthetic_score:
            return {}
        return aesthetic_info(job.request.aesthetic_score, job.request.negative_aesthetic_score)

    def _addon_hashes(self, job: Job) -> dict:
        """A1111's "Lora hashes" and "TI hashes": each add-on the prompts used, by its name there."""
        loras = [(tag.name, use.file.short_hash()) for tag, use in zip(job.loras, self._lora_uses(job))]
        return {"lora_hashes": format_addon_hashes(loras), "ti_hashes": format_addon_hashes(self._used_embeddings(job))}

    def _used_embeddings(self, job: Job) -> list[tuple[str, str]]:
        """The embeddings the job's prompts name, found as the encoder finds them (on token ids)."""
        if self._embeddings is None:
            return []
        loaded = self._embeddings[0]
        names = embeddings_used(self._tokenizers()[0], [*job.texts, *job.negative_texts], loaded)
        return [(name, loaded[name].short_hash) for name in names]


def _given(**pictures: object) -> None:
    """img2img and inpaint need their pictures: a missing one must not turn the request into another kind."""
    for what, picture in pictures.items():
        if picture is None:
            raise ValueError(f"{what} must be a PIL image or a file path, got None")
