"""The command line end to end on a tiny model: PNGs with parameters, step pictures, errors."""

from __future__ import annotations

import dataclasses
import struct
import zlib

import pytest
from PIL import Image

import diffuse.loader
from diffuse.cli import main
from diffuse.metadata import info_from_infotext, read_parameters


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_txt2img_writes_pngs_carrying_their_parameters(reference_folders, tmp_path, capsys):
    model = str(reference_folders["sd1"])
    code, out, err = run(
        [
            "txt2img",
            "a red circle",
            "-n",
            "blue",
            "--model",
            model,
            "-W",
            "32",
            "-H",
            "24",
            "--steps",
            "3",
            "--sampler",
            "Euler a",
            "--seed",
            "42",
            "--batch-size",
            "2",
            "--out",
            str(tmp_path / "out"),
        ],
        capsys,
    )
    assert code == 0, err
    paths = sorted((tmp_path / "out").glob("*.png"))
    assert [p.name for p in paths] == ["00000-42.png", "00001-43.png"]
    assert out.split() == [str(p) for p in paths]
    assert "3/3" in err  # the progress bar reached the last step
    image = Image.open(paths[1])
    assert image.size == (32, 24)
    info = info_from_infotext(read_parameters(paths[1]))
    assert (info["prompt"], info["negative_prompt"], info["seed"], info["steps"]) == ("a red circle", "blue", 43, 3)
    assert (info["sampler"], info["width"], info["height"], info["model"]) == ("Euler a", 32, 24, "tiny_sd10")

    code, out, _ = run(["pnginfo", str(paths[1])], capsys)
    assert code == 0 and out.splitlines()[-1].startswith("Steps: 3, Sampler: Euler a")


def test_save_steps_writes_every_step_and_a_filmstrip(reference_folders, tmp_path, capsys):
    steps_dir = tmp_path / "steps"
    code, _, err = run(
        [
            "txt2img",
            "a cat",
            "--model",
            str(reference_folders["sd2"]),
            "-W",
            "32",
            "-H",
            "32",
            "--steps",
            "4",
            "--seed",
            "1",
            "--out",
            str(tmp_path / "out"),
            "--save-steps",
            str(steps_dir),
        ],
        capsys,
    )
    assert code == 0, err
    names = sorted(p.name for p in steps_dir.glob("*.png"))
    assert len([n for n in names if n.startswith("step_")]) == 4
    assert "filmstrip.png" in names
    assert Image.open(steps_dir / "filmstrip.png").width >= 4 * 32 // 2


def test_n_iter_continues_the_seed_sequence(reference_folders, tmp_path, capsys):
    code, _, err = run(
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
            "--seed",
            "10",
            "--n-iter",
            "2",
            "--out",
            str(tmp_path),
        ],
        capsys,
    )
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["00000-10.png", "00001-11.png"]


