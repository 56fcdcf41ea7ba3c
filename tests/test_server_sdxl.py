"""The A1111 API on a tiny SDXL base and refiner: txt2img and img2img at the model's own size,
the model list and switching, and the base -> refiner hand-off (refiner_checkpoint,
refiner_switch_at) made exactly as the Python API makes it, with A1111's infotext."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_sdxl_inpaint import mask_picture
from test_sdxl_pipeline import build_sdxl_reference, picture
from test_sdxl_refiner import build_refiner_reference
from test_server import DEFAULT_MODEL, Running, decode_png, png_data_url, settings
from test_server_illustrate import page_result

import diffuse
import diffuse.server.models
from diffuse.metadata import parse_infotext, read_parameters
from diffuse.server.models import ModelHost, find_models
from diffuse.server.page_routes import remake_fields

BASE_SIZE = 80  # the base's own size: sample_size 40 x the tiny VAE's 2 (SD1's shipped model draws 64)
QUICK = {"prompt": "a castle on a hill", "negative_prompt": "blurry", "steps": 5, "cfg_scale": 5, "seed": 3}
QUICK = {**QUICK, "sampler_name": "Euler"}


def sdxl_models_folder(tmp_path_factory, clip_vocab_dir: Path) -> Path:
    """A models folder, written once per session: the tiny SDXL base (80x80 by its own size), its
    refiner, and an SD1 model."""
    folder = tmp_path_factory.getbasetemp() / "sdxl_models"
    if folder.exists():
        return folder
    base = build_sdxl_reference(clip_vocab_dir)
    base.unet.register_to_config(sample_size=BASE_SIZE // 2)
    base.save_pretrained(folder / "tiny_base", safe_serialization=True)
    build_refiner_reference(clip_vocab_dir).save_pretrained(folder / "tiny_refiner", safe_serialization=True)
    (folder / "sd1").symlink_to(DEFAULT_MODEL, target_is_directory=True)
    return folder


@pytest.fixture(scope="module")
def sdxl_models(tmp_path_factory, clip_vocab_dir) -> Path:
    return sdxl_models_folder(tmp_path_factory, clip_vocab_dir)


@pytest.fixture(scope="module")
def server(tmp_path_factory, sdxl_models):
    running = Running(settings(tmp_path_factory.mktemp("srv"), model=sdxl_models / "tiny_base", models_dir=sdxl_models))
    yield running
    running.stop()


def titles(server) -> dict[str, str]:
    return {model["model_name"]: model["title"] for model in server.call("GET", "/sdapi/v1/sd-models")[1]}


def generate(server, route: str = "txt2img", **fields) -> tuple[int, dict]:
    status, body, _ = server.call("POST", f"/sdapi/v1/{route}", {**QUICK, **fields})
    return status, body


def infotext(body: dict) -> dict[str, str]:
    return parse_infotext(json.loads(body["info"])["infotexts"][0])


def test_sd_models_lists_the_sdxl_models_and_options_switch_to_sd1_and_back(server):
    listed = titles(server)
    assert sorted(listed) == ["sd1", "tiny_base", "tiny_refiner"]
    assert server.call("GET", "/sdapi/v1/options")[1]["sd_model_checkpoint"] == listed["tiny_base"]
    try:
        assert server.call("POST", "/sdapi/v1/options", {"sd_model_checkpoint": listed["sd1"]})[0] == 200
        status, body = generate(server)
        assert status == 200 and decode_png(body["images"][0]).size == (64, 64)
        assert infotext(body)["Model"] == "sd1"
        status, body = generate(server, refiner_checkpoint=listed["tiny_refiner"], refiner_switch_at=0.8)
        assert status == 422 and "the model sd1 [" in body["detail"] and "is not SDXL" in body["detail"]
    finally:
        assert server.call("POST", "/sdapi/v1/options", {"sd_model_checkpoint": listed["tiny_base"]})[0] == 200
    status, body = generate(server)
    assert status == 200 and infotext(body)["Model"] == "tiny_base"


def test_txt2img_and_img2img_draw_at_the_models_and_the_images_own_size(server):
    status, body = generate(server)
    assert status == 200, body
    image = decode_png(body["images"][0])
    assert image.size == (BASE_SIZE, BASE_SIZE) and infotext(body)["Size-1"] == str(BASE_SIZE)
    assert read_parameters(image) == json.loads(body["info"])["infotexts"][0]
    assert "Refiner" not in infotext(body) and body["parameters"]["refiner_checkpoint"] is None
    status, body = generate(server, "img2img", init_images=[png_data_url(picture().resize((48, 40)))])
    assert status == 200, body
    assert decode_png(body["images"][0]).size == (48, 40) and infotext(body)["Denoising strength"] == "0.75"
    status, body = generate(server, width=96, height=72)
    assert status == 200 and decode_png(body["images"][0]).size == (96, 72)


@pytest.fixture(scope="module")
def pipes(sdxl_models):
    """The base and refiner loaded in this process, as the server loads them."""
    return {name: diffuse.load_pipeline(sdxl_models / name, dtype="float32") for name in ("tiny_base", "tiny_refiner")}


@pytest.mark.parametrize("kind", ["txt2img", "img2img", "inpaint"])
def test_the_refiner_takes_over_as_in_the_python_api(server, pipes, kind):
    refiner = titles(server)["tiny_refiner"]
    request = diffuse.GenerationRequest(
        QUICK["prompt"], QUICK["negative_prompt"], steps=5, guidance_scale=5, sampler="Euler", seed=3
    )
    images = {}
    if kind != "txt2img":
        images = {"init_images": [png_data_url(picture())], "denoising_strength": 0.9}
        request = replace(request, image=picture(), strength=0.9)
    if kind == "inpaint":
        images["mask"] = png_data_url(mask_picture())
        request = replace(request, mask=mask_picture())
    route = "txt2img" if kind == "txt2img" else "img2img"
    status, body = generate(server, route, refiner_checkpoint=refiner, refiner_switch_at=0.6, **images)
    assert status == 200, body
    made = decode_png(body["images"][0])
    expected = pipes["tiny_base"].generate(replace(request, refiner_switch_at=0.6), refiner=pipes["tiny_refiner"])
    assert made.tobytes() == expected.images[0].tobytes()
    alone = pipes["tiny_base"].generate(request).images[0]
    assert made.tobytes() != alone.tobytes()
    # A1111's labels: the refiner's short title ("name [hash]") and the fraction it switched at.
    params, info = infotext(body), json.loads(body["info"])
    assert params["Refiner"] == refiner and params["Refiner switch at"] == "0.6"
    assert info["infotexts"][0] == expected.infotexts[0]
    assert info["extra_generation_params"]["Refiner"] == refiner
    assert info["extra_generation_params"]["Refiner switch at"] == 0.6
    assert body["parameters"]["refiner_checkpoint"] == refiner and body["parameters"]["refiner_switch_at"] == 0.6


def test_a1111s_aesthetic_score_settings_reach_the_refiner_and_the_record(server, pipes):
    refiner = titles(server)["tiny_refiner"]
    scores = {"sdxl_refiner_high_aesthetic_score": 8, "sdxl_refiner_low_aesthetic_score": 1.5}
    status, body = generate(
        server, steps=5, refiner_checkpoint=refiner, refiner_switch_at=0.6, override_settings=scores
    )
    assert status == 200, body
    request = diffuse.GenerationRequest(
        QUICK["prompt"], QUICK["negative_prompt"], steps=5, guidance_scale=5, sampler="Euler", seed=3
    )
    expected = pipes["tiny_base"].generate(
        replace(request, refiner_switch_at=0.6, aesthetic_score=8.0, negative_aesthetic_score=1.5),
        refiner=pipes["tiny_refiner"],
    )
    assert decode_png(body["images"][0]).tobytes() == expected.images[0].tobytes()
    params = infotext(body)
    assert params["Aesthetic score"] == "8.0" and params["Negative aesthetic score"] == "1.5"
    status, body = generate(server, override_settings={"sdxl_refiner_low_aesthetic_score": 11})
    assert status == 422 and "sdxl_refiner_low_aesthetic_score: must be a number from 0 to 10" in body["detail"]


def test_no_refiner_and_the_current_model_as_its_own_refiner_hand_over_nothing(server):
    plain = generate(server, steps=2)[1]["images"][0]
    for off in (None, "", "None", titles(server)["tiny_base"]):
        status, body = generate(server, steps=2, refiner_checkpoint=off, refiner_switch_at=0.6)
        assert status == 200, body
        assert body["images"][0] == plain and "Refiner" not in infotext(body)


@pytest.mark.parametrize(
    "fields, status, message",
    [
        (
            {"refiner_checkpoint": "nothing-like-it", "refiner_switch_at": 0.8},
            404,
            "refiner_checkpoint: no model 'nothing-like",
        ),
        (
            {"refiner_checkpoint": "sd1", "refiner_switch_at": 0.8},
            422,
            "is not an SDXL model; a refiner must be an SDXL refiner or base",
        ),
        ({"refiner_checkpoint": "tiny_refiner"}, 422, "refiner_switch_at: a refiner_checkpoint needs"),
        ({"refiner_checkpoint": "tiny_refiner", "refiner_switch_at": 1}, 422, "must be above 0 and below 1"),
        (
            {"refiner_checkpoint": "tiny_refiner", "refiner_switch_at": "0.8"},
            422,
            "refiner_switch_at: must be a number",
        ),
        ({"refiner_checkpoint": 5, "refiner_switch_at": 0.8}, 422, "refiner_checkpoint: must be a model title"),
        ({"refiner_checkpoint": "tiny_refiner", "refiner_switch_at": 0.9995}, 422, "leaves none to the refiner"),
    ],
)
def test_refiners_that_cannot_take_over_are_refused_in_one_line(server, fields, status, message):
    got, body = generate(server, **fields)
    assert got == status and message in body["detail"] and "\n" not in body["detail"], body
    assert generate(server)[0] == 200  # the server goes on with its models


def test_the_host_holds_two_models_at_most_and_keeps_the_refiner(sdxl_models, monkeypatch):
    entries = find_models(sdxl_models / "tiny_base", sdxl_models)
    host = ModelHost(entries, dtype="float32")
    loads, real_load = [], diffuse.server.models.load_pipeline

    def counted(path, **options):
        live = sum(pipe is not None for pipe in (host.pipe, host._refiner))
        loads.append((path.name, live))
        return real_load(path, **options)

    monkeypatch.setattr(diffuse.server.models, "load_pipeline", counted)
    refiner = host.refiner("tiny_refiner")
    assert refiner.is_xl and host.refiner("tiny_refiner") is refiner and host.refiner(None) is None
    assert host.refiner("tiny_base") is None  # the current model itself: A1111 hands over to nothing
    del refiner
    for _ in range(2):  # found not SDXL once, then refused without loading it again
        with pytest.raises(ValueError, match="sd1 .* is not an SDXL model"):
            host.refiner("sd1")
    kept = host.refiner("tiny_refiner")
    host.switch("tiny_refiner")  # moved over, not loaded again
    assert host.pipe is kept and host.refiner_entry is None
    host.refiner("tiny_base")
    host.switch("sd1")  # the kept refiner is let go first
    assert host.refiner_entry is None and host.current.name == "sd1"
    with pytest.raises(ValueError, match="the model sd1 .* is not SDXL"):
        host.refiner("tiny_refiner")  # refused before any load
    # One model held beside each load, never two.
    assert loads == [("tiny_refiner", 1), ("sd1", 1), ("tiny_refiner", 1), ("tiny_base", 1), ("sd1", 1)]


def test_the_pages_routes_tell_the_models_size_and_hand_over_to_the_refiner(server):
    assert server.call("GET", "/diffuse/v1/model")[1] == {
        "title": titles(server)["tiny_base"],
        "image_size": BASE_SIZE,
        "sdxl": True,
        "quantize": None,
    }
    refiner = titles(server)["tiny_refiner"]
    image = page_result(server, {**QUICK, "refiner_checkpoint": refiner, "refiner_switch_at": 0.6})
    params = parse_infotext(image["parameters"])
    assert params["Refiner"] == refiner and params["Size-1"] == str(BASE_SIZE)
    # The gallery's fields make it again with the refiner found by its hash, as the model is.
    fields = image["fields"]
    assert (fields["refiner_hash"], fields["refiner_switch_at"]) == (refiner[-11:-1], 0.6)
    again = page_result(
        server, {**{k: v for k, v in fields.items() if not k.endswith("_hash")}, "refiner_checkpoint": refiner}
    )
    assert again["parameters"] == image["parameters"]
    plain = page_result(server, QUICK)
    assert "refiner_hash" not in plain["fields"] and "Refiner" not in plain["parameters"]


def test_an_interrupted_hand_off_records_what_a_finished_one_does(pipes):
    from diffuse.pipeline import Step
    from diffuse.server.generate import _partial

    base, refiner = pipes["tiny_base"], pipes["tiny_refiner"]
    request = diffuse.GenerationRequest("a castle", steps=4, sampler="Euler", seed=2, refiner_switch_at=0.6)
    finished = base.generate(request, refiner=refiner)
    latents = torch.zeros(1, 4, BASE_SIZE // 2, BASE_SIZE // 2)
    partial = _partial(base, request, Step(3, 4, 1.0, latents, latents), refiner)
    assert partial.infotexts == finished.infotexts and partial.images[0].size == (BASE_SIZE, BASE_SIZE)


def test_a1111s_sdxl_crop_settings_reach_the_size_conditioning(server, pipes):
    crop = {"sdxl_crop_top": 16, "sdxl_crop_left": 8}
    status, body = generate(server, steps=2, override_settings=crop)
    assert status == 200, body
    request = diffuse.GenerationRequest(
        QUICK["prompt"], QUICK["negative_prompt"], steps=2, guidance_scale=5, sampler="Euler", seed=3
    )
    expected = pipes["tiny_base"].generate(replace(request, crop_top=16, crop_left=8))
    assert decode_png(body["images"][0]).tobytes() == expected.images[0].tobytes()
    assert infotext(body)["Crop top"] == "16" and body["parameters"]["override_settings"] == crop
    assert remake_fields(json.loads(body["info"])["infotexts"][0]) is None  # the page's form holds no crop
    status, body = generate(server, override_settings={"sdxl_crop_left": -8})
    assert status == 422 and body["field"] == "override_settings.sdxl_crop_left", body
