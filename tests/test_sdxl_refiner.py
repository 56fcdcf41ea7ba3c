"""The SDXL refiner, and the base -> refiner hand-off, against diffusers on tiny random weights.

The refiner is built as diffusers' StableDiffusionXLImg2ImgPipeline holds it: no first text
encoder or tokenizer, bigG alone (context = its width), `requires_aesthetics_score` (y = pooled
+ original size, crop and aesthetic score, five sinusoids). Its UNet has the tiny base's shape
with those widths; every weight is perturbed so that no zero-initialised tensor hides a wrong map.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch
from conftest import reference_tokenizer
from test_sdxl_pipeline import (
    NEGATIVE,
    PROMPT,
    SCHEDULERS,
    SIZE,
    STEPS,
    assert_same_images,
    first_vectors,
    perturbed,
    picture,
    tiny_big_g,
    tiny_vae,
    tiny_xl_scheduler,
    tiny_xl_unet,
)

import diffuse
from diffuse.checkpoints import single_file
from diffuse.checkpoints.errors import CheckpointError
from diffuse.conditioning_xl import SizeConditioning, size_conditioning
from diffuse.metadata import parse_infotext
from diffuse.models.clip import CLIPTextEncoder
from diffuse.models.configs import SDXL_REFINER, TextEncoderConfig, VAEConfig
from diffuse.models.unet import UNet
from diffuse.models.vae import AutoencoderKL


def build_refiner_reference(vocab_dir, seed: int = 1):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    torch.manual_seed(seed)
    unet = tiny_xl_unet(24 + 5 * 8, 40)  # pooled + original size, crop, aesthetic score; bigG's width alone
    scheduler = tiny_xl_scheduler()
    vae = tiny_vae()
    text_encoder_2 = tiny_big_g()
    perturbed(unet, vae, text_encoder_2)
    return StableDiffusionXLImg2ImgPipeline(
        vae=vae,
        text_encoder=None,
        text_encoder_2=text_encoder_2,
        tokenizer=None,
        tokenizer_2=reference_tokenizer(vocab_dir, "sd2"),
        unet=unet,
        scheduler=scheduler,
        requires_aesthetics_score=True,
        add_watermarker=False,
    )


@pytest.fixture(scope="module")
def reference_refiner(refiner_folder):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    return StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_folder, add_watermarker=False).to(torch.float32)


@pytest.fixture(scope="module")
def refiner(refiner_folder):
    return diffuse.load_pipeline(refiner_folder, dtype="float32")


def test_a_refiner_folder_loads_with_big_g_alone(refiner):
    assert refiner.is_xl and refiner.text_encoder is None and refiner.tokenizer is None
    assert refiner.config.text_encoder is None and refiner.config.aesthetic_score
    assert refiner.config.unet.context_dim == 40 and refiner.config.unet.adm_in_channels == 24 + 5 * 8


SCORES = {"aesthetic_score": 8.5, "negative_aesthetic_score": 1.0}
# diffusers' arguments (sizes as (height, width)) and ours (sizes as (width, height)).
SIZES = (
    {"crops_coords_top_left": (8, 16), "negative_original_size": (32, 48), "negative_crops_coords_top_left": (4, 0)},
    {"crop_top": 8, "crop_left": 16, "negative_original_size": (48, 32), "negative_crop": (4, 0)},
)


@pytest.mark.parametrize(
    "theirs, ours", [({}, {}), (SCORES, SCORES), SIZES], ids=["defaults", "scores", "crop-and-negative-sizes"]
)
def test_the_refiner_sees_diffusers_aesthetic_conditioning(theirs, ours, refiner, reference_refiner):
    """y for the negative and positive halves: the aesthetic scores (2.5 and 6.0 unless asked) in
    place of the target size, after the original sizes and crops asked for."""
    common = dict(negative_prompt=NEGATIVE, strength=0.5)
    y, expected = first_vectors(
        reference_refiner.unet,
        refiner.unet,
        lambda: reference_refiner(PROMPT, image=picture(), num_inference_steps=2, **common, **theirs),
        lambda: refiner.generate(
            diffuse.GenerationRequest(PROMPT, image=picture(), steps=2, sampler="Euler", **common, **ours)
        ),
    )
    assert y.shape == (2, 24 + 5 * 8)
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=0)
    assert torch.equal(
        size_conditioning(1, SizeConditioning.plain(64, 64), 8, aesthetic_score=6.0)[:, :32],
        size_conditioning(1, SizeConditioning.plain(64, 64), 8)[:, :32],
    )


@pytest.mark.parametrize("negative", [NEGATIVE, ""], ids=["negative", "no-negative"])
def test_refiner_img2img_matches_diffusers(negative, refiner, reference_refiner):
    expected = reference_refiner(
        PROMPT,
        image=picture(),
        strength=0.3,
        negative_prompt=negative or None,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(7),
    ).images
    result = refiner.img2img(
        picture(),
        PROMPT,
        strength=0.3,
        negative_prompt=negative,
        steps=STEPS,
        guidance_scale=5.0,
        sampler="Euler",
        seed=7,
    )
    assert_same_images(result.images, expected)


def test_a_refiner_folder_without_its_tokenizer_is_refused_naming_the_folder(refiner_folder, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(refiner_folder, broken)
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(CheckpointError, match="broken/tokenizer: unreadable tokenizer files"):
        diffuse.load_pipeline(broken, dtype="float32")


@pytest.fixture(scope="module")
def base_folder(sdxl_folder):
    return sdxl_folder  # the session's tiny base, built by build_sdxl_reference


@pytest.fixture(scope="module")
def base(base_folder):
    return diffuse.load_pipeline(base_folder, dtype="float32")


@pytest.fixture(scope="module")
def reference_base(base_folder):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(base_folder, add_watermarker=False).to(torch.float32)


def with_scheduler(pipeline_class, reference, sampler: str, **config):
    """`reference`'s components as `pipeline_class` with the scheduler `sampler` names (test_sdxl_pipeline.SCHEDULERS)."""
    import diffusers

    class_name, options = SCHEDULERS[sampler]
    scheduler = getattr(diffusers, class_name).from_config(reference.scheduler.config, **options)
    return pipeline_class(**{**reference.components, "scheduler": scheduler}, **config)


