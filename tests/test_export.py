"""save_diffusers_folder: a loaded pipeline written back as a diffusers folder reads back
bit for bit in diffuse, runs the same in diffusers, and is never left half-written."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import build_reference

import diffuse
from diffuse.checkpoints import export
from diffuse.checkpoints.export import save_diffusers_folder
from diffuse.models.clip import CLIPTextEncoder
from diffuse.models.unet import UNet
from diffuse.models.vae import AutoencoderKL
from diffuse.tokenizer import CLIPTokenizer
from diffuse.train.presets import TINY

TOL = 1e-4
PROMPTS = ["a photo of a cat", "", "(red:1.2) circle, <|endoftext|> café 東京 !!!", "x " * 100]
NETWORKS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def inpaint_folder(tmp_path_factory, clip_vocab_dir) -> Path:
    folder = tmp_path_factory.mktemp("tiny_inpaint")
    build_reference("sd1", clip_vocab_dir, seed=1, in_channels=9).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory) -> diffuse.Pipeline:
    """The training preset's architecture (16 and 8 norm groups, attention at every level,
    2/4/4 heads), random weights, a non-SD scaling factor and v-prediction."""
    config = replace(TINY, vae=replace(TINY.vae, scaling_factor=0.4321), prediction_type="v_prediction")
    torch.manual_seed(0)
    networks = {
        "text_encoder": CLIPTextEncoder(config.text_encoder),
        "unet": UNet(config.unet),
        "vae": AutoencoderKL(config.vae),
    }
    with torch.no_grad():  # move norms and zero-initialised layers off their constants, so a misplaced tensor shows
        for net in networks.values():
            net.eval()
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return diffuse.Pipeline(
        tokenizer=CLIPTokenizer.from_bpe_gz(pad_token_id=config.pad_token_id),
        config=config,
        source=tmp_path_factory.mktemp("tiny_source"),
        **networks,
    )


def assert_same_pipeline(a: diffuse.Pipeline, b: diffuse.Pipeline, dtype: torch.dtype | None = None) -> None:
    for name in NETWORKS:
        want, got = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert want.keys() == got.keys(), name
        for key in want:
            expected = want[key] if dtype is None else want[key].to(dtype).to(got[key].dtype)
            assert got[key].dtype == expected.dtype and torch.equal(got[key], expected), f"{name}.{key}"
    assert replace(b.config, name=a.config.name) == a.config
    for prompt in PROMPTS:
        assert torch.equal(a.tokenizer(prompt), b.tokenizer(prompt)), prompt


def saved_and_loaded(pipe: diffuse.Pipeline, folder: Path) -> diffuse.Pipeline:
    assert save_diffusers_folder(pipe, folder) == folder
    return diffuse.load_pipeline(folder, dtype="float32")


# ---------------------------------------------------------------- round trips through diffuse


def test_reference_folder_round_trips_exactly(reference_folders, style, tmp_path):
    ours = diffuse.load_pipeline(reference_folders[style], dtype="float32")
    again = saved_and_loaded(ours, tmp_path / "export")
    assert_same_pipeline(ours, again)
    assert again.scheduler_config == ours.scheduler_config
    names = sorted(str(p.relative_to(tmp_path / "export")) for p in (tmp_path / "export").rglob("*") if p.is_file())
    assert names == [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]


def test_inpainting_unet_round_trips(inpaint_folder, tmp_path):
    ours = diffuse.load_pipeline(inpaint_folder, dtype="float32")
    assert ours.config.unet.in_channels == 9
    again = saved_and_loaded(ours, tmp_path / "export")
    assert_same_pipeline(ours, again)
    index = json.loads((tmp_path / "export" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInpaintPipeline"


def test_non_sd_architecture_round_trips(tiny_pipe, tmp_path):
    again = saved_and_loaded(tiny_pipe, tmp_path / "export")
    assert_same_pipeline(tiny_pipe, again)
    unet = json.loads((tmp_path / "export" / "unet" / "config.json").read_text())
    assert (unet["norm_num_groups"], unet["attention_head_dim"]) == (16, [2, 4, 4])
    assert unet["down_block_types"] == ["CrossAttnDownBlock2D"] * 3
    # No scheduler settings of its own: SD's, with the model's prediction type, usable by our samplers.
    scheduler = again.scheduler_config
    assert (scheduler["_class_name"], scheduler["prediction_type"], scheduler["beta_end"]) == (
        "PNDMScheduler",
        "v_prediction",
        0.012,
    )
    assert again.get_sampler("DPM++ 2M Karras").name == tiny_pipe.get_sampler("DPM++ 2M Karras").name


def test_half_precision_halves_the_weights(reference_folders, tmp_path):
    ours = diffuse.load_pipeline(reference_folders["sd2"], dtype="float32")
    full, half = tmp_path / "fp32", tmp_path / "fp16"
    save_diffusers_folder(ours, full)
    save_diffusers_folder(ours, half, dtype=torch.float16)
    for name in NETWORKS:
        weights = export.WEIGHTS[name]
        ratio = (half / name / weights).stat().st_size / (full / name / weights).stat().st_size
        assert 0.49 < ratio < 0.51, (name, ratio)
    assert_same_pipeline(ours, diffuse.load_pipeline(half, dtype=torch.float16), dtype=torch.float16)


# ---------------------------------------------------------------- diffusers reads it


def assert_diffusers_agrees(ours: diffuse.Pipeline, folder: Path) -> None:
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    generator = torch.Generator().manual_seed(0)
    ids = ours.tokenizer(PROMPTS[:2])
    latents = torch.randn(2, ours.config.unet.in_channels, 16, 16, generator=generator)
    pixels = torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1
    t = torch.tensor([10, 900])
    with torch.no_grad():
        context = ours.text_encoder(ids)
        errors = {
            "text_encoder": (context - ref.text_encoder(ids)[0]).abs().max(),
            "unet": (ours.unet(latents, t, context) - ref.unet(latents, t, encoder_hidden_states=context).sample)
            .abs()
            .max(),
            "vae.decode": (ours.vae.decode(latents[:, :4]) - ref.vae.decode(latents[:, :4]).sample).abs().max(),
            "vae.encode": (ours.vae.encode(pixels).mean - ref.vae.encode(pixels).latent_dist.mean).abs().max(),
        }
    assert all(e <= TOL for e in errors.values()), errors
    assert ref.vae.config.scaling_factor == ours.config.vae.scaling_factor
    assert ref.scheduler.config.prediction_type == ours.config.prediction_type


def test_diffusers_runs_an_exported_reference(reference_folders, style, tmp_path):
    ours = diffuse.load_pipeline(reference_folders[style], dtype="float32")
    assert_diffusers_agrees(ours, save_diffusers_folder(ours, tmp_path / "export"))


def test_diffusers_runs_an_exported_non_sd_architecture(tiny_pipe, tmp_path):
    assert_diffusers_agrees(tiny_pipe, save_diffusers_folder(tiny_pipe, tmp_path / "export"))


# ---------------------------------------------------------------- never half-written


def failing_on_second_weights_file(monkeypatch) -> None:
    real, calls = export.safetensors_bytes, []

    def flaky(tensors, metadata=None):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(tensors, metadata=metadata)

    monkeypatch.setattr(export, "safetensors_bytes", flaky)


def test_failure_mid_write_leaves_nothing(tiny_pipe, tmp_path, monkeypatch):
    failing_on_second_weights_file(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        save_diffusers_folder(tiny_pipe, tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_folder(tiny_pipe, tmp_path, monkeypatch):
    folder = tmp_path / "export"
    save_diffusers_folder(tiny_pipe, folder)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    failing_on_second_weights_file(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        save_diffusers_folder(tiny_pipe, folder, overwrite=True)
    assert list(tmp_path.iterdir()) == [folder]
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_existing_folder_is_refused_unless_overwrite(tiny_pipe, tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        save_diffusers_folder(tiny_pipe, folder)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]

    save_diffusers_folder(tiny_pipe, folder, overwrite=True)
    assert not (folder / "notes.txt").exists() and (folder / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # the old folder set aside is gone

    empty = tmp_path / "empty"
    empty.mkdir()
    assert (save_diffusers_folder(tiny_pipe, empty) / "unet" / "config.json").is_file()


def test_unsaveable_requests_are_refused(tiny_pipe, tmp_path):
    with pytest.raises(ValueError, match="save dtype"):
        save_diffusers_folder(tiny_pipe, tmp_path / "a", dtype=torch.int8)
    mismatched = replace(tiny_pipe, config=replace(tiny_pipe.config, pad_token_id=0))
    with pytest.raises(ValueError, match="pad_token_id=0"):
        save_diffusers_folder(mismatched, tmp_path / "b")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a folder"):
        save_diffusers_folder(tiny_pipe, tmp_path / "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_weights_built_in_memory_generate_without_a_model_hash(tiny_pipe, tmp_path):
    # Nothing on disk to hash: the image and its parameters still come back, without "Model hash".
    pipe = replace(tiny_pipe, source=tmp_path / "never-saved")
    result = pipe.txt2img("a red circle", width=32, height=32, steps=1, seed=3)
    assert result.info["model_hash"] is None and result.images[0].size == (32, 32)
    assert "Model hash" not in result.infotexts[0] and "Seed: 3" in result.infotexts[0]
