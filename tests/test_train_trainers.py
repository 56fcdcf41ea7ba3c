"""The three stage trainers (autoencoder, text encoder, UNet) on the shared loop, with micro models.

The VAE and CLIP stages are trained once per module (3 steps each, 32x32 images) and the
UNet tests condition on what they leave. One test runs the CLIP stage under torchrun with
2 processes against 1 process, since its loss gathers embeddings across processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import safetensors.torch
import torch

from diffuse.models.clip import CLIPTextEncoder
from diffuse.models.configs import TextEncoderConfig, UNetConfig, VAEConfig
from diffuse.shapes.data import DataConfig, ShapesDataset
from diffuse.shapes.image_encoder import ImageEncoderConfig
from diffuse.train.__main__ import main_train
from diffuse.train.components import FINAL_INFO, FINAL_WEIGHTS, load_final
from diffuse.train.config_files import config_from_dict, read_config
from diffuse.train.loop import BatchRandom, train
from diffuse.train.presets import TINY_VAE
from diffuse.train.stages.clip import CLIPTrainConfig, train_clip
from diffuse.train.stages.unet import (
    UNetTrainConfig,
    build_models,
    load_conditioning,
    loss_fn,
    make_batch,
    train_unet,
)
from diffuse.train.stages.vae import VAETrainConfig, measure_scaling_factor, train_vae
from diffuse.train.state import capture_rng_state, latest_checkpoint, read_checkpoint, restore_rng_state

DATA = DataConfig(seed=3, image_size=32)
MICRO_VAE = VAEConfig(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=4)  # f = 4: 8x8 latents
MICRO_TEXT = TextEncoderConfig(width=32, layers=1, heads=2, mlp_width=64)  # CLIP's vocabulary and 77 positions
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
LOOP = {"batch_size": 4, "lr": 1e-3, "warmup_steps": 1, "log_every": 1, "checkpoint_every": 2}
REPO = Path(__file__).resolve().parents[1]


def json_fields(config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def logged(folder: Path) -> list[dict]:
    with open(folder / "log.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Finished VAE and CLIP stages (3 steps each), the VAE's through main_train and a config file."""
    threads, rng = torch.get_num_threads(), capture_rng_state()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("stages")
    vae_config = VAETrainConfig(vae=MICRO_VAE, data=DATA, scaling_samples=8, steps=50, **LOOP)
    (root / "vae.json").write_text(json.dumps(json_fields(vae_config)))
    # --steps overrides the file's 50.
    assert (
        main_train(
            ["vae", "--config", str(root / "vae.json"), "--out", str(root / "vae"), "--steps", "3", "--no-progress"]
        )
        == 0
    )
    clip_config = CLIPTrainConfig(text_encoder=MICRO_TEXT, image_encoder=MICRO_IMAGE, data=DATA, steps=3, **LOOP)
    clip_losses = train_clip(clip_config, root / "clip", progress=False)
    yield {"root": root, "vae_config": vae_config, "clip_config": clip_config, "clip_losses": clip_losses}
    torch.set_num_threads(threads)
    restore_rng_state(rng)


def unet_config(stages, **changes) -> UNetTrainConfig:
    fields = {
        "unet": MICRO_UNET,
        "vae_dir": str(stages["root"] / "vae"),
        "text_encoder_dir": str(stages["root"] / "clip"),
        "data": DATA,
        "steps": 3,
        **LOOP,
    }
    return UNetTrainConfig(**{**fields, **changes})


# ---------------------------------------------------------------- the autoencoder


def test_vae_stage_logs_finite_losses_and_leaves_its_scaled_vae(stages):
    folder = stages["root"] / "vae"
    records = logged(folder)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r[key]) for r in records for key in ("loss", "rec_l1", "kl", "latent_std"))
    info = json.loads((folder / FINAL_INFO).read_text())
    assert info["component"] == "vae" and info["trained_with"]["steps"] == 3
    vae, config, _ = load_final(folder, "vae")
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training
    # The stored factor is the trained encoder's, measured on the fixed images: recomputing it
    # from the saved weights gives it back, and it is not the untrained default.
    assert config.scaling_factor != TINY_VAE.scaling_factor
    again = measure_scaling_factor(vae, ShapesDataset(DATA), 8, stages["vae_config"].seed)
    assert again == pytest.approx(config.scaling_factor, rel=1e-6)
    assert dataclasses.replace(config, scaling_factor=0.0) == dataclasses.replace(MICRO_VAE, scaling_factor=0.0)


# ---------------------------------------------------------------- the text encoder


