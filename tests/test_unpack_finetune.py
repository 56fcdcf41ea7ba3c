"""A model folder back into training stages (diffuse.train.unpack), and stages that start from
finished ones (init_from): fine-tuning a model, on the micro random stages of test_assemble_eval."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from test_assemble_eval import (  # noqa: F401
    DATA,
    FAST,
    MICRO_IMAGE,
    MICRO_TEXT,
    MICRO_UNET,
    MICRO_VAE,
    PREVIEW_SAMPLES,
    PROMPT,
    folder32,
    pixels,
    stages,
)

import diffuse
from diffuse.cli import main
from diffuse.train.assemble import assemble
from diffuse.train.components import final_files, load_final
from diffuse.train.stages import clip as clip_stage
from diffuse.train.stages import unet as unet_stage
from diffuse.train.stages import vae as vae_stage
from diffuse.train.stages.clip import CLIPTrainConfig, train_clip
from diffuse.train.stages.unet import UNetTrainConfig, load_conditioning, train_unet
from diffuse.train.stages.vae import VAETrainConfig
from diffuse.train.unpack import unpack


@pytest.fixture(scope="module")
def unpacked(folder32, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    return unpack(folder32, tmp_path_factory.mktemp("unpacked"))


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    want, got = a.state_dict(), b.state_dict()
    return want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def clip_config(folder: Path, **changes) -> CLIPTrainConfig:
    return dataclasses.replace(
        CLIPTrainConfig(
            text_encoder=MICRO_TEXT,
            image_encoder=MICRO_IMAGE,
            data=DATA,
            steps=1,
            batch_size=4,
            warmup_steps=0,
            init_from=str(folder),
        ),
        **changes,
    )


def unet_config(unpacked: dict[str, Path], **changes) -> UNetTrainConfig:
    return dataclasses.replace(
        UNetTrainConfig(
            unet=MICRO_UNET,
            vae_dir=str(unpacked["vae"]),
            text_encoder_dir=str(unpacked["text_encoder"]),
            data=DATA,
            steps=1,
            batch_size=2,
            warmup_steps=0,
            init_from=str(unpacked["unet"]),
        ),
        **changes,
    )


def test_unpacked_stages_assemble_back_to_the_same_model(folder32, unpacked, tmp_path):  # noqa: F811
    assert all(final_files(folder, "vae")[1].is_file() for folder in unpacked.values())
    assert final_files(unpacked["text_encoder"], "image_tower")[1].is_file()
    rebuilt = assemble(
        unpacked["vae"],
        unpacked["text_encoder"],
        unpacked["unet"],
        tmp_path / "again",
        dtype=torch.float32,
        preview_samples=PREVIEW_SAMPLES,
    )
    original, again = diffuse.load_pipeline(folder32, dtype="float32"), diffuse.load_pipeline(rebuilt, dtype="float32")
    for name in ("text_encoder", "unet", "vae"):
        assert same_weights(getattr(original, name), getattr(again, name)), name
    assert again.config == dataclasses.replace(original.config, name="again")
    assert again.scheduler_config == original.scheduler_config
    assert same_weights(
        load_final(folder32 / "image_tower", "image_tower")[0], load_final(rebuilt / "image_tower", "image_tower")[0]
    )
    a, b = original.txt2img(PROMPT, seed=3, **FAST), again.txt2img(PROMPT, seed=3, **FAST)
    assert np.array_equal(pixels(a.images), pixels(b.images))


def test_unpacking_never_writes_over_a_finished_stage(folder32, unpacked):  # noqa: F811
    with pytest.raises(ValueError, match="already holds a finished stage"):
        unpack(folder32, unpacked["vae"].parent)


def test_stages_start_from_init_from(unpacked):
    models = clip_stage.build_models(clip_config(unpacked["text_encoder"]))
    assert same_weights(models["text_encoder"], load_final(unpacked["text_encoder"], "text_encoder")[0])
    tower = load_final(unpacked["text_encoder"], "image_tower")[0]
    for name, part in tower.named_children():
        assert same_weights(models[name], part), name
    config = unet_config(unpacked)
    models = unet_stage.build_models(config, load_conditioning(config))
    assert same_weights(models["unet"], load_final(unpacked["unet"], "unet")[0])
    # Without init_from the same seed gives random weights.
    scratch = unet_stage.build_models(dataclasses.replace(config, init_from=None), load_conditioning(config))
    assert not same_weights(scratch["unet"], models["unet"])
    # The VAE's scaling factor is measured, not chosen: a different one in the config is no refusal.
    vae_config = VAETrainConfig(
        vae=dataclasses.replace(MICRO_VAE, scaling_factor=0.5), data=DATA, init_from=str(unpacked["vae"])
    )
    assert same_weights(vae_stage.build_models(vae_config)["vae"], load_final(unpacked["vae"], "vae")[0])


def test_fine_tuning_a_model_end_to_end(unpacked, tmp_path):
    """Text encoder trained further with hard negatives, the UNet on it, assembled with the unpacked VAE."""
    train_clip(clip_config(unpacked["text_encoder"], hard_negatives=True), tmp_path / "clip", progress=False)
    tuned = load_final(tmp_path / "clip", "text_encoder")[0]
    assert not same_weights(tuned, load_final(unpacked["text_encoder"], "text_encoder")[0])
    # The unpacked UNet belongs to the unpacked text encoder: not to the one trained further.
    with pytest.raises(ValueError, match="trained on another text_encoder"):
        assemble(
            unpacked["vae"], tmp_path / "clip", unpacked["unet"], tmp_path / "mixed", preview_samples=PREVIEW_SAMPLES
        )
    train_unet(unet_config(unpacked, text_encoder_dir=str(tmp_path / "clip")), tmp_path / "unet", progress=False)
    folder = assemble(
        unpacked["vae"], tmp_path / "clip", tmp_path / "unet", tmp_path / "model", preview_samples=PREVIEW_SAMPLES
    )
    assert pixels(diffuse.load_pipeline(folder).txt2img(PROMPT, seed=1, **FAST).images).std() > 0


def test_init_from_another_architecture_is_refused(unpacked, tmp_path):
    wider = dataclasses.replace(MICRO_TEXT, mlp_width=128)
    with pytest.raises(ValueError, match=r"is not this run's architecture \(they differ in mlp_width\)"):
        clip_stage.build_models(clip_config(unpacked["text_encoder"], text_encoder=wider))
    with pytest.raises(ValueError, match="trained with pad_token_id 49407, this run pads with 0"):
        clip_stage.build_models(clip_config(unpacked["text_encoder"], pad_token_id=0))
    config = unet_config(unpacked, unet=dataclasses.replace(MICRO_UNET, num_res_blocks=2))
    with pytest.raises(ValueError, match="differ in num_res_blocks"):
        unet_stage.build_models(config, load_conditioning(config))
    with pytest.raises(ValueError, match=r"differ in base_channels\)"):
        vae_stage.build_models(
            VAETrainConfig(
                vae=dataclasses.replace(MICRO_VAE, base_channels=16), data=DATA, init_from=str(unpacked["vae"])
            )
        )
    # A CLIP stage is started on both sides or not at all.
    (tmp_path / "clip").mkdir()
    for path in final_files(unpacked["text_encoder"], "text_encoder"):
        (tmp_path / "clip" / path.name).write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="holds no finished image_tower"):
        clip_stage.build_models(clip_config(tmp_path / "clip"))


def test_cli_unpack(folder32, tmp_path, capsys):  # noqa: F811
    assert main(["unpack", str(folder32), "--out", str(tmp_path / "runs")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        f"{name}: {tmp_path / 'runs' / folder}"
        for name, folder in (("vae", "vae"), ("text_encoder", "clip"), ("unet", "unet"))
    ]
    assert main(["unpack", str(folder32), "--out", str(tmp_path / "runs")]) == 2
    assert "already holds a finished stage" in capsys.readouterr().err
    assert main(["unpack", str(tmp_path / "nothing"), "--out", str(tmp_path / "other")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
