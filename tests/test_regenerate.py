"""`diffuse regenerate`: images made by the command line, the Python API and the server are made
again exactly from their PNGs alone, on the shipped model (64x64, a few steps), in float32 and
bfloat16; edited parameters, another model and A1111 images are told apart."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from PIL import Image
from test_server_sdxl import sdxl_models_folder

import diffuse
import diffuse.loader
from diffuse.cli import DEFAULT_MODEL, main
from diffuse.metadata import parse_infotext, read_parameters, save_png
from diffuse.pipeline import Step

PROMPT = "a red circle above a blue square"
QUICK = ["--steps", "2", "--cfg-scale", "4", "--sampler", "Euler a"]


def check(png: Path, capsys, *extra: str) -> tuple[int, str, str]:
    return run_cli(["regenerate", str(png), "--check", "--out", str(png.parent / "again"), *extra], capsys)


def edited(png: Path, out: Path, old: str, new: str) -> Path:
    """The same pixels with `old` replaced by `new` in their parameters."""
    text = read_parameters(png)
    assert old in text
    with Image.open(png) as image:
        return save_png(image, out, text.replace(old, new))


@pytest.fixture(scope="module")
def cli_image(tmp_path_factory):
    """cli_image(dtype): the second image of a batch of 2 from `diffuse txt2img`, made once per dtype."""
    made = {}

    def make(dtype: str) -> Path:
        if dtype not in made:
            folder = tmp_path_factory.mktemp(f"cli-{dtype}")
            assert (
                main(
                    [
                        "txt2img",
                        PROMPT,
                        "-n",
                        "green",
                        *QUICK,
                        "--seed",
                        "11",
                        "--batch-size",
                        "2",
                        "--dtype",
                        dtype,
                        "--out",
                        str(folder),
                    ]
                )
                == 0
            )
            made[dtype] = folder / "00001-12.png"
        return made[dtype]

    return make


@pytest.fixture(scope="module")
def png(cli_image) -> Path:
    """A float32 image from the command line, made before any test's fixtures forbid loading a model."""
    return cli_image("float32")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cli_images_are_made_again_exactly(cli_image, dtype, capsys):
    png = cli_image(dtype)
    code, out, err = check(png, capsys)
    assert code == 0, err
    assert "largest pixel difference 0/255, mean 0.000/255" in out
    again = Path(out.splitlines()[0])
    assert again.parent == png.parent / "again" and again.name == "00000-12.png"
    assert read_parameters(again) == read_parameters(png)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_python_api_images_are_made_again_exactly(dtype, tmp_path, capsys):
    pipe = diffuse.load_pipeline(DEFAULT_MODEL, dtype=dtype)
    result = pipe.txt2img(PROMPT, steps=2, guidance_scale=4, sampler="DPM++ 2M Karras", seed=3, batch_size=2)
    png = save_png(result.images[1], tmp_path / "api.png", result.infotexts[1])
    code, out, err = check(png, capsys)
    assert code == 0 and "largest pixel difference 0/255" in out, err


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_server_images_are_made_again_exactly(dtype, tmp_path, capsys):
    server_tests = pytest.importorskip("test_server")
    running = server_tests.Running(server_tests.settings(tmp_path, dtype=dtype))
    try:
        status, body, _ = running.call(
            "POST", "/sdapi/v1/txt2img", {**server_tests.QUICK, "steps": 2, "seed": 21, "batch_size": 2}
        )
    finally:
        running.stop()
    assert status == 200, body
    png = tmp_path / "server.png"
    png.write_bytes(base64.b64decode(body["images"][1]))
    assert parse_infotext(read_parameters(png))["Batch pos"] == "1"
    code, out, err = check(png, capsys)
    assert code == 0 and "largest pixel difference 0/255" in out, err


@pytest.mark.parametrize("old, new", [("Seed: 12,", "Seed: 13,"), (PROMPT, "a blue circle above a red square")])
def test_edited_parameters_fail_the_check(png, tmp_path, capsys, old, new):
    code, out, err = check(edited(png, tmp_path / "edited.png", old, new), capsys)
    assert code == 1 and "DIFFERS: largest pixel difference" in out, err


def test_another_model_is_named_before_loading(png, tmp_path, capsys, no_loading):
    model = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL, model, copy_function=os.symlink)  # cheap: the same files but one
    (model / "vae" / "latent_rgb.json").unlink()
    shutil.copy(DEFAULT_MODEL / "vae" / "latent_rgb.json", model / "vae" / "latent_rgb.json")
    with open(model / "vae" / "latent_rgb.json", "a") as f:
        f.write("\n")
    code, _, err = check(png, capsys, "--model", str(model))
    assert code == 1 and "cannot match: Model sha256" in err and "is not the loaded model's" in err
    code, _, err = check(png, capsys, "--dtype", "float16")
    assert code == 1 and "cannot match: Dtype" in err


A1111_TEXT = (
    "a red circle above a blue square\nNegative prompt: green\n"
    "Steps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 4, Seed: 7, Size: 64x64, "
    'Model hash: 0123456789, Model: sd, Lora hashes: "x: 0123", Version: v1.10.1'
)