def test_clip_stage_logs_retrieval_and_leaves_a_trained_text_encoder(stages):
    folder = stages["root"] / "clip"
    records = logged(folder)
    assert [r["loss"] for r in records] == stages["clip_losses"] and len(records) == 3
    assert all(math.isfinite(r["loss"]) and 0 <= r["acc_image_to_text"] <= 1 for r in records)
    text_encoder, config, extra = load_final(folder, "text_encoder")
    assert config == MICRO_TEXT and extra["pad_token_id"] == 49407
    torch.manual_seed(stages["clip_config"].seed)  # the trainer's starting weights
    initial = CLIPTextEncoder(MICRO_TEXT).state_dict()
    changed = [name for name, value in text_encoder.state_dict().items() if not torch.equal(value, initial[name])]
    assert "final_layer_norm.weight" in changed and "encoder.layers.0.mlp.fc1.weight" in changed


@pytest.mark.parametrize("hard_negatives", [False, True])
def test_clip_with_two_processes_matches_one(stages, tmp_path, hard_negatives):
    """torchrun, 2 gloo processes of 2 rows each, against one process with the 4 rows: the loss
    compares all 4 images with all 4 captions (and, with hard negatives, every reversed-relation
    caption) either way, and the gradients agree (the logged norm would show a gradient scaled
    wrongly, which Adam's steps alone would hide)."""
    config = dataclasses.replace(stages["clip_config"], steps=2, checkpoint_every=2, hard_negatives=hard_negatives)
    (tmp_path / "clip.json").write_text(json.dumps(json_fields(config)))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "diffuse.train",
        "clip",
        "--config",
        str(tmp_path / "clip.json"),
        "--out",
        str(tmp_path / "ddp"),
        "--no-progress",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        single = train_clip(config, tmp_path / "single", progress=False)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)
    assert process.returncode == 0, output.decode(errors="replace")[-3000:]
    ddp, one = logged(tmp_path / "ddp"), logged(tmp_path / "single")
    assert [r["loss"] for r in ddp] == pytest.approx(single, rel=1e-5)
    for key in ("grad_norm", "acc_image_to_text", "logit_scale"):
        assert [r[key] for r in ddp] == pytest.approx([r[key] for r in one], rel=1e-5), key
    assert [r.get("acc_vs_negative") for r in ddp] == [r.get("acc_vs_negative") for r in one]
    assert any("acc_vs_negative" in r for r in one) == hard_negatives  # the batches hold two-object scenes
    ddp_weights = safetensors.torch.load_file(tmp_path / "ddp" / FINAL_WEIGHTS)
    one_weights = safetensors.torch.load_file(tmp_path / "single" / FINAL_WEIGHTS)
    # Left out: the key projection's bias. Adding a constant to every key moves all of a query's
    # logits alike, so its true gradient is zero and what it gets is float round-off, which
    # Adam scales up to lr-sized steps that differ between any two summation orders.
    differences = {
        name: (ddp_weights[name] - value).abs().max().item()
        for name, value in one_weights.items()
        if not name.endswith("k_proj.bias")
    }
    # Adam turns float round-off in a gradient near its eps (1e-8) into a visible share of a
    # step (seen: 3e-5 on one query weight with hard negatives, where the text batch is summed
    # in another order); a wrong gradient moves weights by about lr (1e-3).
    assert max(differences.values()) < config.lr / 10, sorted(differences.items(), key=lambda kv: -kv[1])[:3]


# ---------------------------------------------------------------- the UNet


def test_unet_trains_on_frozen_vae_and_text_encoder_with_caption_dropout(stages, tmp_path):
    config = unet_config(stages, caption_dropout=0.5)
    conditioning = load_conditioning(config)
    assert conditioning.scaling_factor == load_final(config.vae_dir, "vae")[1].scaling_factor
    seen_ids, encoded = [], []
    conditioning.text_encoder.register_forward_hook(lambda module, args, out: seen_ids.append(args[0].clone()))
    conditioning.vae.encoder.register_forward_hook(lambda module, args, out: encoded.append(len(args[0])))
    models = build_models(config, conditioning)
    frozen_before = {
        name: {k: v.clone() for k, v in models[name].state_dict().items()} for name in ("vae", "text_encoder")
    }
    unet_before = {k: v.clone() for k, v in models["unet"].state_dict().items()}

    losses = train(
        config,
        models,
        partial(loss_fn, config, conditioning),
        partial(make_batch, ShapesDataset(DATA)),
        tmp_path / "unet",
        progress=False,
    )

    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    for name, before in frozen_before.items():
        assert all(torch.equal(value, before[key]) for key, value in models[name].state_dict().items()), name
        assert not models[name].training
    assert any(not torch.equal(value, unet_before[key]) for key, value in models["unet"].state_dict().items())
    # Each step ran the text encoder on the batch's ids and the VAE's encoder on its images.
    assert [len(ids) for ids in seen_ids] == [4, 4, 4] and encoded == [4, 4, 4]
    empty = conditioning.tokenizer([""])[0]
    dropped = [int((ids == empty).all(dim=1).sum()) for ids in seen_ids]
    assert 0 < sum(dropped) < 12  # p = 0.5 over 12 captions (fixed seed: neither none nor all)
    assert [r["captions_dropped"] * 4 for r in logged(tmp_path / "unet")] == dropped


