"""`diffuse train lora` / `train embedding` on the tiny SD1/SD2 models of tests/conftest.py.

The written add-ons must be read by diffuse (read_lora, read_embedding) and by diffusers
(load_lora_weights, load_textual_inversion), and change diffusers' outputs as they change ours;
training must change the loss, resume bit for bit, and refuse a bad data folder in one line.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from parity import TOL, max_err
from PIL import Image

import diffuse
from diffuse.adapters import LoraMerge, lora_from_state_dict, read_lora
from diffuse.adapters.embeddings import read_embedding
from diffuse.prompts import encode_prompts
from diffuse.train.__main__ import main_train
from diffuse.train.loop import BatchRandom
from diffuse.train.stages.embedding import EmbeddingTrainConfig, train_embedding
from diffuse.train.stages.frozen_base import diffusion_loss, load_base
from diffuse.train.stages.lora import LoraTrainConfig, build_network, train_lora

COLOURS = {"red": (220, 40, 40), "blue": (40, 60, 220), "green": (40, 180, 60)}
PROMPTS = ["a red square", "a blue circle on the left"]


def write_folder(folder, count: int = 4, token: str = "") -> None:
    """`count` images (a coloured block on grey, 40x48 so they are scaled and cropped) with captions."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        name = list(COLOURS)[i % len(COLOURS)]
        image = Image.new("RGB", (40, 48), (128, 128, 128))
        image.paste(COLOURS[name], (4 + 4 * i, 8, 24 + 4 * i, 30))
        image.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a {name} {token or 'square'} number {i}\n", encoding="utf-8")


@pytest.fixture
def data(tmp_path):
    write_folder(tmp_path / "data")
    return tmp_path / "data"


def lora_config(folder, data, **changes) -> LoraTrainConfig:
    # A constant rate, so a run stopped at step 2 and taken on to 4 follows the same schedule as one to 4.
    settings = dict(model=str(folder), data=str(data), steps=4, batch_size=2, lr=2e-2, warmup_steps=0)
    settings["final_lr_fraction"] = 1.0
    return LoraTrainConfig(**{**settings, "checkpoint_every": 2, "train_text_encoder": True, **changes})


def embedding_config(folder, data, **changes) -> EmbeddingTrainConfig:
    settings = dict(model=str(folder), data=str(data), token="shapetok", vectors=2, init_text="square thing")
    settings |= {"steps": 4, "batch_size": 2, "lr": 5e-2, "warmup_steps": 0, "final_lr_fraction": 1.0}
    return EmbeddingTrainConfig(**{**settings, **changes})


def unet_inputs(pipe, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    size = pipe.config.sample_size
    x = torch.randn(2, 4, size, size, generator=gen)
    context = torch.randn(2, 77, pipe.config.unet.context_dim, generator=gen)
    return x, torch.tensor([10, 700]), context


@torch.no_grad()
def unet_outputs(ours, theirs) -> tuple[torch.Tensor, torch.Tensor]:
    x, t, context = unet_inputs(ours)
    return ours.unet(x, t, context), theirs.unet(x, t, encoder_hidden_states=context).sample


@torch.no_grad()
def contexts(ours, theirs) -> tuple[torch.Tensor, torch.Tensor]:
    return encode_prompts(ours.tokenizer, ours.text_encoder, PROMPTS), theirs.encode_prompt(PROMPTS, "cpu", 1, False)[0]


def twins(folder):
    from diffusers import StableDiffusionPipeline

    return diffuse.load_pipeline(folder, dtype="float32"), StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None
    )


# ---------------------------------------------------------------- LoRA


def test_lora_is_read_by_diffuse_and_diffusers_alike(tmp_path, data, reference_folders, style, one_thread):
    folder = reference_folders[style]
    path = train_lora(lora_config(folder, data), tmp_path / "run", progress=False)
    lora = read_lora(path)
    assert path.name == "run.safetensors" and lora.alias == "run"
    assert lora.base == ("SD 1.x" if style == "sd1" else "SD 2.x")
    assert {p.network for p in lora.patches} == {"unet", "text_encoder"}
    assert lora.metadata["ss_network_dim"] == "4" and lora.metadata["ss_network_alpha"] == "4.0"

    ours, theirs = twins(folder)
    plain_unet, _ = unet_outputs(ours, theirs)
    plain_context, _ = contexts(ours, theirs)
    LoraMerge({"unet": ours.unet, "text_encoder": ours.text_encoder}).apply([(lora, 1.0, 1.0)])
    theirs.load_lora_weights(str(path.parent), weight_name=path.name)
    got, expected = unet_outputs(ours, theirs)
    assert max_err(got, expected) <= TOL
    assert max_err(got, plain_unet) > 100 * TOL  # the LoRA changed both, the same way
    got, expected = contexts(ours, theirs)
    assert max_err(got, expected) <= TOL
    assert max_err(got, plain_context) > 100 * TOL


