"""Bad requests fail with a clear message before any network runs or any latent is allocated.

(The tiny test autoencoder downsamples 4x, so sizes must be multiples of 4 here; SD's are 8.)
"""

from __future__ import annotations

import pytest
from PIL import Image

import diffuse
from diffuse import inputs


@pytest.fixture(scope="module")
def pipe(reference_folders):
    pipe = diffuse.load_pipeline(reference_folders["sd1"], dtype="float32")

    def refuse(*args, **kwargs):
        raise AssertionError("a network ran before the request was checked")

    for module in (pipe.text_encoder, pipe.unet, pipe.vae):
        module.forward = refuse
    pipe.vae.encode = pipe.vae.decode = refuse
    return pipe


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "in.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    return path


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(width=30), "multiple of 4"),
        (dict(height=0), "between"),
        (dict(width=8192), "between"),
        (dict(width=64.0), "integer"),
        (dict(steps=0), "steps"),
        (dict(steps=5000), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(guidance_scale=float("nan")), "guidance_scale"),
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=1000), "batch_size"),
        (dict(seed=-5), "seed"),
        (dict(seed=2**40), "seed"),
        (dict(seed=2**32 - 1, batch_size=2), "past 4294967295"),  # the second image's seed would be 2^32
        (dict(prompt=["a", "b"], seed=2**32 - 2, batch_size=2), "past 4294967295"),
        (dict(clip_skip=0), "clip_skip"),
        (dict(clip_skip=99), "clip_skip"),
        (dict(sampler="Eulerr"), "Eulerr"),
        (dict(negative_prompt=["a", "b"]), "negative_prompt"),
        (dict(prompt=123), "prompt"),
        (dict(prompt="x" * 30_000), "characters"),
    ],
)
def test_txt2img_rejects(pipe, settings, message):
    settings = {"prompt": "a cat", "width": 32, "height": 32, **settings}
    with pytest.raises(ValueError, match=message):
        pipe.txt2img(**settings)


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("inf")])
def test_img2img_rejects_strength_outside_0_1(pipe, picture, strength):
    with pytest.raises(ValueError, match="strength"):
        pipe.img2img(picture, "a cat", strength=strength)


def test_img2img_rejects_strength_that_leaves_no_step(pipe, picture):
    with pytest.raises(ValueError, match="no denoising step"):
        pipe.img2img(picture, "a cat", strength=0.05, steps=10)


def test_unreadable_images_are_named(pipe, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match="broken.png.*not a readable image"):
        pipe.img2img(broken, "a cat")
    with pytest.raises(ValueError, match="missing.png: no such file"):
        pipe.img2img(tmp_path / "missing.png", "a cat")


def test_inpaint_rejects_mask_of_another_size(pipe, picture):
    with pytest.raises(ValueError, match="mask is 16x16 but the image is 32x32"):
        pipe.inpaint(picture, Image.new("L", (16, 16), 255), "a cat")


def test_cli_reports_bad_input_without_traceback(reference_folders, capsys, tmp_path):
    from diffuse.cli import main

    code = main(["txt2img", "a cat", "--model", str(reference_folders["sd1"]), "-W", "33", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "multiple of 8" in err and "Traceback" not in err and "step/s" not in err
    assert not any(tmp_path.iterdir())


def test_a_random_seed_leaves_room_for_every_image(monkeypatch):
    monkeypatch.setattr(inputs.random, "randrange", lambda stop: stop - 1)  # the highest pick
    assert inputs.resolve_seed(-1, count=6) + 5 == inputs.MAX_SEED
    assert inputs.resolve_seed(None) == inputs.MAX_SEED
    assert inputs.resolve_seed(inputs.MAX_SEED - 5, count=6) == inputs.MAX_SEED - 5
    with pytest.raises(ValueError, match="use a seed from 0 to 4294967290"):
        inputs.resolve_seed(inputs.MAX_SEED - 4, count=6)


def test_the_cli_picks_a_seed_with_room_for_all_its_batches(reference_folders, tmp_path, capsys, monkeypatch):
    from diffuse.cli import main

    monkeypatch.setattr(inputs.random, "randrange", lambda stop: stop - 1)
    code = main(
        [
            "txt2img",
            "a cat",
            "--model",
            str(reference_folders["sd1"]),
            "-W",
            "16",
            "-H",
            "16",
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--n-iter",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir())[-1] == f"00003-{inputs.MAX_SEED}.png"


def test_a_ready_sampler_takes_no_schedule_type_or_eta(pipe):
    sampler = pipe.get_sampler("Euler a")
    for settings, named in ((dict(eta=0.5), "eta=0.5"), (dict(schedule_type="Karras"), "schedule_type='Karras'")):
        request = diffuse.GenerationRequest("a cat", width=32, height=32, sampler=sampler, **settings)
        with pytest.raises(ValueError, match=f"{named} would be ignored: a ready Sampler"):
            pipe.generate(request)


def test_strength_and_mask_need_an_image(pipe, picture):
    with pytest.raises(ValueError, match="strength 0.5 needs an input image"):
        pipe.generate(diffuse.GenerationRequest("a cat", width=32, height=32, strength=0.5))
    with pytest.raises(ValueError, match="a mask needs the image"):
        pipe.generate(diffuse.GenerationRequest("a cat", width=32, height=32, mask=picture))


@pytest.mark.parametrize(
    "settings, message",
    [(dict(steps=0), "steps"), (dict(seed=-5), "seed"), (dict(image="missing.png"), "no such file")],
)
def test_generate_and_describe_check_like_the_wrappers(pipe, settings, message):
    request = diffuse.GenerationRequest("a cat", width=32, height=32, **settings)
    for check in (pipe.generate, pipe.describe):
        with pytest.raises(ValueError, match=message):
            check(request)


def test_img2img_and_inpaint_need_their_pictures(pipe, picture):
    with pytest.raises(ValueError, match="image must be"):
        pipe.img2img(None, "a cat")
    with pytest.raises(ValueError, match="mask must be"):
        pipe.inpaint(picture, None, "a cat")
