"""The parts of one generation's denoising loop that outlive a single call.

The sampler walks the noise levels and asks for a prediction at each; `NoisePredictor` answers
it (classifier-free guidance up to its cut-off, a 9-channel inpainting UNet's extra inputs, the
float32 retry), and `AfterStep` runs after each step (putting the known region back for a plain
UNet's inpainting, reporting the Step). Latents are in the UNet's variance-preserving scale
inside the predictor and the step report, and in the sampler's variance-exploding scale between
them: x_ve = x_vp * sqrt(1 + sigma^2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor, nn

from diffuse.numerics import Fallback, network_dtype
from diffuse.preview import latents_to_rgb_cheap, to_pil
from diffuse.samplers.schedule import Plan
from diffuse.speedups import DrivenUNet


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
    preview_matrix: torch.Tensor | None = None

    def preview(self) -> list[Image.Image]:
        """A cheap look at the image emerging: a linear map from latents to RGB, no VAE (latent-sized)."""
        rgb = latents_to_rgb_cheap(self.denoised.float(), self.preview_matrix)
        return to_pil(rgb * 2 - 1)


@dataclass
class Start:
    """Where sampling starts: the latents at the plan's first noise level, and what inpainting keeps."""

    x: Tensor  # the sampler's starting latents (variance-exploding scale)
    noise: Tensor  # the noise slice drawn for them, one per image
    image: Tensor | None = None  # the input image's latents (img2img, inpainting by putting it back)
    mask: Tensor | None = None  # the mask at latent size, 1 = paint here
    masked_image: Tensor | None = None  # a 9-channel inpainting UNet's view of the image outside the mask


def draw_noise(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> Tensor:
    """N(0, 1) latents, image i from generator i, drawn on the CPU so a seed means the same on any device."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


class NoisePredictor:
    """The UNet's noise (or v) prediction for latents at timestep t, as the sampler asks for it.

    With guidance the unconditional and conditional passes run as one batch of 2; guidance stops
    at the timestep of the first step past the speed-ups' cut-off. Each call is checked: after a
    non-finite output in a reduced precision it is made again in float32, and the UNet stays
    float32 for the rest of this sampling, so the same request takes the same path again."""

    def __init__(
        self,
        unet: nn.Module,
        driven: DrivenUNet,
        fallback: Fallback,
        context: tuple[Tensor, Tensor | None],
        guidance_scale: float,
        last_guided_t: float,
        total_steps: int,
        inpaint_inputs: tuple[Tensor, Tensor] | None = None,
        vectors: tuple[Tensor, Tensor | None] | None = None,
    ):
        self.unet, self.driven, self.fallback = unet, driven, fallback
        self.cond, self.uncond = context
        # SDXL's vector conditioning y for the prompts and the negative prompts, batched like the context.
        self.y_cond, self.y_uncond = vectors if vectors is not None else (None, None)
        self.guidance_scale, self.last_guided_t = guidance_scale, last_guided_t
        self.total_steps, self.steps_done = total_steps, 0
        self.inpaint_inputs = inpaint_inputs  # (mask latents, masked-image latents) for a 9-channel UNet

    def __call__(self, x_vp: Tensor, t: Tensor) -> Tensor:
        if self.inpaint_inputs is not None:
            mask, masked_image = self.inpaint_inputs
            x_vp = torch.cat([x_vp, mask.expand(len(x_vp), -1, -1, -1), masked_image], dim=1)
        if self.uncond is None or float(t.reshape(-1)[0]) <= self.last_guided_t:
            return self._checked_unet(x_vp, t, self.cond, self.y_cond)
        y = None if self.y_cond is None else torch.cat([self.y_uncond, self.y_cond])
        out = self._checked_unet(torch.cat([x_vp, x_vp]), t, torch.cat([self.uncond, self.cond]), y)
        out_uncond, out_cond = out.chunk(2)
        return out_uncond + self.guidance_scale * (out_cond - out_uncond)

    def _checked_unet(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None) -> Tensor:
        kept = self.driven.state()  # a retry must see the speed-ups as the first try did

        def compute() -> Tensor:
            self.driven.restore(kept)
            dtype = network_dtype(self.unet)
            return self.driven(x.to(dtype), t, context.to(dtype), None if y is None else y.to(dtype))

        where = f" at step {self.steps_done + 1} of {self.total_steps}"
        return self.fallback.run(self.unet, "UNet", compute, where=where, stay=True).float()


def last_guided_timestep(timesteps: Tensor, steps: int, guidance_cutoff: float) -> float:
    """The timestep of the first step without guidance (-1: every step is guided)."""
    guided_steps = round(guidance_cutoff * steps)
    return float(timesteps[guided_steps]) if guided_steps < steps else -1.0


class AfterStep:
    """What happens after each sampler step: a plain UNet's inpainting puts the known region back,
    noised to the next step's level, and the callback sees the step."""

    def __init__(
        self,
        predictor: NoisePredictor,
        plan: Plan,
        sigmas: Tensor,
        start: Start,
        blend_known: bool,
        callback: Callable[[Step], None] | None,
        preview_matrix: Tensor | None,
    ):
        self.predictor, self.sigmas, self.timesteps, self.start = predictor, sigmas, plan.timesteps, start
        self.blend_known, self.callback, self.preview_matrix = blend_known, callback, preview_matrix
        self.total = plan.steps

    def __call__(self, i: int, x: Tensor, denoised: Tensor) -> Tensor:
        self.predictor.steps_done = i + 1
        if self.blend_known:
            x = self._put_back_known(i, x)
        if self.callback is not None:
            scale = (1 + self.sigmas[i + 1] ** 2) ** -0.5
            self.callback(Step(i, self.total, float(self.timesteps[i]), x * scale, denoised, self.preview_matrix))
        return x

    def _put_back_known(self, i: int, x: Tensor) -> Tensor:
        """The original latents outside the mask, noised to the level after step i (none after the last)."""
        s, image, mask = self.sigmas[i + 1], self.start.image, self.start.mask
        known = image * (1 + s**2) ** 0.5 if i == self.total - 1 else image + s * self.start.noise
        return (1 - mask) * known + mask * x


def paste_unmasked(generated: Image.Image, image: Tensor, mask: Tensor) -> Image.Image:
    """The original pixels outside the mask, the new ones inside (A1111's overlay)."""
    original = to_pil(image)[0]
    keep = Image.fromarray(((1 - mask[0, 0]) * 255).to(torch.uint8).numpy(), mode="L")
    return Image.composite(original, generated, keep)