@dataclass
class Handoff:
    at_switch: torch.Tensor  # the base's latents as handed over
    latents: torch.Tensor  # the refiner's final latents
    images: list


def reference_handoff(reference_base, reference_refiner, switch_at: float, negative: str, seed: int, sampler="Euler"):
    """diffusers' ensemble of experts: the base to denoising_end as latents, the refiner from
    denoising_start, then the refiner's VAE decoding as its pipeline does. One generator goes on
    from the base's draws to the refiner's, as diffuse's do."""
    import diffusers

    base = with_scheduler(diffusers.StableDiffusionXLPipeline, reference_base, sampler)
    refiner = with_scheduler(
        diffusers.StableDiffusionXLImg2ImgPipeline, reference_refiner, sampler, requires_aesthetics_score=True
    )
    common = dict(negative_prompt=negative or None, num_inference_steps=STEPS, guidance_scale=5.0)
    generator = torch.Generator("cpu").manual_seed(seed)
    at_switch = base(PROMPT, denoising_end=switch_at, output_type="latent", generator=generator, **common).images
    latents = refiner(
        PROMPT, image=at_switch, denoising_start=switch_at, generator=generator, output_type="latent", **common
    ).images
    return Handoff(at_switch, latents, decode_like_diffusers(refiner, latents))


def decode_like_diffusers(pipe, latents: torch.Tensor) -> list:
    with torch.no_grad():
        pixels = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(pixels, output_type="pil")


def handoff_request(negative: str, sampler: str, seed: int, switch_at: float, **extra) -> diffuse.GenerationRequest:
    return diffuse.GenerationRequest(
        PROMPT, negative_prompt=negative, steps=STEPS, guidance_scale=5.0, sampler=sampler, seed=seed,
        refiner_switch_at=switch_at, **extra,
    )  # fmt: skip


@pytest.mark.parametrize("switch_at, negative", [(0.8, NEGATIVE), (0.55, "")])
def test_base_to_refiner_handoff_matches_diffusers(
    switch_at, negative, base, refiner, reference_base, reference_refiner
):
    expected = reference_handoff(reference_base, reference_refiner, switch_at, negative, seed=21)
    steps = []
    request = handoff_request(negative, "Euler", 21, switch_at)
    result = base.generate(request, callback=lambda step: steps.append((step.index, step.total)), refiner=refiner)
    assert_same_images(result.images, expected.images)
    # The step reports count over both models' steps.
    assert steps == [(i, STEPS) for i in range(STEPS)]
    alone = base.txt2img(PROMPT, negative_prompt=negative, steps=STEPS, guidance_scale=5.0, sampler="Euler", seed=21)
    assert_differ(result.images[0], alone.images[0])