def test_training_hooks_compute_what_the_merged_file_computes(tmp_path, data, reference_folders, style):
    """The bypass the loop trains through is the LoRA the file describes, module for module."""
    config = lora_config(reference_folders[style], data)
    base = load_base(config.model, None)
    network = build_network(config, base)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    x, t, context = unet_inputs(base.pipe)
    with torch.no_grad():
        hooked = network(x, t, context)
        hooked_context = encode_prompts(base.pipe.tokenizer, base.pipe.text_encoder, PROMPTS)
        network.detach()
        plain = base.pipe.unet(x, t, context)
    ours = diffuse.load_pipeline(config.model, dtype="float32")
    lora = lora_from_state_dict(network.kohya_state(), "hooks")
    LoraMerge({"unet": ours.unet, "text_encoder": ours.text_encoder}).apply([(lora, 1.0, 1.0)])
    with torch.no_grad():
        assert max_err(ours.unet(x, t, context), hooked) <= TOL
        assert max_err(encode_prompts(ours.tokenizer, ours.text_encoder, PROMPTS), hooked_context) <= TOL
    assert max_err(hooked, plain) > 100 * TOL


def fixed_loss(pipe_base, data_folder, seed: int = 0) -> float:
    from diffuse.train.captioned_folder import CaptionedFolder

    batch = CaptionedFolder(data_folder, pipe_base.image_size).batch(0, 4)
    random = BatchRandom(torch.Generator().manual_seed(seed), 0, 4, 4, torch.device("cpu"))
    with torch.no_grad():
        return diffusion_loss(pipe_base, pipe_base.pipe.unet, batch, random, 0.0, None)[0].item()