def test_an_a1111_png_is_made_again_as_far_as_its_fields_go(tmp_path, capsys):
    png = save_png(Image.new("RGB", (64, 64)), tmp_path / "a1111.png", A1111_TEXT)
    code, out, err = run_cli(["regenerate", str(png), "--out", str(tmp_path / "again"), "--dtype", "float32"], capsys)
    assert code == 0, err
    assert "note: an A1111-style image (Version v1.10.1)" in err and "Model hash 0123456789" in err
    again = parse_infotext(read_parameters(Path(out.strip())))
    assert (again["Prompt"], again["Negative prompt"], again["Seed"], again["Steps"]) == (PROMPT, "green", "7", "2")
    assert (again["Sampler"], again["Schedule type"], again["Size-1"]) == ("DPM++ 2M", "Karras", "64")


def test_an_a1111_png_cannot_pass_the_check(tmp_path, capsys, no_loading):
    png = save_png(Image.new("RGB", (64, 64)), tmp_path / "a1111.png", A1111_TEXT)
    code, _, err = check(png, capsys)
    assert code == 1 and "cannot match: an A1111-style image" in err


def test_img2img_and_inpaint_need_their_inputs_and_check_them(tmp_path, capsys):
    picture, other, mask = tmp_path / "in.png", tmp_path / "other.png", tmp_path / "mask.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(picture)
    Image.new("RGB", (64, 64), (40, 200, 40)).save(other)
    mask_image = Image.new("L", (64, 64), 0)
    mask_image.paste(255, (16, 16, 48, 48))
    mask_image.save(mask)
    common = [*QUICK, "--seed", "4", "--dtype", "float32"]
    assert (
        run_cli(
            [
                "img2img",
                PROMPT,
                "--image",
                str(picture),
                "--strength",
                "0.6",
                *common,
                "--steps",
                "4",
                "--out",
                str(tmp_path / "i"),
            ],
            capsys,
        )[0]
        == 0
    )
    made = tmp_path / "i" / "00000-4.png"
    assert len(parse_infotext(read_parameters(made))["Init image hash"]) == 64
    code, _, err = check(made, capsys)
    assert code == 2 and "give its input with --image" in err
    code, _, err = check(made, capsys, "--image", str(other))
    assert code == 1 and "the Init image hash differs" in err
    code, out, err = check(made, capsys, "--image", str(picture))
    assert code == 0 and "largest pixel difference 0/255" in out, err

    assert (
        run_cli(
            ["inpaint", PROMPT, "--image", str(picture), "--mask", str(mask), *common, "--out", str(tmp_path / "p")],
            capsys,
        )[0]
        == 0
    )
    made = tmp_path / "p" / "00000-4.png"
    code, _, err = check(made, capsys, "--image", str(picture), "--mask", str(picture))
    assert code == 1 and "the Mask hash differs" in err
    code, out, err = check(made, capsys, "--image", str(picture), "--mask", str(mask))
    assert code == 0 and "largest pixel difference 0/255" in out, err


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("Sampler: Euler a", "Sampler: Euler z", "unknown sampler 'Euler z'"),
        ("Steps: 2", "Steps: 0", "Steps must be"),
        ("Size: 64x64", "Size: 60x64", "Size (width) must be a multiple of 8"),
        ("CFG scale: 4", "CFG scale: 400", "CFG scale must be"),
        ("Seed: 12", "Seed: 4294967296", "seed"),
        ("Seed: 12", "Seed: 0", "seed"),  # position 1 of its batch: the batch would start at seed -1
        ("Batch pos: 1", "Batch pos: 2", "Batch pos 2"),
        ("timestep_spacing=leading", "timestep_spacing=sideways", "sideways"),
        ("rho=7.0", "rho=steep", "rho"),
        ("eta=0.0", "eta=0.0 warp=9", "unknown setting 'warp'"),
    ],
)
def test_bad_parameters_are_refused_before_loading(png, tmp_path, capsys, no_loading, old, new, message):
    code, _, err = check(edited(png, tmp_path / "bad.png", old, new), capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_png_without_parameters_or_not_a_png_is_one_line(tmp_path, capsys, no_loading):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    (tmp_path / "text.png").write_text("hello")
    for name, message in (("plain.png", "no generation parameters"), ("text.png", "not a PNG")):
        code, _, err = run_cli(["regenerate", str(tmp_path / name)], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_interrupted_server_images_carry_the_same_parameters():
    from diffuse.metadata import png_bytes
    from diffuse.server.a1111 import DEFAULT_STRENGTH, Limits, read_generation
    from diffuse.server.generate import _partial

    pipe = diffuse.load_pipeline(DEFAULT_MODEL, dtype="float32")
    picture = Image.new("RGB", (64, 64), (90, 20, 200))
    body = {
        "prompt": PROMPT,
        "negative_prompt": "green",
        "steps": 4,
        "cfg_scale": 4.0,
        "sampler_name": "Euler a",
        "seed": 5,
        "batch_size": 2,
        "init_images": [base64.b64encode(png_bytes(picture, None)).decode()],
    }
    request = read_generation("img2img", body, Limits())
    finished = pipe.img2img(
        picture,
        PROMPT,
        strength=DEFAULT_STRENGTH,
        negative_prompt="green",
        steps=4,
        guidance_scale=4.0,
        sampler="Euler a",
        seed=5,
        batch_size=2,
    )
    latents = torch.zeros(2, 4, 8, 8)
    partial = _partial(pipe, request.generation, Step(1, 4, 500.0, latents, latents))
    assert partial.infotexts == finished.infotexts and partial.info == finished.info
    assert "Init image hash" in parse_infotext(partial.infotexts[1])


# ---- an SDXL base -> refiner hand-off ------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_models(tmp_path_factory, clip_vocab_dir) -> Path:
    return sdxl_models_folder(tmp_path_factory, clip_vocab_dir)


@pytest.fixture(scope="module")
def handoff_png(sdxl_models, tmp_path_factory) -> Path:
    """The second image of a batch of 2 that the tiny SDXL base handed over to its refiner at 0.6,
    told an aesthetic score of 7.5."""
    base, refiner = (
        diffuse.load_pipeline(sdxl_models / name, dtype="float32") for name in ("tiny_base", "tiny_refiner")
    )
    request = diffuse.GenerationRequest(
        "a castle",
        "blurry",
        steps=3,
        guidance_scale=5,
        sampler="Euler",
        seed=9,
        batch_size=2,
        refiner_switch_at=0.6,
        aesthetic_score=7.5,  # off the default, so the remake must read it back
    )
    result = base.generate(request, refiner=refiner)
    return save_png(result.images[1], tmp_path_factory.mktemp("handoff") / "handoff.png", result.infotexts[1])


def test_a_hand_off_is_made_again_exactly_with_its_refiner_found_by_hash(handoff_png, sdxl_models, capsys):
    recorded = parse_infotext(read_parameters(handoff_png))
    refiner = recorded["Refiner"]
    assert refiner.startswith("tiny_refiner [") and recorded["Aesthetic score"] == "7.5"
    assert "Negative aesthetic score" not in recorded  # the default is not written
    # The refiner is found beside the model, then in a folder --refiner names, by its hash alone.
    code, out, err = check(handoff_png, capsys, "--model", str(sdxl_models / "tiny_base"))
    assert code == 0 and "largest pixel difference 0/255" in out, err
    assert read_parameters(Path(out.splitlines()[0])) == read_parameters(handoff_png)
    renamed = edited(handoff_png, handoff_png.parent / "renamed.png", refiner, refiner.replace("tiny_refiner", "xl_r"))
    code, out, err = check(renamed, capsys, "--model", str(sdxl_models / "tiny_base"), "--refiner", str(sdxl_models))
    assert code == 0 and "largest pixel difference 0/255" in out, err


def test_a_hand_offs_refiner_missing_or_another_is_named_before_loading(
    handoff_png, sdxl_models, tmp_path, capsys, no_loading
):
    model = ["--model", str(sdxl_models / "tiny_base")]
    code, _, err = check(handoff_png, capsys, *model, "--refiner", str(tmp_path))
    assert code == 2 and "Refiner 'tiny_refiner' (hash " in err and f"is none of the models in {tmp_path}" in err
    code, _, err = check(handoff_png, capsys, *model, "--refiner", str(sdxl_models / "sd1"))
    assert code == 1 and "cannot match: Refiner hash" in err and "sd1's" in err
    for old, new, message in (
        ("Refiner switch at: 0.6", "Refiner switch at: 1.0", "Refiner switch at must be a fraction"),
        (" [", " (", "is not 'name [hash]'"),
    ):
        code, _, err = check(edited(handoff_png, tmp_path / "bad.png", old, new), capsys, *model)
        assert code == 2 and message in err, err


def test_sdxl_crop_and_negative_size_conditioning_are_made_again(sdxl_models, tmp_path, capsys):
    base = diffuse.load_pipeline(sdxl_models / "tiny_base", dtype="float32")
    request = diffuse.GenerationRequest(
        "a castle", "blurry", steps=3, guidance_scale=5, sampler="Euler", seed=4, crop_top=16, crop_left=8,
        negative_original_size=(40, 48), negative_crop=(0, 24),
    )  # fmt: skip
    result = base.generate(request)
    png = save_png(result.images[0], tmp_path / "cropped.png", result.infotexts[0])
    params = parse_infotext(result.infotexts[0])
    assert (params["Crop top"], params["Negative original size-1"], params["Negative crop left"]) == ("16", "40", "24")
    code, out, err = check(png, capsys, "--model", str(sdxl_models / "tiny_base"))
    assert code == 0 and "largest pixel difference 0/255" in out, err
    code, _, err = check(edited(png, tmp_path / "half.png", "Crop left: 8, ", ""), capsys)
    assert code == 2 and "one of crop_top and crop_left without the other" in err
    code, _, err = check(png, capsys, "--refiner", str(sdxl_models / "tiny_refiner"))
    assert code == 2 and "made without a refiner, which takes no --refiner" in err