def test_caption_dropout_none_and_all(stages):
    config = unet_config(stages)
    conditioning = load_conditioning(config)
    models = build_models(config, conditioning)
    batch = make_batch(ShapesDataset(DATA), 0, 4)
    for p, expected in ((0.0, 0.0), (1.0, 1.0)):
        random = BatchRandom(torch.Generator().manual_seed(0), 0, 4, 4, torch.device("cpu"))
        loss, logs = loss_fn(dataclasses.replace(config, caption_dropout=p), conditioning, models, batch, random)
        assert logs["captions_dropped"] == expected and math.isfinite(loss.item())
    assert config.caption_dropout == 0.1  # SD's rate by default


def test_unet_resume_matches_a_straight_run(stages, tmp_path):
    config = unet_config(stages, steps=4)
    frozen_files = [file_digest(Path(folder) / FINAL_WEIGHTS) for folder in (config.vae_dir, config.text_encoder_dir)]
    straight = train_unet(config, tmp_path / "straight", progress=False)
    first = train_unet(dataclasses.replace(config, steps=2), tmp_path / "resumed", progress=False)
    resumed = train_unet(config, tmp_path / "resumed", progress=False)
    assert len(straight) == 4 and all(math.isfinite(loss) for loss in straight)
    assert first == straight[:2] and resumed == straight
    assert logged(tmp_path / "resumed") == logged(tmp_path / "straight")
    assert file_digest(tmp_path / "resumed" / FINAL_WEIGHTS) == file_digest(tmp_path / "straight" / FINAL_WEIGHTS)
    unet, unet_cfg, extra = load_final(tmp_path / "straight", "unet")
    assert unet_cfg == MICRO_UNET and extra["sample_size"] == 8 and extra["prediction_type"] == "epsilon"
    assert (
        [file_digest(Path(folder) / FINAL_WEIGHTS) for folder in (config.vae_dir, config.text_encoder_dir)]
        == frozen_files
        == [extra["vae_sha256"], extra["text_encoder_sha256"]]
    )  # recorded: what it trained on
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train_unet(config, tmp_path / "straight", resume=False, progress=False)


def test_unet_resume_refuses_a_text_encoder_replaced_at_the_same_path(stages, tmp_path):
    clip = tmp_path / "clip"
    shutil.copytree(stages["root"] / "clip", clip)
    config = unet_config(stages, steps=4, text_encoder_dir=str(clip))
    straight = train_unet(config, tmp_path / "straight", progress=False)
    train_unet(dataclasses.replace(config, steps=2), tmp_path / "run", progress=False)
    weights = clip / FINAL_WEIGHTS
    original = weights.read_bytes()
    retrained = {name: tensor + 0.01 for name, tensor in safetensors.torch.load_file(weights).items()}
    safetensors.torch.save_file(retrained, weights)  # another text encoder, same path, same config
    with pytest.raises(
        ValueError,
        match=rf"input text_encoder_dir text_encoder weights {re.escape(str(weights))} "
        rf"has other content .*sha256 {hashlib.sha256(original).hexdigest()[:12]} "
        rf"then, {file_digest(weights)[:12]} now",
    ):
        train_unet(config, tmp_path / "run", progress=False)
    weights.write_bytes(original)
    assert train_unet(config, tmp_path / "run", progress=False) == straight
    assert file_digest(tmp_path / "run" / FINAL_WEIGHTS) == file_digest(tmp_path / "straight" / FINAL_WEIGHTS)


def test_fine_tune_resume_refuses_a_changed_init_from_description(stages, tmp_path):
    start = tmp_path / "start"
    shutil.copytree(stages["root"] / "vae", start)
    config = dataclasses.replace(stages["vae_config"], steps=2, checkpoint_every=1, init_from=str(start))
    train_vae(dataclasses.replace(config, steps=1), tmp_path / "tune", progress=False)
    info = start / FINAL_INFO
    info.write_text(json.dumps(json.loads(info.read_text())))  # the same fields, written another way
    with pytest.raises(ValueError, match=r"input init_from vae config .*final.json has other content"):
        train_vae(config, tmp_path / "tune", progress=False)


