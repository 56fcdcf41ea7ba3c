"""The int8 option's plumbing: `quantize` as load_pipeline, the command line, regenerate and the
server take it, and the "Quantize" field it leaves in a PNG's parameters. Images are drawn on the
shipped model (64x64, two steps) in bfloat16, which the int8 path runs in."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import run_cli
from PIL import Image
from test_regenerate import check, edited
from test_server_sdxl import sdxl_models_folder

import diffuse
import diffuse.loader
from diffuse.cli import DEFAULT_MODEL, _load, build_parser, main
from diffuse.metadata import info_from_infotext, infotext, parse_infotext, read_parameters, save_png
from diffuse.pipeline import VERSION

PROMPT = "a red circle above a blue square"
QUICK = {"steps": 2, "guidance_scale": 4, "sampler": "Euler a"}
RECORD = {
    "prompt": "a red circle",
    "steps": 2,
    "sampler": "Euler a",
    "cfg_scale": 4,
    "seed": 7,
    "width": 64,
    "height": 64,
    "dtype": "bfloat16",
    "device": "cpu",
    "version": VERSION,
}


@pytest.fixture
def loads(monkeypatch) -> list[dict]:
    """Every load_pipeline call's keywords; each load is refused after it is counted."""
    calls: list[dict] = []

    def record(path, **kwargs):
        calls.append({"path": Path(path), **kwargs})
        raise ValueError("loading is not part of this test")

    monkeypatch.setattr(diffuse.loader, "load_pipeline", record)
    return calls


@pytest.fixture(scope="module")
def int8_png(tmp_path_factory) -> Path:
    """The second image of a batch of 2 from `diffuse txt2img --quantize int8`."""
    folder = tmp_path_factory.mktemp("int8")
    args = ["txt2img", PROMPT, "--steps", "2", "--cfg-scale", "4", "--seed", "5", "--batch-size", "2"]
    assert main([*args, "--dtype", "bfloat16", "--quantize", "int8", "--out", str(folder)]) == 0
    return folder / "00001-6.png"


# ---- the PNG field ---------------------------------------------------------------------------


def test_quantize_is_written_only_when_on_and_reads_back(tmp_path):
    text = infotext({**RECORD, "quantize": "int8"})
    assert "Dtype: bfloat16, Quantize: int8, Device: cpu" in text
    png = save_png(Image.new("RGB", (8, 8)), tmp_path / "int8.png", text)
    assert parse_infotext(read_parameters(png))["Quantize"] == "int8"
    assert info_from_infotext(read_parameters(png))["quantize"] == "int8"
    off = infotext({**RECORD, "quantize": None})
    assert "Quantize" not in off and "quantize" not in info_from_infotext(off)


# ---- load_pipeline ---------------------------------------------------------------------------


@pytest.mark.parametrize("quantize", ["int4", "INT8", "", 8])
def test_an_unknown_quantize_is_one_line_before_any_file_is_read(monkeypatch, quantize):
    def refuse(*args, **kwargs):
        raise AssertionError("a file was read")

    monkeypatch.setattr(diffuse.loader, "_load", refuse)
    with pytest.raises(ValueError) as error:
        diffuse.load_pipeline(DEFAULT_MODEL, dtype="bfloat16", quantize=quantize)
    message = str(error.value)
    assert "int8" in message and "\n" not in message and type(error.value) is ValueError


def test_int8_in_float32_is_refused_before_any_file_is_read(monkeypatch):
    monkeypatch.setattr(diffuse.loader, "_load", lambda *args: pytest.fail("a file was read"))
    with pytest.raises(ValueError, match="bfloat16") as error:
        diffuse.load_pipeline(DEFAULT_MODEL, dtype="float32", quantize="int8")
    assert "\n" not in str(error.value)


def test_the_pipeline_knows_its_quantize_and_records_it():
    pipe = diffuse.load_pipeline(DEFAULT_MODEL, dtype="bfloat16", quantize="int8")
    assert pipe.quantize == "int8"
    result = pipe.txt2img(PROMPT, seed=3, **QUICK)
    assert result.info["quantize"] == "int8"
    assert parse_infotext(result.infotexts[0])["Quantize"] == "int8"
    plain = diffuse.load_pipeline(DEFAULT_MODEL, dtype="bfloat16")
    assert plain.quantize is None
    assert "Quantize" not in parse_infotext(plain.describe(diffuse.GenerationRequest(PROMPT, seed=3))[1][0])


