"""Image-for-image parity with diffusers' Stable Diffusion pipelines on the same tiny random weights.

Both sides load the same saved diffusers folder; the reference swaps in the
diffusers scheduler that corresponds to our sampler. Same seed, 10 steps,
guidance 7.5: the 8-bit images may differ by at most 2/255 per channel.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_reference
from PIL import Image

import diffuse

PIXEL_TOL = 2  # out of 255
STEPS = 10
SIZE = 32  # pixels; the tiny VAE downsamples 4x, so the latents are 8x8
PROMPT = "a red circle above a blue square"
NEGATIVE = "blurry, green"

# Our A1111 sampler name → (diffusers scheduler class, extra config).
DETERMINISTIC = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler Karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}

# Samplers that add fresh noise every step. They draw it from the same per-image CPU
# generator as the start noise, after it, as diffusers does: so these match too.
STOCHASTIC = {
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DDPM": ("DDPMScheduler", {}),
    "LCM": ("LCMScheduler", {}),
}

# Where we follow the original samplers (CompVis / k-diffusion, as A1111 runs them) and
# diffusers does something else; the sampler unit tests pin our behaviour in both cases.
DIVERGES = {
    ("sd2", "PLMS"): "diffusers' PNDM extrapolates raw v outputs and converts them with the current latent; "
    "we convert each output to noise first, as the original PLMS does",
    ("img2img", "LMS"): "diffusers' LMS keeps the full schedule's step index in img2img and weights its first "
    "slope with a 4th-order coefficient; we start the multistep history fresh, as k-diffusion does",
}


def skip_known_divergence(*key) -> None:
    if key in DIVERGES:
        pytest.skip(DIVERGES[key])


@pytest.fixture(scope="module")
def ours(reference_folders):
    return {name: diffuse.load_pipeline(folder, dtype="float32") for name, folder in reference_folders.items()}


def reference(reference_pipes, style: str, sampler: str, kind: str = "txt2img"):
    import diffusers

    base = reference_pipes[style]
    class_name, extra = {**DETERMINISTIC, **STOCHASTIC}[sampler]
    scheduler = getattr(diffusers, class_name).from_config(base.scheduler.config, **extra)
    pipeline_class = {
        "txt2img": diffusers.StableDiffusionPipeline,
        "img2img": diffusers.StableDiffusionImg2ImgPipeline,
        "inpaint": diffusers.StableDiffusionInpaintPipeline,
    }[kind]
    components = {**base.components, "scheduler": scheduler}
    return pipeline_class(**components).to(torch.float32)


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(img, dtype=np.int16) for img in images])


def assert_same_images(ours_images, reference_images) -> None:
    diff = np.abs(pixels(ours_images) - pixels(reference_images)).max()
    assert diff <= PIXEL_TOL, f"max pixel difference {diff}/255"


def picture() -> Image.Image:
    """A deterministic colourful 32x32 picture for img2img and inpainting."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(8 * x * y)], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


@pytest.mark.parametrize("sampler", list(DETERMINISTIC) + list(STOCHASTIC))
def test_txt2img_matches_diffusers(style, sampler, ours, reference_pipes):
    """Stochastic samplers included: their fresh noise comes from the same seeded generator."""
    skip_known_divergence(style, sampler)
    ref = reference(reference_pipes, style, sampler)
    expected = ref(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        height=SIZE,
        width=SIZE,
        generator=torch.Generator("cpu").manual_seed(1234),
    ).images
    result = ours[style].txt2img(
        PROMPT,
        negative_prompt=NEGATIVE,
        steps=STEPS,
        guidance_scale=7.5,
        width=SIZE,
        height=SIZE,
        sampler=sampler,
        seed=1234,
    )
    assert_same_images(result.images, expected)


@pytest.mark.parametrize("sampler", ["Euler", "DDIM", "DPM++ 2M Karras"])
def test_txt2img_without_negative_prompt_matches_diffusers(style, sampler, ours, reference_pipes):
    ref = reference(reference_pipes, style, sampler)
    expected = ref(
        PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        height=SIZE,
        width=SIZE,
        generator=torch.Generator("cpu").manual_seed(7),
    ).images
    result = ours[style].txt2img(PROMPT, steps=STEPS, width=SIZE, height=SIZE, sampler=sampler, seed=7)
    assert_same_images(result.images, expected)


@pytest.mark.parametrize("sampler", list(DETERMINISTIC))
def test_img2img_matches_diffusers(style, sampler, ours, reference_pipes):
    skip_known_divergence(style, sampler)
    skip_known_divergence("img2img", sampler)
    ref = reference(reference_pipes, style, sampler, "img2img")
    expected = ref(
        PROMPT,
        image=picture(),
        strength=0.6,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(99),
    ).images
    result = ours[style].img2img(
        picture(), PROMPT, strength=0.6, negative_prompt=NEGATIVE, steps=STEPS, sampler=sampler, seed=99
    )
    assert_same_images(result.images, expected)


