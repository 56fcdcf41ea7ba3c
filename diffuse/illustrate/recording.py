"""What one illustrated generation recorded: the numbers every figure of the report is drawn from.

`diffuse.illustrate.record.record(pipe, ...)` fills a Recording by running the pipeline once
with hooks on its networks from outside (forward hooks and the step callback), so the figures
show exactly what this run computed. All tensors are float32 on the CPU, image 0 of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image
from torch import Tensor


@dataclass
class GuidanceRecord:
    """The UNet's two predictions at one step and what classifier-free guidance made of them."""

    uncond: Tensor  # [C, h, w] the prediction for the negative (or empty) prompt
    cond: Tensor  # [C, h, w] the prediction for the prompt
    guided: Tensor  # [C, h, w] uncond + scale * (cond - uncond), what the sampler used
    scale: float


@dataclass
class StepRecord:
    """One sampler step as the step callback saw it, with its wall time."""

    index: int  # 0-based
    timestep: float  # the timestep the UNet was told
    sigma: float  # the noise level the step started from (the sampler's sigma)
    latents: Tensor  # [C, h, w] the noisy latents after the step, in the UNet's (variance-preserving) scale
    denoised: Tensor  # [C, h, w] the sampler's clean estimate at this step
    seconds: float  # wall time of the step, UNet calls included
    guidance: GuidanceRecord | None = None  # at the steps asked for (record(..., guidance_steps=))


@dataclass
class AttentionRecord:
    """Cross-attention from the image to each prompt token, as DAAM gathers it: the softmax rows of
    every cross-attention layer, averaged over heads, upsampled to latent size, averaged over layers
    and steps (the conditional half of each guided batch)."""

    tokens: list[str]  # the prompt's tokens as the tokenizer gives them, start and end tokens left out
    positions: list[int]  # each token's position among the 77
    maps: Tensor  # [len(tokens), h, w] at latent resolution
    layers: int  # how many cross-attention layers were averaged
    steps: int  # over how many steps


@dataclass
class TextRecord:
    """The prompt through the tokenizer and the text encoder (the first 77-token chunk)."""

    ids: list[int]  # 77 token ids: start, the prompt's tokens, end, padding
    tokens: list[str]  # 77 token strings, as the tokenizer spells them
    prompt_length: int  # how many of the 77 are the prompt's own tokens (start and end left out)
    token_embeddings: Tensor  # [77, width] the embedding table's rows for the ids (before positions)
    output: Tensor  # [77, width] the text encoder's output the UNet attends to (cond); SDXL: its channels


@dataclass
class Recording:
    """One generation, recorded. `timings` holds seconds: "text_encoder", "unet" (all steps),
    "vae_decode", "total"; `shapes` the shapes of what flows between the parts: "token_ids",
    "context", "latents", "image" (lists of ints)."""

    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    sampler: str  # what a user types to get it back, e.g. "DPM++ 2M Karras"
    cfg_scale: float
    width: int
    height: int
    model: str  # the model's name as PNG parameters write it
    image: Image.Image
    text: TextRecord
    step_records: list[StepRecord]
    final_latents: Tensor  # [C, h, w] what the VAE decoded
    attention: AttentionRecord | None
    text_2: TextRecord | None = None  # SDXL's second encoder (bigG); the refiner's only one is `text`
    vector: Tensor | None = None  # [adm] SDXL's vector conditioning y for the prompt: pooled text, size sinusoids
    timings: dict[str, float] = field(default_factory=dict)
    shapes: dict[str, list[int]] = field(default_factory=dict)