# ---- the command line ------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["txt2img", "img2img", "inpaint", "illustrate", "info", "eval", "serve"])
def test_quantize_is_an_option_of_every_command_that_loads_to_generate(command):
    image = ["--image", "in.png"]
    given = {"txt2img": ["p"], "img2img": ["p", *image], "inpaint": ["p", *image, "--mask", "m.png"]}
    given = {**given, "illustrate": ["p"]}.get(command, [])
    parser = build_parser()
    assert parser.parse_args([command, *given]).quantize is None  # off by default
    assert parser.parse_args([command, *given, "--quantize", "int8"]).quantize == "int8"


def test_regenerate_takes_int8_or_none_and_defaults_to_the_png():
    parser = build_parser()
    assert parser.parse_args(["regenerate", "a.png"]).quantize is None
    assert parser.parse_args(["regenerate", "a.png", "--quantize", "none"]).quantize == "none"
    assert parser.parse_args(["regenerate", "a.png", "--quantize", "int8"]).quantize == "int8"


def test_an_unknown_quantize_on_the_command_line_names_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["txt2img", "p", "--quantize", "int4"])
    assert exit_.value.code == 2
    assert "invalid choice: 'int4'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["txt2img", "p", "--quantize", "none"])  # "none" only where it overrides a PNG


def test_the_command_line_loads_the_model_and_its_refiner_with_quantize(loads, tmp_path, capsys):
    refiner = tmp_path / "refiner"
    refiner.mkdir()
    code, _, err = run_cli(
        ["txt2img", "p", "--quantize", "int8", "--dtype", "bfloat16", "--refiner", str(refiner)], capsys
    )
    assert code == 2 and "loading is not part of this test" in err
    assert [call["quantize"] for call in loads] == ["int8"]  # the model; the refiner loads next, as here
    args = argparse.Namespace(model=str(DEFAULT_MODEL), dtype="bfloat16", device="cpu", quantize="int8")
    with pytest.raises(ValueError):
        _load(args, str(refiner))
    assert loads[-1]["path"] == refiner and loads[-1]["quantize"] == "int8"


def test_convert_never_quantizes(loads, tmp_path, capsys):
    code, _, _ = run_cli(["convert", str(DEFAULT_MODEL), str(tmp_path / "out")], capsys)
    assert code == 2 and loads[0]["quantize"] is None


def test_an_int8_image_records_it(int8_png):
    params = parse_infotext(read_parameters(int8_png))
    assert params["Quantize"] == "int8" and params["Dtype"] == "bfloat16"


# ---- regenerate ------------------------------------------------------------------------------


def test_an_int8_image_is_made_again_exactly_with_int8(int8_png, capsys):
    code, out, err = check(int8_png, capsys)
    assert code == 0, err
    assert "largest pixel difference 0/255, mean 0.000/255 (tolerance 32/255 for bfloat16 int8 on cpu)" in out
    assert read_parameters(Path(out.splitlines()[0])) == read_parameters(int8_png)


def test_regenerate_loads_with_the_pngs_quantize(int8_png, loads, capsys):
    code, _, err = run_cli(["regenerate", str(int8_png), "--out", str(int8_png.parent / "again")], capsys)
    assert code == 2 and "loading is not part of this test" in err
    assert loads[0]["quantize"] == "int8" and str(loads[0]["dtype"]) == "torch.bfloat16"


def test_overriding_the_pngs_quantize_is_named(int8_png, tmp_path, capsys, no_loading):
    code, out, err = check(int8_png, capsys, "--quantize", "none")
    assert code == 1 and "cannot match: Quantize int8 is not this run's (off)" in err, err
    plain = edited(int8_png, tmp_path / "plain.png", "Quantize: int8, ", "")
    code, out, err = check(plain, capsys, "--quantize", "int8")
    assert code == 1 and "cannot match: Quantize off is not this run's (int8)" in err, err