def test_inpaint_options_become_one_request_per_batch(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    from diffuse.pipeline import Result
    from diffuse.request import GenerationRequest
    from diffuse.speedups import Speedups

    asked = []

    class Recording:
        source, dtype = Path("recorded"), "float32"

        def generate(self, request, callback=None, refiner=None):
            asked.append(request)
            seeds = [request.seed + i for i in range(request.batch_size)]
            return Result([Image.new("RGB", (8, 8))] * len(seeds), seeds, {}, ["Steps: 2"] * len(seeds))

    monkeypatch.setattr(diffuse.loader, "load_pipeline", lambda *args, **kwargs: Recording())
    Image.new("RGB", (16, 16), (1, 2, 3)).save(tmp_path / "in.png")
    Image.new("L", (16, 16), 255).save(tmp_path / "mask.png")
    code, _, err = run(
        [
            "inpaint",
            "a cat",
            "--image",
            str(tmp_path / "in.png"),
            "--mask",
            str(tmp_path / "mask.png"),
            "-n",
            "dog",
            "--steps",
            "2",
            "--cfg-scale",
            "3",
            "--sampler",
            "Euler a",
            "--seed",
            "7",
            "--batch-size",
            "2",
            "--n-iter",
            "2",
            "--clip-skip",
            "2",
            "--eta",
            "0.5",
            "--strength",
            "0.6",
            "--no-keep-unmasked",
            "--token-merging",
            "0.25",
            "--out",
            str(tmp_path / "out"),
        ],
        capsys,
    )
    assert code == 0, err
    first = asked[0]
    assert isinstance(first, GenerationRequest) and first.kind == "inpaint"
    assert first.image.size == first.mask.size == (16, 16)
    assert first == GenerationRequest(
        prompt="a cat",
        negative_prompt="dog",
        steps=2,
        guidance_scale=3.0,
        sampler="Euler a",
        seed=7,
        batch_size=2,
        clip_skip=2,
        eta=0.5,
        speedups=Speedups(token_merging=0.25),
        image=first.image,
        mask=first.mask,
        strength=0.6,
        keep_unmasked=False,
    )
    assert len(asked) == 2 and asked[1] == dataclasses.replace(first, seed=9)  # the next batch's seeds follow on


def test_img2img_and_inpaint_from_files(reference_folders, tmp_path, capsys):
    image, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.new("RGB", (32, 32), (10, 200, 30)).save(image)
    Image.new("L", (32, 32), 255).save(mask)
    model = str(reference_folders["sd1"])
    code, _, err = run(
        [
            "img2img",
            "a cat",
            "--image",
            str(image),
            "--model",
            model,
            "--steps",
            "4",
            "--strength",
            "0.5",
            "--seed",
            "3",
            "--out",
            str(tmp_path / "a"),
        ],
        capsys,
    )
    assert code == 0, err
    assert "Denoising strength: 0.5" in read_parameters(next((tmp_path / "a").glob("*.png")))
    code, _, err = run(
        [
            "inpaint",
            "a cat",
            "--image",
            str(image),
            "--mask",
            str(mask),
            "--model",
            model,
            "--steps",
            "2",
            "--seed",
            "3",
            "--out",
            str(tmp_path / "b"),
        ],
        capsys,
    )
    assert code == 0, err
    assert len(list((tmp_path / "b").glob("*.png"))) == 1


def test_missing_model_and_bad_sampler_are_clear(reference_folders, tmp_path, capsys):
    code, _, err = run(["txt2img", "a cat", "--model", str(tmp_path / "nope.safetensors")], capsys)
    assert code == 2 and "nope.safetensors" in err
    code, _, err = run(
        ["txt2img", "a cat", "--model", str(reference_folders["sd1"]), "--sampler", "k_bogus", "--out", str(tmp_path)],
        capsys,
    )
    assert code == 2 and "k_bogus" in err


def test_device_is_checked_before_loading(reference_folders, tmp_path, capsys):
    model = str(reference_folders["sd1"])
    code, _, err = run(["txt2img", "a cat", "--model", model, "--device", "banana", "--out", str(tmp_path)], capsys)
    assert code == 2 and "unknown device 'banana'" in err
    code, _, err = run(
        [
            "txt2img",
            "a cat",
            "--model",
            model,
            "-W",
            "32",
            "-H",
            "32",
            "--steps",
            "1",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
        ],
        capsys,
    )
    assert code == 0, err


def test_convert_writes_a_loadable_diffusers_folder(reference_folders, tmp_path, capsys):
    import torch
    from safetensors import safe_open

    import diffuse

    out = tmp_path / "converted"
    code, printed, err = run(["convert", str(reference_folders["sd2"]), str(out), "--dtype", "float16"], capsys)
    assert code == 0, err
    assert printed.strip() == str(out)
    with safe_open(out / "unet" / "diffusion_pytorch_model.safetensors", "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.float16}
    assert diffuse.load_pipeline(out, dtype="float32").config.prediction_type == "v_prediction"
    code, _, err = run(["convert", str(reference_folders["sd2"]), str(out)], capsys)
    assert code == 2 and "converted" in err  # an existing folder is not replaced without --overwrite


def test_convert_to_a_safetensors_name_writes_one_original_layout_file(reference_folders, tmp_path, capsys):
    import torch

    import diffuse
    from diffuse.checkpoints.safetensors_header import read_header

    out = tmp_path / "model.safetensors"
    code, printed, err = run(["convert", str(reference_folders["sd1"]), str(out)], capsys)
    assert code == 0, err
    assert printed.strip() == str(out) and out.is_file()
    assert any(k.startswith("model.diffusion_model.") for k in read_header(out))
    ours = diffuse.load_pipeline(reference_folders["sd1"])
    back = diffuse.load_pipeline(out, config=ours.config)  # a single file does not record the tiny heads
    for mine, theirs in zip(ours.unet.state_dict().values(), back.unet.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs)


def test_train_is_reachable_from_the_main_command(tmp_path, capsys):
    code, _, err = run(
        ["train", "vae", "--config", str(tmp_path / "missing.json"), "--out", str(tmp_path / "run")], capsys
    )
    assert code == 2 and "missing.json" in err
    assert not (tmp_path / "run").exists()


# ---- everything that needs no model is checked before it loads -----------------------------------


@pytest.fixture
def files(tmp_path, monkeypatch):
    """A garbage "model", a picture, a small mask, a non-image and a plain file; loading fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(diffuse.loader, "load_pipeline", refuse)
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 4_000_000)
    Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / "in.png")
    Image.new("L", (16, 16), 255).save(tmp_path / "small.png")
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


@pytest.mark.parametrize(
    "kind, options, message",
    [
        ("txt2img", ["-W", "30"], "-W/--width must be a multiple of 8"),
        ("txt2img", ["-H", "4096"], "between 8 and 2048"),
        ("txt2img", ["--steps", "0"], "--steps must be"),
        ("txt2img", ["--steps", "5000"], "--steps must be"),
        ("txt2img", ["--cfg-scale", "nan"], "--cfg-scale"),
        ("txt2img", ["--cfg-scale", "101"], "--cfg-scale"),
        ("txt2img", ["--eta", "2"], "--eta"),
        ("txt2img", ["--batch-size", "65"], "--batch-size must be"),
        ("txt2img", ["--seed", "-5"], "--seed"),
        ("txt2img", ["--seed", "4294967295", "--batch-size", "2"], "past 4294967295"),
        ("txt2img", ["--seed", "4294967294", "--n-iter", "3"], "past 4294967295"),
        ("txt2img", ["--sampler", "k_bogus"], "k_bogus"),
        ("txt2img", ["--schedule-type", "Wobbly"], "Wobbly"),
        ("txt2img", ["--sampler", "DDIM Karras"], "no karras schedule type"),
        ("txt2img", ["--clip-skip", "0"], "--clip-skip"),
        ("txt2img", ["--guidance-cutoff", "2"], "guidance_cutoff"),
        ("txt2img", ["--token-merging", "0.9"], "token_merging"),
        ("txt2img", ["--dtype", "float8"], "float8"),
        ("txt2img", ["--device", "banana"], "banana"),
        ("txt2img", ["--out", "{tmp}/notes.txt/sub"], "is a file"),
        ("txt2img", ["--save-steps", "{tmp}/notes.txt"], "is a file"),
        ("txt2img", ["-n", "x" * 30_000], "characters"),
        ("img2img", ["--image", "{tmp}/missing.png"], "no such file"),
        ("img2img", ["--image", "{tmp}/notes.txt"], "not a readable image"),
        ("img2img", ["--image", "{tmp}/in.png", "--strength", "1.5"], "--strength"),
        ("img2img", ["--image", "{tmp}/in.png", "--strength", "0.05", "--steps", "10"], "no denoising step"),
        ("inpaint", ["--image", "{tmp}/in.png", "--mask", "{tmp}/small.png"], "mask is 16x16"),
    ],
)
def test_bad_options_fail_in_one_line_before_the_model_loads(files, capsys, kind, options, message):
    options = [o.replace("{tmp}", str(files)) for o in options]
    code, out, err = run(
        [kind, "a cat", "--model", str(files / "model.safetensors"), "--out", str(files / "out"), *options], capsys
    )
    assert code == 2 and message in err, err
    assert err.startswith("diffuse: error: ") and len(err.strip().splitlines()) == 1 and not out
    assert not (files / "out").exists()


def bomb_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    # A few hundred bytes of zlib that would inflate to width x height x 3 zero bytes.
    pixels = chunk(b"IDAT", zlib.compress(b"\0" * (1 << 20)))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"tEXt", b"parameters\0x") + pixels + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "data, message",
    [
        (bomb_png(100_000, 100_000), "decompression bomb"),
        (bomb_png(64, 64)[:60], "truncated"),
        (b"just some text", "not a PNG"),
    ],
)
def test_pnginfo_refuses_unsafe_files_in_one_line(tmp_path, capsys, data, message):
    (tmp_path / "x.png").write_bytes(data)
    code, _, err = run(["pnginfo", str(tmp_path / "x.png")], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