def test_clip_fine_tune_records_both_parts_it_starts_from(stages, tmp_path):
    config = dataclasses.replace(stages["clip_config"], steps=1, init_from=str(stages["root"] / "clip"))
    train_clip(config, tmp_path / "tune", progress=False)
    recorded = read_checkpoint(latest_checkpoint(tmp_path / "tune"))["inputs"]
    assert {name: Path(entry["path"]).name for name, entry in recorded.items()} == {
        "init_from text_encoder weights": FINAL_WEIGHTS,
        "init_from text_encoder config": FINAL_INFO,
        "init_from image_tower weights": "final_image_tower.safetensors",
        "init_from image_tower config": "final_image_tower.json",
    }
    assert all(entry["sha256"] == file_digest(Path(entry["path"])) for entry in recorded.values())


def test_batches_made_by_worker_processes_train_the_same(stages, tmp_path):
    """Two spawned workers make the batches ahead (what a GPU run does); the losses are the
    inline run's, including across a resume, where the stream restarts mid-way (at step 2,
    where a 2-step run's learning rates still match the 4-step run's, as in the test above)."""
    config = unet_config(stages, steps=4)
    inline = train_unet(config, tmp_path / "inline", progress=False)
    train_unet(dataclasses.replace(config, steps=2), tmp_path / "workers", progress=False, data_workers=2)
    assert train_unet(config, tmp_path / "workers", progress=False, data_workers=2) == inline
    # CLIP's make_batch carries the tokenizer to the workers.
    clip_config = stages["clip_config"]
    assert train_clip(clip_config, tmp_path / "clip", progress=False, data_workers=1) == stages["clip_losses"]


def test_unet_refuses_stages_that_do_not_fit(stages, tmp_path):
    with pytest.raises(ValueError, match="holds a trained 'vae', not the 'text_encoder'"):
        load_conditioning(unet_config(stages, text_encoder_dir=str(stages["root"] / "vae")))
    with pytest.raises(ValueError, match="no finished vae"):
        load_conditioning(unet_config(stages, vae_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="context_dim 64 must be the text encoder's width 32"):
        load_conditioning(unet_config(stages, unet=dataclasses.replace(MICRO_UNET, context_dim=64)))


# ---------------------------------------------------------------- config files


def test_config_files_build_nested_configs_and_presets(tmp_path):
    path = tmp_path / "vae.json"
    path.write_text(
        json.dumps(
            {
                "vae": "tiny",
                "data": {"image_size": 32, "holdout": {"shape_colours": [["star", "red"]]}},
                "betas": [0.9, 0.99],
                "lr": 1,
                "steps": 7,
            }
        )
    )
    config = read_config(VAETrainConfig, path)
    assert config.vae == TINY_VAE and config.data.image_size == 32 and config.betas == (0.9, 0.99)
    assert config.data.holdout.shape_colours == (("star", "red"),) and config.lr == 1.0 and config.steps == 7
    for folder in (REPO / "configs", REPO / "configs" / "gpu"):  # the CPU recipe, and the shipped model's
        for name, cls in (("vae", VAETrainConfig), ("clip", CLIPTrainConfig), ("unet", UNetTrainConfig)):
            shipped = read_config(cls, folder / f"train_{name}.json")
            assert config_from_dict(cls, json_fields(shipped)) == shipped  # round trip through plain JSON


@pytest.mark.parametrize(
    "content, message",
    [
        ({"stpes": 3}, r"unknown key\(s\) \['stpes'\] for VAETrainConfig"),
        ({"data": {"image_sise": 32}}, r"data: unknown key\(s\) \['image_sise'\] for DataConfig"),
        ({"steps": "ten"}, "steps: expected an integer, got 'ten'"),
        ({"steps": True}, "steps: expected an integer"),
        ({"lr": "fast"}, "lr: expected a number"),
        ({"betas": [0.9]}, "betas: expected a list of 2 values"),
        ({"vae": "huge"}, r"no VAEConfig preset named 'huge'; known: \['tiny'\]"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"data": {"image_size": 36}}, "not a multiple of the VAE's downsampling factor 8"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_config_file_errors_are_clear(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        read_config(VAETrainConfig, path)


def test_main_train_reports_bad_config_files(tmp_path, capsys):
    (tmp_path / "broken.json").write_text('{"steps": 3,')
    assert main_train(["vae", "--config", str(tmp_path / "broken.json"), "--out", str(tmp_path / "run")]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    assert main_train(["clip", "--config", str(tmp_path / "missing.json"), "--out", str(tmp_path / "run")]) == 2
    assert "missing.json does not exist" in capsys.readouterr().err
    (tmp_path / "typo.json").write_text(json.dumps({"caption_dropuot": 0.2}))
    assert main_train(["unet", "--config", str(tmp_path / "typo.json"), "--out", str(tmp_path / "run")]) == 2
    assert "unknown key(s) ['caption_dropuot'] for UNetTrainConfig" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