def test_a_quantize_regenerate_cannot_run_is_refused_before_loading(int8_png, tmp_path, capsys, no_loading):
    code, _, err = check(edited(int8_png, tmp_path / "int4.png", "Quantize: int8", "Quantize: int4"), capsys)
    assert code == 2 and "Quantize 'int4'" in err and "int8" in err and err.count("\n") == 1
    code, _, err = check(int8_png, capsys, "--dtype", "float32")
    assert code == 2 and "bfloat16" in err and err.count("\n") == 1


def test_a_hand_off_is_quantized_alike_and_made_again_with_its_refiner(tmp_path_factory, clip_vocab_dir, capsys):
    models = sdxl_models_folder(tmp_path_factory, clip_vocab_dir)
    base = diffuse.load_pipeline(models / "tiny_base", dtype="bfloat16", quantize="int8")
    request = diffuse.GenerationRequest(
        "a castle", steps=3, guidance_scale=5, sampler="Euler", seed=2, refiner_switch_at=0.6
    )
    plain_refiner = diffuse.load_pipeline(models / "tiny_refiner", dtype="bfloat16")
    with pytest.raises(ValueError, match="refiner was loaded with quantize=None and the model with quantize='int8'"):
        base.generate(request, refiner=plain_refiner)  # the PNG would record one Quantize for two settings
    refiner = diffuse.load_pipeline(models / "tiny_refiner", dtype="bfloat16", quantize="int8")
    result = base.generate(request, refiner=refiner)
    png = save_png(result.images[0], tmp_path_factory.mktemp("handoff-int8") / "handoff.png", result.infotexts[0])
    assert parse_infotext(read_parameters(png))["Quantize"] == "int8"
    code, out, err = check(png, capsys, "--model", str(models / "tiny_base"))  # the refiner found beside it
    assert code == 0 and "largest pixel difference 0/255" in out, err


# ---- the server ------------------------------------------------------------------------------


def test_serve_quantize_reaches_the_settings(monkeypatch):
    import uvicorn

    import diffuse.server.app

    seen = {}
    monkeypatch.setattr(diffuse.server.app, "create_app", lambda settings: seen.setdefault("settings", settings))
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: None)
    assert main(["serve", "--quantize", "int8", "--dtype", "bfloat16"]) == 0
    assert seen["settings"].quantize == "int8"


def test_every_model_the_host_loads_gets_the_servers_quantize(monkeypatch, tmp_path):
    import diffuse.server.models as models

    loaded = []

    def load(path, **kwargs):
        loaded.append((path.name, kwargs["quantize"]))
        return SimpleNamespace(is_xl=True, quantize=kwargs["quantize"])

    monkeypatch.setattr(models, "load_pipeline", load)
    entries = [models.ModelEntry(tmp_path / name, name, f"{i:010d}") for i, name in enumerate(("a", "b", "c"))]
    host = models.ModelHost(entries, dtype="bfloat16", quantize="int8")
    host.switch("b")
    host.refiner("c")
    assert loaded == [("a", "int8"), ("b", "int8"), ("c", "int8")]


def test_the_server_reports_int8_and_records_it(tmp_path):
    server_tests = pytest.importorskip("test_server")
    running = server_tests.Running(server_tests.settings(tmp_path, dtype="bfloat16", quantize="int8"))
    try:
        model = running.call("GET", "/diffuse/v1/model")[1]
        status, body, _ = running.call("POST", "/sdapi/v1/txt2img", {**server_tests.QUICK, "steps": 2, "seed": 4})
    finally:
        running.stop()
    assert model["quantize"] == "int8"
    assert status == 200, body
    info = json.loads(body["info"])
    assert info["extra_generation_params"]["Quantize"] == "int8"
    assert parse_infotext(info["infotexts"][0])["Quantize"] == "int8"


def test_a_server_without_quantize_reports_it_off(tmp_path):
    server_tests = pytest.importorskip("test_server")
    running = server_tests.Running(server_tests.settings(tmp_path, dtype="bfloat16"))
    try:
        model = running.call("GET", "/diffuse/v1/model")[1]
        status, body, _ = running.call("POST", "/sdapi/v1/txt2img", {**server_tests.QUICK, "steps": 2, "seed": 4})
    finally:
        running.stop()
    assert model["quantize"] is None and status == 200
    info = json.loads(body["info"])
    assert "Quantize" not in info["extra_generation_params"] and "Quantize" not in info["infotexts"][0]