def test_a_few_steps_change_the_loss(tmp_path, data, reference_folders, one_thread):
    config = lora_config(reference_folders["sd1"], data, train_text_encoder=False, steps=6)
    path = train_lora(config, tmp_path / "run", progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and all(loss > 0 for loss in losses)
    base = load_base(config.model, None)
    before = [fixed_loss(base, data, seed) for seed in range(3)]
    LoraMerge({"unet": base.pipe.unet}).apply([(read_lora(path), 1.0, 1.0)])
    after = [fixed_loss(base, data, seed) for seed in range(3)]
    assert all(abs(a - b) > 1e-4 * b for a, b in zip(after, before)), (before, after)


def test_lora_resumes_bit_for_bit(tmp_path, data, reference_folders, one_thread):
    config = lora_config(reference_folders["sd2"], data, output_name="same")  # the name is in the metadata
    whole = train_lora(config, tmp_path / "whole", progress=False, resume=False)
    train_lora(dataclasses.replace(config, steps=2), tmp_path / "parts", progress=False)
    parts = train_lora(config, tmp_path / "parts", progress=False)
    assert (tmp_path / "whole" / "log.jsonl").read_bytes() == (tmp_path / "parts" / "log.jsonl").read_bytes()
    assert whole.read_bytes() == parts.read_bytes()


def test_lora_resume_refuses_other_data(tmp_path, data, reference_folders, one_thread):
    config = lora_config(reference_folders["sd1"], data, steps=2)
    train_lora(config, tmp_path / "run", progress=False)
    (data / "img0.txt").write_text("a red square, changed", encoding="utf-8")
    with pytest.raises(ValueError, match="img0.txt"):
        train_lora(lora_config(reference_folders["sd1"], data), tmp_path / "run", progress=False)


# ---------------------------------------------------------------- embeddings


def test_embedding_is_read_by_diffuse_and_diffusers_alike(tmp_path, reference_folders, style, one_thread):
    folder = reference_folders[style]
    write_folder(tmp_path / "data", token="shapetok")
    config = embedding_config(folder, tmp_path / "data")
    path = train_embedding(config, tmp_path / "run", progress=False)
    embedding = read_embedding(path)
    assert path.name == "shapetok.safetensors" and embedding.name == "shapetok" and embedding.count == 2

    ours, theirs = twins(folder)
    table = ours.text_encoder.embeddings.token_embedding.weight
    start = table[torch.tensor(ours.tokenizer.encode("square thing"))]
    assert not torch.allclose(embedding.vectors, start)  # trained away from the init text's vectors
    theirs.load_textual_inversion(str(path), token="shapetok")
    prompts = ["a red shapetok on the left", "shapetok"]
    with torch.no_grad():
        got = encode_prompts(ours.tokenizer, ours.text_encoder, prompts, embeddings={"shapetok": embedding})
        expected = theirs.encode_prompt(prompts, "cpu", 1, False)[0]
    assert max_err(got, expected) <= TOL


def test_embedding_resumes_bit_for_bit(tmp_path, reference_folders, one_thread):
    write_folder(tmp_path / "data", token="[name]")  # A1111's template placeholder
    folder, data = reference_folders["sd1"], tmp_path / "data"
    whole = train_embedding(embedding_config(folder, data, checkpoint_every=2), tmp_path / "whole", progress=False)
    train_embedding(embedding_config(folder, data, steps=2, checkpoint_every=2), tmp_path / "parts", progress=False)
    parts = train_embedding(embedding_config(folder, data, checkpoint_every=2), tmp_path / "parts", progress=False)
    assert (tmp_path / "whole" / "log.jsonl").read_bytes() == (tmp_path / "parts" / "log.jsonl").read_bytes()
    assert whole.read_bytes() == parts.read_bytes()


def test_captions_must_name_the_embedding(tmp_path, data, reference_folders):
    with pytest.raises(ValueError, match=r"img0\.txt: the caption does not name the embedding 'shapetok'"):
        train_embedding(embedding_config(reference_folders["sd1"], data), tmp_path / "run", progress=False)


# ---------------------------------------------------------------- bad data, the command


def _break(folder, how: str) -> None:
    if how == "no caption":
        (folder / "img2.txt").unlink()
    elif how == "not an image":
        (folder / "img2.png").write_bytes(b"#!/bin/sh\necho hello\n")
    elif how == "empty caption":
        (folder / "img2.txt").write_text("  \n", encoding="utf-8")
    elif how == "binary caption":
        (folder / "img2.txt").write_bytes(b"\xff\xfe\x00bad")


@pytest.mark.parametrize(
    "how, message",
    [
        ("no caption", r"img2\.png: no caption beside it \(img2\.txt is missing\)"),
        ("not an image", r"img2\.png: not a readable image"),
        ("empty caption", r"img2\.txt: the caption is empty"),
        ("binary caption", r"img2\.txt: the caption is not UTF-8 text"),
    ],
)
def test_a_bad_data_folder_is_one_clear_line(tmp_path, data, reference_folders, how, message):
    _break(data, how)
    with pytest.raises(ValueError, match=message) as error:
        train_lora(lora_config(reference_folders["sd1"], data), tmp_path / "run", progress=False)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_folder_without_images_is_refused(tmp_path, reference_folders):
    (tmp_path / "empty").mkdir()
    for data, message in ((tmp_path / "empty", "holds no images"), (tmp_path / "nowhere", "is not a folder")):
        with pytest.raises(ValueError, match=message):
            train_lora(lora_config(reference_folders["sd1"], data), tmp_path / "run", progress=False)


def test_the_command_trains_and_names_the_file(tmp_path, data, reference_folders, capsys, one_thread):
    folder = str(reference_folders["sd1"])
    argv = ["lora", "--model", folder, "--data", str(data), "--out", str(tmp_path / "cli"), "--steps", "1"]
    assert main_train([*argv, "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli" / "cli.safetensors")
    assert read_lora(tmp_path / "cli" / "cli.safetensors").metadata["ss_steps"] == "1"
    assert main_train(["lora", "--model", folder, "--data", str(tmp_path / "nowhere"), "--out", "x"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main_train([*argv, "--token", "x"])  # an embedding's option
    assert "--token does not apply to the lora stage" in capsys.readouterr().err