def test_batch_matches_per_image_generators(ours, reference_pipes):
    """Image i of a batch uses seed + i, like diffusers given one generator per image."""
    ref = reference(reference_pipes, "sd1", "Euler")
    generators = [torch.Generator("cpu").manual_seed(50 + i) for i in range(3)]
    expected = ref([PROMPT] * 3, num_inference_steps=STEPS, height=SIZE, width=SIZE, generator=generators).images
    result = ours["sd1"].txt2img(PROMPT, steps=STEPS, width=SIZE, height=SIZE, sampler="Euler", seed=50, batch_size=3)
    assert result.seeds == [50, 51, 52]
    assert_same_images(result.images, expected)


def mask_picture() -> Image.Image:
    """White (repaint) on the right half, black (keep) on the left."""
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[:, SIZE // 2 :] = 255
    return Image.fromarray(mask, mode="L")


@pytest.mark.parametrize("sampler, strength", [("DDIM", 1.0), ("Euler", 0.7), ("DPM++ 2M", 1.0)])
def test_inpaint_by_latent_blending_matches_diffusers(sampler, strength, ours, reference_pipes):
    ref = reference(reference_pipes, "sd1", sampler, "inpaint")
    expected = ref(
        PROMPT,
        image=picture(),
        mask_image=mask_picture(),
        strength=strength,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        height=SIZE,
        width=SIZE,
        generator=torch.Generator("cpu").manual_seed(5),
    ).images
    result = ours["sd1"].inpaint(
        picture(), mask_picture(), PROMPT, strength=strength, steps=STEPS, sampler=sampler, seed=5, keep_unmasked=False
    )
    assert_same_images(result.images, expected)


@pytest.fixture(scope="module")
def inpainting_folder(tmp_path_factory, clip_vocab_dir):
    """A tiny 9-channel inpainting model (latents + mask + masked-image latents in)."""
    folder = tmp_path_factory.mktemp("tiny_inpaint")
    build_reference("sd1", clip_vocab_dir, seed=3, in_channels=9).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.parametrize("strength", [1.0, 0.8])
def test_inpaint_with_inpainting_unet_matches_diffusers(strength, inpainting_folder):
    from diffusers import EulerDiscreteScheduler, StableDiffusionInpaintPipeline

    ref = StableDiffusionInpaintPipeline.from_pretrained(inpainting_folder, safety_checker=None)
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    expected = ref(
        PROMPT,
        image=picture(),
        mask_image=mask_picture(),
        strength=strength,
        num_inference_steps=STEPS,
        height=SIZE,
        width=SIZE,
        generator=torch.Generator("cpu").manual_seed(11),
    ).images
    pipe = diffuse.load_pipeline(inpainting_folder, dtype="float32")
    assert pipe.config.unet.in_channels == 9
    result = pipe.inpaint(
        picture(), mask_picture(), PROMPT, strength=strength, steps=STEPS, sampler="Euler", seed=11, keep_unmasked=False
    )
    assert_same_images(result.images, expected)


def test_inpaint_keeps_unmasked_pixels_exactly(ours):
    result = ours["sd1"].inpaint(picture(), mask_picture(), PROMPT, steps=3, sampler="Euler", seed=1)
    kept = np.asarray(result.images[0])[:, : SIZE // 2]
    assert np.array_equal(kept, np.asarray(picture())[:, : SIZE // 2])
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(picture()))


def test_seed_reproduces_and_is_reported(ours):
    pipe = ours["sd2"]
    first = pipe.txt2img(PROMPT, steps=4, width=SIZE, height=SIZE, sampler="Euler a", seed=None)
    again = pipe.txt2img(PROMPT, steps=4, width=SIZE, height=SIZE, sampler="Euler a", seed=first.seeds[0])
    other = pipe.txt2img(PROMPT, steps=4, width=SIZE, height=SIZE, sampler="Euler a", seed=first.seeds[0] + 1)
    assert first.info["seed"] == first.seeds[0]
    assert np.array_equal(pixels(first.images), pixels(again.images))
    assert not np.array_equal(pixels(first.images), pixels(other.images))


def test_txt2img_size_defaults_to_the_models_own(ours):
    for pipe in ours.values():
        native = pipe.config.image_size  # the tiny reference models' sample size times 8
        result = pipe.txt2img(PROMPT, steps=1, sampler="Euler", seed=0)
        assert result.images[0].size == (native, native) and result.info["width"] == native


def test_callback_sees_every_step_with_previews(ours):
    seen = []
    ours["sd1"].txt2img(
        PROMPT,
        steps=5,
        width=SIZE,
        height=SIZE,
        sampler="Heun",
        seed=3,
        callback=lambda step: seen.append((step.index, step.total, step.timestep, step.preview())),
    )
    assert [s[0] for s in seen] == list(range(5)) and all(s[1] == 5 for s in seen)
    timesteps = [s[2] for s in seen]
    assert timesteps == sorted(timesteps, reverse=True)
    assert seen[0][3][0].size == (SIZE // 4, SIZE // 4)


def test_result_info_describes_the_run(ours):
    result = ours["sd1"].img2img(
        picture(),
        PROMPT,
        strength=0.5,
        negative_prompt=NEGATIVE,
        steps=4,
        sampler="DPM++ 2M Karras",
        seed=77,
        guidance_scale=5.0,
    )
    info = result.info
    assert (info["prompt"], info["negative_prompt"], info["steps"], info["seed"]) == (PROMPT, NEGATIVE, 4, 77)
    assert (info["sampler"], info["schedule_type"], info["cfg_scale"]) == ("DPM++ 2M", "Karras", 5.0)
    assert (info["width"], info["height"], info["denoising_strength"]) == (SIZE, SIZE, 0.5)
    assert result.infotexts[0].splitlines()[-1].startswith("Steps: 4, Sampler: DPM++ 2M, Schedule type: Karras")


def test_ddim_eta_matches_diffusers(ours, reference_pipes):
    ref = reference(reference_pipes, "sd1", "DDIM")
    expected = ref(
        PROMPT,
        num_inference_steps=STEPS,
        eta=0.6,
        height=SIZE,
        width=SIZE,
        generator=torch.Generator("cpu").manual_seed(8),
    ).images
    result = ours["sd1"].txt2img(PROMPT, steps=STEPS, width=SIZE, height=SIZE, sampler="DDIM", eta=0.6, seed=8)
    assert_same_images(result.images, expected)
    assert "Eta: 0.6" in result.infotexts[0]
    plain = ours["sd1"].txt2img(PROMPT, steps=STEPS, width=SIZE, height=SIZE, sampler="DDIM", seed=8)
    assert not np.array_equal(pixels(plain.images), pixels(result.images))


def test_a_diffusers_scheduler_config_gives_the_same_sampler(ours, reference_folders, reference_pipes):
    """A scheduler_config.json (here DPM++ 2M with Karras sigmas) drives our pipeline like the name does."""
    from diffusers import DPMSolverMultistepScheduler

    from diffuse.samplers import sampler_from_diffusers_config

    scheduler = DPMSolverMultistepScheduler.from_config(reference_pipes["sd2"].scheduler.config, use_karras_sigmas=True)
    config = {**scheduler.config, "_class_name": "DPMSolverMultistepScheduler"}
    sampler = sampler_from_diffusers_config(config)
    by_config = ours["sd2"].txt2img(PROMPT, steps=6, width=SIZE, height=SIZE, sampler=sampler, seed=2)
    by_name = ours["sd2"].txt2img(PROMPT, steps=6, width=SIZE, height=SIZE, sampler="DPM++ 2M Karras", seed=2)
    assert np.array_equal(pixels(by_config.images), pixels(by_name.images))
    assert by_config.info["sampler"] == "DPM++ 2M" and by_config.info["schedule_type"] == "Karras"


def test_generate_runs_a_request_as_the_wrappers_do(ours):
    pipe = ours["sd1"]
    request = diffuse.GenerationRequest(
        PROMPT,
        negative_prompt=NEGATIVE,
        steps=4,
        sampler="Euler a",
        seed=21,
        batch_size=2,
        image=picture(),
        mask=mask_picture(),
        strength=0.8,
    )
    result = pipe.generate(request)
    wrapped = pipe.inpaint(
        picture(),
        mask_picture(),
        PROMPT,
        strength=0.8,
        negative_prompt=NEGATIVE,
        steps=4,
        sampler="Euler a",
        seed=21,
        batch_size=2,
    )
    assert np.array_equal(pixels(result.images), pixels(wrapped.images))
    assert result.infotexts == wrapped.infotexts and result.info == wrapped.info
    assert pipe.describe(request) == (result.info, result.infotexts)
    assert request.kind == "inpaint" and result.info["denoising_strength"] == 0.8


def test_the_recorded_eta_is_the_one_the_sampler_uses(ours):
    pipe = ours["sd1"]

    def eta(**settings):
        return pipe.describe(diffuse.GenerationRequest(PROMPT, width=SIZE, height=SIZE, seed=1, **settings))[0]["eta"]

    assert eta(sampler="DDIM", eta=0.6) == 0.6 and eta(sampler="Euler a", eta=0.0) == 0.0
    assert eta(sampler="DPM++ 2M", eta=0.6) is None  # it has no eta
    assert eta(sampler="Euler a") is None  # the default, as A1111 leaves it out
    assert eta(sampler=pipe.get_sampler("DDIM", eta=0.3)) == 0.3
    assert eta(sampler=pipe.get_sampler("Euler a")) is None
