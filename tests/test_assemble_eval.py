"""From three finished training stages to a model folder (diffuse.train.assemble), and measuring a
model (diffuse.shapes.evaluate), on micro random stages: 32x32 images, 8x8 latents.

The VAE and UNet stages are written with save_final from random weights; the CLIP stage is a real
1-step train_clip run, so that its image tower comes from the trainer itself.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image
from test_export import assert_diffusers_agrees

import diffuse
from diffuse.cli import main
from diffuse.models.configs import TextEncoderConfig, UNetConfig, VAEConfig
from diffuse.models.unet import UNet
from diffuse.models.vae import AutoencoderKL
from diffuse.preview import SD_LATENT_RGB, latents_to_rgb_cheap, to_pil
from diffuse.shapes.data import DataConfig, heldout_pair_scenes, heldout_single_scenes, render
from diffuse.shapes.evaluate import (
    EvalSettings,
    evaluate,
    format_report,
    heldout_prompts,
    load_image_tower,
    score_adherence,
    vae_reconstruction,
    write_report,
)
from diffuse.shapes.image_encoder import ImageEncoderConfig, ImageTowerConfig
from diffuse.train.assemble import AssemblyWarning, assemble, build_pipeline
from diffuse.train.components import IMAGE_TOWER_DIR, final_files, load_final, save_final, weights_sha256
from diffuse.train.stages.clip import CLIPTrainConfig, build_models, train_clip
from diffuse.train.stages.unet import UNetTrainConfig
from diffuse.train.stages.vae import VAETrainConfig
from diffuse.train.state import capture_rng_state, restore_rng_state

DATA = DataConfig(seed=3, image_size=32)
MICRO_VAE = VAEConfig(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=4, scaling_factor=0.7)
MICRO_TEXT = TextEncoderConfig(width=32, layers=1, heads=2, mlp_width=64)
MICRO_IMAGE = ImageEncoderConfig(image_size=32, stage_channels=(8, 16), norm_groups=4, embed_dim=16)
MICRO_UNET = UNetConfig(
    model_channels=16,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_levels=(False, True),
    heads=(2, 2),
    context_dim=32,
    norm_groups=8,
)
PREVIEW_SAMPLES = 16
PROMPT = "a red circle above a blue square on a white background"
FAST = dict(steps=2, sampler="Euler a", width=32, height=32)


def jittered(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights moved off their initial constants (zeroed output layers, unit norms), so a
    misplaced tensor changes the output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def write_vae_stage(folder: Path, config: VAEConfig = MICRO_VAE, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    save_final(
        folder,
        "vae",
        jittered(AutoencoderKL(config), seed),
        config,
        VAETrainConfig(vae=config, data=DATA, steps=1),
        extra={"image_size": DATA.image_size},
    )
    return folder


def write_unet_stage(
    folder: Path, vae_dir: Path, clip_dir: Path, config: UNetConfig = MICRO_UNET, fingerprints: bool = False
) -> Path:
    """A finished UNet stage; with fingerprints it records the weights it was trained on as the trainer
    does now, without them only their folders, as stages trained before that did."""
    torch.manual_seed(1)
    train_config = UNetTrainConfig(
        unet=config, vae_dir=str(vae_dir), text_encoder_dir=str(clip_dir), data=DATA, steps=1
    )
    extra = {"prediction_type": "epsilon", "sample_size": 8, "vae_dir": str(vae_dir), "text_encoder_dir": str(clip_dir)}
    if fingerprints:
        extra.update(
            vae_sha256=weights_sha256(vae_dir, "vae"), text_encoder_sha256=weights_sha256(clip_dir, "text_encoder")
        )
    save_final(folder, "unet", jittered(UNet(config), 1), config, train_config, extra=extra)
    return folder


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> dict[str, Path]:
    threads, rng = torch.get_num_threads(), capture_rng_state()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("stages")
    vae_dir = write_vae_stage(root / "vae")
    clip_config = CLIPTrainConfig(
        text_encoder=MICRO_TEXT,
        image_encoder=MICRO_IMAGE,
        data=DATA,
        steps=1,
        batch_size=4,
        warmup_steps=0,
        checkpoint_every=1,
    )
    train_clip(clip_config, root / "clip", progress=False)
    unet_dir = write_unet_stage(root / "unet", vae_dir, root / "clip")
    yield {"root": root, "vae": vae_dir, "clip": root / "clip", "unet": unet_dir, "clip_config": clip_config}
    torch.set_num_threads(threads)
    restore_rng_state(rng)


@pytest.fixture(scope="module")
def folder32(stages) -> Path:
    """The stages assembled in float32, so it loads back exactly."""
    return assemble(
        stages["vae"],
        stages["clip"],
        stages["unet"],
        stages["root"] / "models" / "fp32",
        dtype=torch.float32,
        preview_samples=PREVIEW_SAMPLES,
    )


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images])


# ---------------------------------------------------------------- the CLIP stage's image tower


def test_clip_stage_leaves_its_trained_image_tower(stages):
    tower, config, _ = load_final(stages["clip"], "image_tower")
    assert config == ImageTowerConfig(image_encoder=MICRO_IMAGE, text_width=MICRO_TEXT.width)
    assert all(path.is_file() for path in final_files(stages["clip"], "image_tower"))
    initial = {name: model.state_dict() for name, model in build_models(stages["clip_config"]).items()}
    # Each part is the trained one (one optimizer step moved it off the starting weights).
    for name in ("image_encoder", "text_projection", "logit_scale"):
        trained = getattr(tower, name).state_dict()
        assert trained.keys() == initial[name].keys()
        assert any(not torch.equal(trained[k], initial[name][k]) for k in trained), name
    # The text encoder is still the stage's own final.*.
    assert load_final(stages["clip"], "text_encoder")[1] == MICRO_TEXT


# ---------------------------------------------------------------- assemble


def test_assembled_folder_loads_back_as_the_same_pipeline(stages, folder32):
    ours = build_pipeline(
        stages["vae"], stages["clip"], stages["unet"], source=folder32, preview_samples=PREVIEW_SAMPLES
    )
    loaded = diffuse.load_pipeline(folder32, dtype="float32")
    for name in ("text_encoder", "unet", "vae"):
        want, got = getattr(ours, name).state_dict(), getattr(loaded, name).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
    assert loaded.config == ours.config
    assert (loaded.config.sample_size, loaded.config.vae.scaling_factor, loaded.config.pad_token_id) == (8, 0.7, 49407)
    assert loaded.scheduler_config == ours.scheduler_config
    assert loaded.scheduler_config["beta_schedule"] == "scaled_linear"
    assert torch.equal(loaded.preview_matrix, ours.preview_matrix)
    a = ours.txt2img(PROMPT, seed=5, **FAST)
    b = loaded.txt2img(PROMPT, seed=5, **FAST)
    assert np.array_equal(pixels(a.images), pixels(b.images))
    assert pixels(a.images).std() > 0


def test_folder_holds_the_preview_matrix_and_a_copy_of_the_image_tower(stages, folder32):
    rows = json.loads((folder32 / "vae" / "latent_rgb.json").read_text())["matrix"]
    assert np.array(rows).shape == (MICRO_VAE.latent_channels + 1, 3)
    for path in final_files(stages["clip"], "image_tower"):
        assert (folder32 / IMAGE_TOWER_DIR / path.name).read_bytes() == path.read_bytes()
    assert load_image_tower(folder32).cfg.text_width == MICRO_TEXT.width


def test_step_previews_use_the_models_own_matrix(folder32):
    pipe = diffuse.load_pipeline(folder32, dtype="float32")
    steps = []
    pipe.txt2img(PROMPT, seed=1, callback=steps.append, **FAST)
    step = steps[-1]
    own = pixels(step.preview())
    assert np.array_equal(own, pixels(to_pil(latents_to_rgb_cheap(step.denoised, pipe.preview_matrix) * 2 - 1)))
    assert not np.array_equal(own, pixels(to_pil(latents_to_rgb_cheap(step.denoised, SD_LATENT_RGB) * 2 - 1)))
    # The fit is least squares on this VAE's latents and decodes: it beats SD's table on them.
    with torch.no_grad():
        images = torch.rand(4, 3, 32, 32) * 2 - 1
        mean = pipe.vae.encode(images).mean
        target = torch.nn.functional.avg_pool2d(pipe.vae.decode(mean), 4) * 0.5 + 0.5
        latents = mean * pipe.config.vae.scaling_factor
    error = {
        name: (latents_to_rgb_cheap(latents, matrix) - target).abs().mean().item()
        for name, matrix in (("own", pipe.preview_matrix), ("sd", SD_LATENT_RGB))
    }
    assert error["own"] < error["sd"], error


def test_float16_folder_loads(stages, tmp_path):
    folder = assemble(
        stages["vae"], stages["clip"], stages["unet"], tmp_path / "default", preview_samples=PREVIEW_SAMPLES
    )
    stored = safetensors.torch.load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.float16}
    ours = build_pipeline(stages["vae"], stages["clip"], stages["unet"], source=folder, preview_samples=PREVIEW_SAMPLES)
    half = diffuse.load_pipeline(folder, dtype="float16")
    assert half.dtype == torch.float16
    want, got = ours.unet.state_dict(), half.unet.state_dict()
    assert all(torch.equal(want[k].half(), got[k]) for k in want)
    image = pixels(half.txt2img(PROMPT, seed=2, **FAST).images)
    assert image.shape == (1, 32, 32, 3)
    full = pixels(diffuse.load_pipeline(folder, dtype="float32").txt2img(PROMPT, seed=2, **FAST).images)
    assert np.abs(image.astype(int) - full.astype(int)).mean() < 8  # fp16 rounding, not another model


def test_diffusers_loads_the_assembled_folder(folder32):
    """The preview matrix and the image tower are files diffusers does not ask for: it still loads the folder."""
    assert_diffusers_agrees(diffuse.load_pipeline(folder32, dtype="float32"), folder32)


def test_stages_that_do_not_fit_are_refused(stages, tmp_path):
    out = tmp_path / "out"
    wide_unet = write_unet_stage(
        tmp_path / "wide", stages["vae"], stages["clip"], dataclasses.replace(MICRO_UNET, context_dim=16)
    )
    with pytest.raises(ValueError, match=r"attends to 16-wide text states, but the text encoder .* is 32 wide"):
        assemble(stages["vae"], stages["clip"], wide_unet, out)
    three = write_vae_stage(tmp_path / "vae3", dataclasses.replace(MICRO_VAE, latent_channels=3))
    with pytest.raises(ValueError, match=r"4 in / 4 out channels, but the VAE .* has 3 latent channels"):
        assemble(three, stages["clip"], stages["unet"], out)
    with pytest.raises(ValueError, match="holds no finished unet"):
        assemble(stages["vae"], stages["clip"], tmp_path / "nowhere", out)
    assert not out.exists()


def test_the_unet_must_get_the_stages_it_was_trained_on(stages, tmp_path):
    out = tmp_path / "out"
    other = write_vae_stage(tmp_path / "other_vae", seed=7)
    with pytest.raises(ValueError, match=r"trained on the vae in .*vae, and .*other_vae holds a different one"):
        assemble(other, stages["clip"], stages["unet"], out)
    assert not out.exists()
    # A copy of the same stage elsewhere is the same VAE: accepted, without a warning.
    copy = Path(shutil.copytree(stages["vae"], tmp_path / "copied_vae"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", AssemblyWarning)
        assemble(copy, stages["clip"], stages["unet"], out, preview_samples=2)
    # A recorded folder that is gone cannot be checked: a warning names it.
    moved = write_unet_stage(tmp_path / "unet_elsewhere", tmp_path / "gone_vae", stages["clip"])
    with pytest.warns(AssemblyWarning, match="gone_vae, which is not there"):
        assemble(stages["vae"], stages["clip"], moved, tmp_path / "out2", preview_samples=2)


def test_a_stage_retrained_in_its_recorded_folder_is_caught_by_its_weights(stages, tmp_path):
    vae = Path(shutil.copytree(stages["vae"], tmp_path / "vae"))
    unet = write_unet_stage(tmp_path / "unet", vae, stages["clip"], fingerprints=True)
    moved = Path(shutil.copytree(vae, tmp_path / "vae_moved"))
    shutil.rmtree(vae)
    with warnings.catch_warnings():  # the recorded folder is gone, but the weights say it is the same VAE
        warnings.simplefilter("error", AssemblyWarning)
        assemble(moved, stages["clip"], unet, tmp_path / "out", preview_samples=2)
    write_vae_stage(vae, seed=7)  # the recorded folder again, retrained
    with pytest.raises(ValueError, match=r"trained on another vae than the one in .*vae \(its weights' sha256"):
        assemble(vae, stages["clip"], unet, tmp_path / "out2", preview_samples=2)
    assert not (tmp_path / "out2").exists()


def test_a_clip_stage_without_its_tower_gives_a_model_without_one(stages, tmp_path):
    clip = Path(shutil.copytree(stages["clip"], tmp_path / "clip"))
    for path in final_files(clip, "image_tower"):
        path.unlink()
    with pytest.warns(AssemblyWarning, match="no image tower"):
        folder = assemble(stages["vae"], clip, stages["unet"], tmp_path / "out", preview_samples=2)
    assert not (folder / IMAGE_TOWER_DIR).exists() and load_image_tower(folder) is None
    results = evaluate(
        diffuse.load_pipeline(folder, dtype="float32"), EvalSettings(singles=1, pairs=0, images=2, steps=1)
    )
    assert "no CLIP image tower" in results["caption_retrieval"]["skipped"]
    assert "skipped" in format_report(results)


# ---------------------------------------------------------------- evaluate


def test_evaluate_a_random_model(folder32, tmp_path):
    pipe = diffuse.load_pipeline(folder32, dtype="float32")
    settings = EvalSettings(singles=2, pairs=2, images=6, steps=2, batch_size=3)
    results = evaluate(pipe, settings)
    for kind in ("singles", "pairs"):
        adherence = results["prompt_adherence"][kind]
        assert adherence["prompts"] == 2 and 0 <= adherence["all_correct"] <= 1
        assert adherence["stated"]["shape"] == 2 and all(0 <= v <= 1 for v in adherence["attributes"].values())
    assert "relation" in results["prompt_adherence"]["pairs"]["attributes"]
    assert "relation" not in results["prompt_adherence"]["singles"]["attributes"]
    vae = results["vae_reconstruction"]
    assert vae["images"] == 6 and math.isfinite(vae["psnr_db_mean"]) and vae["psnr_db_worst"] <= vae["psnr_db_mean"]
    assert sum(vae["read_right_images"].values()) == 6 and all(0 <= v <= 1 for v in vae["read_right"].values())
    retrieval = results["caption_retrieval"]
    assert retrieval["images"] == 6 and 0 <= retrieval["top1"] <= 1 and 0 < retrieval["chance"] <= 1
    relation = retrieval["relation_vs_reversed"]
    assert relation["pairs"] == 6 and 0 <= relation["own_caption_preferred"] <= 1
    timing = results["generation_time"]
    assert len(timing["runs_s"]) == 3 and timing["median_s"] > 0 and timing["torch_threads"] >= 1
    assert results["settings"]["width"] == 32 and results["settings"]["sampler"] == "Euler a"
    assert results["model"] == folder32.name and results["model_hash"] == pipe.model_hash  # no machine's path
    # Everything but the clock comes out the same again.
    again = evaluate(pipe, settings)
    del results["generation_time"], again["generation_time"]
    assert again == results
    report = format_report({**results, "generation_time": timing})
    assert "all correct" in report and "PSNR" in report and "retrieval top-1" in report and "reversed" in report
    path = write_report(results, tmp_path / "sub" / "eval.json")
    assert json.loads(path.read_text()) == results


def test_an_analyzer_perfect_generator_scores_one():
    """The scoring alone: images rendered from the held-out scenes themselves are all right,
    and the same images under the wrong prompts are not."""
    for kind, draw in (("singles", heldout_single_scenes), ("pairs", heldout_pair_scenes)):
        prompts = heldout_prompts(kind, 12)
        images = [render(scene, 64) for scene in draw(12)]
        perfect = score_adherence(prompts, images)
        assert perfect["all_correct"] == 1.0 and set(perfect["attributes"].values()) == {1.0}
        assert perfect["stated"]["colour"] == 12 and perfect["stated"]["background"] == 12
        shifted = score_adherence(prompts, images[1:] + images[:1])
        assert shifted["all_correct"] < 0.5


def test_another_scene_seed_draws_other_held_out_scenes():
    """The scenes settings are chosen on (scene_seed > 0) are not the test set, and are still held out."""
    for kind, draw in (("singles", heldout_single_scenes), ("pairs", heldout_pair_scenes)):
        test_set, other = heldout_prompts(kind, 12), heldout_prompts(kind, 12, scene_seed=7)
        assert heldout_prompts(kind, 12, scene_seed=0) == test_set
        assert len(set(test_set) & set(other)) <= 2  # a few short captions may coincide
        images = [render(scene, 64) for scene in draw(12, seed=7)]
        assert score_adherence(other, images)["all_correct"] == 1.0


def test_a_lossless_autoencoder_reads_back_perfectly(folder32):
    """vae_reconstruction's scoring alone: an autoencoder that hands the image through unchanged."""

    class Lossless(torch.nn.Module):
        def encode(self, images):
            return SimpleNamespace(mean=images)

        def decode(self, latents):
            return latents

    pipe = diffuse.load_pipeline(folder32, dtype="float32")
    # At 64 px, the size the analyzer is checked at (this random model's own is 32).
    pipe = dataclasses.replace(
        pipe,
        vae=Lossless(),
        config=dataclasses.replace(pipe.config, sample_size=64 // pipe.config.vae.downsample_factor),
    )
    assert pipe.config.image_size == 64
    measured = vae_reconstruction(pipe, count=40, chunk=16)
    assert measured["read_right"] == {"singles": 1.0, "pairs": 1.0} and measured["psnr_db_worst"] > 50
    assert sum(measured["read_right_images"].values()) == 40 and min(measured["read_right_images"].values()) > 0


def test_evaluation_settings_are_checked():
    with pytest.raises(ValueError, match="singles"):
        EvalSettings(singles=-1)
    with pytest.raises(ValueError, match="images"):
        EvalSettings(images=0)
    with pytest.raises(ValueError, match="steps"):
        EvalSettings(steps=0)
    with pytest.raises(ValueError, match="scene_seed"):
        EvalSettings(scene_seed=-1)


# ---------------------------------------------------------------- the command line


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_assemble_and_eval(stages, tmp_path, capsys):
    out = tmp_path / "model"
    args = [
        "assemble",
        "--vae",
        str(stages["vae"]),
        "--clip",
        str(stages["clip"]),
        "--unet",
        str(stages["unet"]),
        "--out",
        str(out),
    ]
    code, printed, err = run(args, capsys)
    assert code == 0, err
    assert printed.strip() == str(out) and (out / "vae" / "latent_rgb.json").is_file()
    code, _, err = run(args, capsys)
    assert code == 2 and err.count("\n") == 1 and "not empty" in err  # --overwrite replaces it
    assert run(args + ["--overwrite"], capsys)[0] == 0

    report = tmp_path / "eval.json"
    code, printed, err = run(
        [
            "eval",
            "--model",
            str(out),
            "--singles",
            "1",
            "--pairs",
            "1",
            "--images",
            "2",
            "--steps",
            "1",
            "--scene-seed",
            "3",
            "--json",
            str(report),
        ],
        capsys,
    )
    assert code == 0, err
    assert "all correct" in printed and "caption retrieval top-1" in printed and "scene seed 3" in printed
    assert json.loads(report.read_text())["settings"]["steps"] == 1
    assert json.loads(report.read_text())["settings"]["scene_seed"] == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "--singles", "-1"], "argument --singles: must be 0 or more, got -1"),
        (["eval", "--steps", "many"], "argument --steps: invalid _positive_int value: 'many'"),
        (["assemble", "--vae", "runs/vae"], "the following arguments are required: --clip, --unet, --out"),
    ],
)
def test_cli_argument_errors_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.splitlines()[-1].endswith(message)