@pytest.mark.parametrize("negative", [NEGATIVE, ""], ids=["negative", "no-negative"])
def test_a_multistep_handoff_matches_diffusers_at_the_switch_and_after(
    negative, base, refiner, reference_base, reference_refiner
):
    """DPM++ 2M Karras: the base keeps second order up to the switch (its part does not end the
    schedule, so no first-order last step) and the refiner's history starts afresh there, as
    diffusers' denoising_end / denoising_start do. Latents are compared as well as images: the
    tiny VAE hides the difference a first-order step at the switch makes."""
    switch_at, sampler = 0.7, "DPM++ 2M Karras"
    expected = reference_handoff(reference_base, reference_refiner, switch_at, negative, 13, sampler)
    steps = []
    request = handoff_request(negative, sampler, 13, switch_at)
    result = base.generate(request, callback=lambda step: steps.append(step.latents), refiner=refiner)
    base_steps = int(sampler_plan(base, sampler).timesteps.ge(1000 * (1 - switch_at)).sum())
    assert 0 < base_steps < STEPS
    torch.testing.assert_close(steps[base_steps - 1], expected.at_switch, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(steps[-1], expected.latents, atol=1e-3, rtol=1e-4)
    assert_same_images(result.images, expected.images)


def test_an_ancestral_handoff_matches_diffusers(base, refiner, reference_base, reference_refiner):
    """Euler a: the refiner's fresh noise comes from each image's generator going on from the base's draws."""
    expected = reference_handoff(reference_base, reference_refiner, 0.7, NEGATIVE, 21, "Euler a")
    steps = []
    request = handoff_request(NEGATIVE, "Euler a", 21, 0.7)
    result = base.generate(request, callback=lambda step: steps.append(step.latents), refiner=refiner)
    torch.testing.assert_close(steps[-1], expected.latents, atol=1e-3, rtol=1e-4)
    assert_same_images(result.images, expected.images)


@pytest.mark.parametrize("strength, negative", [(1.0, NEGATIVE), (0.8, "")], ids=["full-negative", "partial"])
def test_an_inpainting_handoff_matches_diffusers(strength, negative, base, refiner, reference_base, reference_refiner):
    """diffusers' SDXL inpainting pipeline for both parts (DPM++ 2M Karras, whose latents are
    variance-preserving as ours are when handed over): the base puts the image back outside the
    mask up to the switch, ending with the image's own latents there; the refiner puts the base's
    latents back, noised with a slice it draws after the base's draws. diffusers also draws a
    posterior sample of the masked image, which a 4-channel UNet never reads and diffuse does not
    draw: the refiner's generator here goes on from the two draws diffuse made (image, noise)."""
    from diffusers import StableDiffusionXLInpaintPipeline
    from test_sdxl_inpaint import mask_picture

    sampler = "DPM++ 2M Karras"
    reference = with_scheduler(StableDiffusionXLInpaintPipeline, reference_base, sampler)
    reference_part_two = with_scheduler(
        StableDiffusionXLInpaintPipeline, reference_refiner, sampler, requires_aesthetics_score=True
    )
    common = dict(
        mask_image=mask_picture(), negative_prompt=negative or None, num_inference_steps=STEPS, guidance_scale=5.0,
        height=SIZE, width=SIZE, output_type="latent",
    )  # fmt: skip
    generator = torch.Generator("cpu").manual_seed(17)
    at_switch = reference(PROMPT, image=picture(), strength=strength, denoising_end=0.7, generator=generator, **common)
    generator = torch.Generator("cpu").manual_seed(17)
    for _ in range(2):
        torch.randn((1, 4, SIZE // 2, SIZE // 2), generator=generator)
    expected = reference_part_two(
        PROMPT, image=at_switch.images, denoising_start=0.7, generator=generator, **common
    ).images
    request = handoff_request(
        negative, sampler, 17, 0.7, image=picture(), mask=mask_picture(), strength=strength, keep_unmasked=False
    )
    steps = []
    result = base.generate(request, callback=lambda step: steps.append(step.latents), refiner=refiner)
    torch.testing.assert_close(steps[-1], expected, atol=1e-3, rtol=1e-4)
    assert_same_images(result.images, decode_like_diffusers(reference_part_two, expected))


def sampler_plan(pipe, sampler: str):
    return pipe.get_sampler(sampler).plan(STEPS)


def assert_differ(a, b) -> None:
    import numpy as np

    assert np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max() > 2


def test_a_handoff_records_a1111s_refiner_fields(base, refiner):
    request = diffuse.GenerationRequest(PROMPT, steps=4, sampler="Euler", seed=3, refiner_switch_at=0.8)
    result = base.generate(request, refiner=refiner)
    assert result.info["refiner"] == f"{refiner.model_name} [{refiner.model_hash}]"
    assert result.info["refiner_switch_at"] == 0.8
    params = parse_infotext(result.infotexts[0])
    assert params["Refiner"] == f"{refiner.model_name} [{refiner.model_hash}]"
    assert params["Refiner switch at"] == "0.8"
    assert params["Model"] == base.model_name and params["Steps"] == "4"
    plain = base.txt2img(PROMPT, steps=1, sampler="Euler", seed=3)
    assert "refiner" not in plain.info and "Refiner" not in plain.infotexts[0]


def test_what_a_handoff_cannot_take_is_refused_before_any_work(base, refiner):
    def request(**kw):
        return diffuse.GenerationRequest(PROMPT, steps=4, sampler="Euler", **kw)

    with pytest.raises(ValueError, match="needs a refiner pipeline"):
        base.generate(request(refiner_switch_at=0.8))
    with pytest.raises(ValueError, match="without refiner_switch_at"):
        base.generate(request(), refiner=refiner)
    for bad in (0, 1, 1.5, -0.2, True):
        with pytest.raises(ValueError, match="refiner_switch_at"):
            base.generate(request(refiner_switch_at=bad), refiner=refiner)
    for bad in (-1, 10.5, float("nan"), "6"):
        with pytest.raises(ValueError, match="negative_aesthetic_score"):
            refiner.generate(request(image=picture(), negative_aesthetic_score=bad))
    with pytest.raises(ValueError, match="leaves none to the refiner"):
        base.generate(request(refiner_switch_at=0.9995), refiner=refiner)
    with pytest.raises(ValueError, match="leaves none to the model"):
        base.generate(request(refiner_switch_at=0.01), refiner=refiner)


def tiny_refiner_networks() -> dict[str, torch.nn.Module]:
    """A small refiner with 64-channel heads, as single-file detection assumes: the deepest level
    without attention, a middle block of its own depth, bigG alone, y of five sinusoids."""
    text_2 = TextEncoderConfig(width=128, layers=3, heads=2, mlp_width=160, activation="gelu", projection_dim=96)
    unet_cfg = replace(
        SDXL_REFINER.unet, model_channels=64, channel_mult=(1, 2, 2), attention_levels=(False, True, False),
        heads=(1, 2, 2), transformer_depths=(0, 2, 0), mid_transformer_depth=3, context_dim=128,
        adm_in_channels=96 + 5 * 256,
    )  # fmt: skip
    vae_cfg = VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, scaling_factor=0.13025)
    torch.manual_seed(0)
    networks = {"unet": UNet(unet_cfg), "vae": AutoencoderKL(vae_cfg), "text_encoder_2": CLIPTextEncoder(text_2)}
    with torch.no_grad():
        for module in networks.values():
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return networks


def test_a_refiner_single_file_is_detected_and_loads(tmp_path):
    """bigG at conditioner.embedders.0.model. alone: the refiner, its architecture read off the tensors."""
    networks = tiny_refiner_networks()
    states = {name: module.state_dict() for name, module in networks.items()}
    state = single_file.join_single_file("sdxl_refiner", text_encoder=None, **states)
    assert single_file.detect_family(state, tmp_path / "x.safetensors") == "sdxl_refiner"
    path = single_file.save_single_file(state, tmp_path / "tiny_refiner.safetensors")
    pipe = diffuse.load_pipeline(path, dtype="float32")
    assert pipe.tokenizer is None and pipe.text_encoder is None and pipe.tokenizer_2.pad_token_id == 0
    assert pipe.config.aesthetic_score and pipe.config.text_encoder is None
    for name, module in networks.items():
        assert getattr(pipe, name).cfg == module.cfg, name
        got = getattr(pipe, name).state_dict()
        assert all(torch.equal(got[k].float(), v) for k, v in module.state_dict().items()), name
    image = pipe.img2img(picture(), "a red square", strength=0.5, steps=2, seed=1).images[0]
    assert image.size == picture().size


def test_a_refiner_single_file_converts_to_a_folder_diffusers_runs_as_we_do(tmp_path):
    """`diffuse convert` of a refiner file: diffusers reads the folder as its SDXL img2img pipeline
    (no first encoder, requires_aesthetics_score) and repaints as diffuse does; diffuse reads it back."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

    from diffuse.checkpoints.export import save_diffusers_folder

    networks = tiny_refiner_networks()
    state = single_file.join_single_file(
        "sdxl_refiner", text_encoder=None, **{n: m.state_dict() for n, m in networks.items()}
    )
    ours = diffuse.load_pipeline(single_file.save_single_file(state, tmp_path / "r.safetensors"), dtype="float32")
    folder = save_diffusers_folder(ours, tmp_path / "converted")
    reference = StableDiffusionXLImg2ImgPipeline.from_pretrained(folder, add_watermarker=False).to(torch.float32)
    assert reference.text_encoder is None and reference.config.requires_aesthetics_score
    reference.scheduler = EulerDiscreteScheduler.from_config(reference.scheduler.config)
    assert_refines_as_diffusers(ours, reference)
    back = diffuse.load_pipeline(folder, dtype="float32")
    assert back.config == replace(ours.config, name="converted")


def test_refiner_configs_are_checked_before_anything_is_built():
    from diffuse.models.configs import SD1, check_pipeline

    check_pipeline(SDXL_REFINER)
    bad = {
        r"missing \(only the SDXL refiner": replace(SD1, text_encoder=None),
        r"adm_in_channels=2816 is not the pooled width 1280 \+ 5 x size_embed_dim 256 \(SDXL refiner\)": replace(
            SDXL_REFINER, unet=replace(SDXL_REFINER.unet, adm_in_channels=2816)
        ),
        r"context_dim=2048 is not the text encoders' widths together \(1280\)": replace(
            SDXL_REFINER, unet=replace(SDXL_REFINER.unet, context_dim=2048)
        ),
        "aesthetic_score=1: must be true or false": replace(SDXL_REFINER, aesthetic_score=1),
    }
    for message, config in bad.items():
        with pytest.raises(ValueError, match=message):
            check_pipeline(config)


@pytest.mark.parametrize("kind", ["txt2img", "img2img"])
def test_the_cli_hands_over_to_a_refiner(kind, base, refiner, base_folder, refiner_folder, tmp_path, capsys):
    """`diffuse txt2img|img2img ... --model BASE --refiner REFINER --refiner-switch-at F`: the image
    the Python API makes with the same settings, and A1111's refiner fields in its parameters."""
    from PIL import Image

    from diffuse.cli import main
    from diffuse.metadata import read_parameters

    image = {}
    if kind == "img2img":
        picture().save(tmp_path / "in.png")
        image = {"image": picture(), "strength": 0.8}
    argv = [kind, PROMPT, "--model", str(base_folder), "--refiner", str(refiner_folder), "--refiner-switch-at", "0.7"]
    argv += ["--image", str(tmp_path / "in.png"), "--strength", "0.8"] if image else []
    settings = ["--steps", "4", "--sampler", "Euler", "--seed", "5", "--cfg-scale", "5", "-n", NEGATIVE]
    assert main([*argv, *settings, "--dtype", "float32", "--out", str(tmp_path / "out")]) == 0
    written = capsys.readouterr().out.strip()
    request = diffuse.GenerationRequest(
        PROMPT, negative_prompt=NEGATIVE, steps=4, sampler="Euler", seed=5, guidance_scale=5.0,
        refiner_switch_at=0.7, **image,
    )  # fmt: skip
    expected = base.generate(request, refiner=refiner)
    assert_same_images([Image.open(written).convert("RGB")], expected.images)
    params = parse_infotext(read_parameters(written))
    assert params["Refiner"] == f"{refiner.model_name} [{refiner.model_hash}]" and params["Refiner switch at"] == "0.7"


def test_the_cli_checks_its_refiner_options_before_loading_a_model(base_folder, refiner_folder, tmp_path, capsys):
    from diffuse.cli import main

    common = ["txt2img", PROMPT, "--model", str(base_folder), "--steps", "2", "--out", str(tmp_path)]
    cases = {
        "--refiner-switch-at needs --refiner": ["--refiner-switch-at", "0.5"],
        f"--refiner {tmp_path / 'none'}: no such file or folder": ["--refiner", str(tmp_path / "none")],
        "--refiner-switch-at must be a fraction of the steps above 0 and below 1, got 1.0": [
            "--refiner", str(refiner_folder), "--refiner-switch-at", "1",
        ],
    }  # fmt: skip
    for message, options in cases.items():
        assert main([*common, *options]) == 2
        err = capsys.readouterr().err
        assert message in err and "loaded in" not in err
    assert not any(tmp_path.iterdir())


def assert_refines_as_diffusers(ours, reference) -> None:
    """A refiner's img2img at strength 0.5 (Euler, guided, a negative prompt) makes the images of
    diffusers' SDXL img2img pipeline `reference` (its scheduler already Euler)."""
    expected = reference(
        PROMPT,
        image=picture(),
        strength=0.5,
        negative_prompt=NEGATIVE,
        num_inference_steps=6,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(4),
    ).images
    result = ours.img2img(
        picture(), PROMPT, strength=0.5, negative_prompt=NEGATIVE, steps=6, guidance_scale=5.0, sampler="Euler", seed=4
    )
    assert_same_images(result.images, expected)