def test_cli_errors_are_one_line(stages, tmp_path, capsys):
    code, _, err = run(
        [
            "assemble",
            "--vae",
            str(tmp_path / "nowhere"),
            "--clip",
            str(stages["clip"]),
            "--unet",
            str(stages["unet"]),
            "--out",
            str(tmp_path / "out"),
        ],
        capsys,
    )
    assert code == 2 and err.count("\n") == 1 and "nowhere holds no finished vae" in err
    code, _, err = run(["eval", "--model", str(tmp_path / "missing")], capsys)
    assert code == 2 and err.count("\n") == 1 and "missing" in err
    code, _, err = run(["eval", "--model", str(stages["root"]), "--json", str(tmp_path)], capsys)
    assert code == 2 and err.count("\n") == 1 and "is a folder" in err


def test_cli_eval_in_the_emoji_world(stages, folder32, tmp_path, capsys):
    """`eval --world emoji` draws the held-out emoji prompts and reads them with the given judge
    (an untrained one here: the plumbing is checked, not the rates)."""
    from test_emoji_world import make_catalogue

    from diffuse.emoji.catalogue import load_catalogue
    from diffuse.emoji.judge import EmojiJudge
    from diffuse.emoji.judge_train import JudgeNet

    make_catalogue(tmp_path / "data")
    names = [emoji.name for emoji in load_catalogue(tmp_path / "data")]
    EmojiJudge(names, [(0.0, 0.0, 1.0, 1.0)] * len(names), JudgeNet(len(names), (8, 8))).save(tmp_path / "judge")
    report = tmp_path / "eval.json"
    common = ["eval", "--world", "emoji", "--model", str(folder32), "--data", str(tmp_path / "data")]
    code, printed, err = run(
        common + ["--judge", str(tmp_path / "judge"), "--singles", "1", "--pairs", "1", "--steps", "1"]
        + ["--json", str(report), "--grid", str(tmp_path / "grid.png"), "--grid-columns", "1"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "held-out prompts" in printed and "clean renders" in printed and "through the VAE" in printed
    results = json.loads(report.read_text())
    assert results["settings"]["data_folder"] == str(tmp_path / "data") and results["settings"]["steps"] == 1
    assert (
        results["through_autoencoder"]["all"]["singles"]["prompts"]
        == results["clean_renders"]["all"]["singles"]["prompts"]
    )
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.format == "PNG" and grid.height > grid.width  # one column, a row per category and kind
    code, _, err = run(["eval", "--model", str(folder32), "--grid", str(tmp_path / "shapes.png")], capsys)
    assert code == 2 and err.count("\n") == 1 and "--world emoji" in err
    code, _, err = run(common + ["--judge", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and err.count("\n") == 1 and "nowhere" in err
    other = names[::-1]  # a judge of another catalogue (here: the names in another order) is refused
    EmojiJudge(other, [(0.0, 0.0, 1.0, 1.0)] * len(other), JudgeNet(len(other), (8, 8))).save(tmp_path / "other")
    code, _, err = run(common + ["--judge", str(tmp_path / "other")], capsys)
    assert code == 2 and err.count("\n") == 1 and "trained on" in err
