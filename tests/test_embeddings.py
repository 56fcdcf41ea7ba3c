"""Textual-inversion embeddings: reading the three file formats safely, and using them in prompts
as A1111 does (token-id matching, whole chunk slots, emphasis), with diffusers'
load_textual_inversion on the tiny SD1/SD2 pipelines as the reference."""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch
from parity import TOL, max_err
from safetensors.torch import save_file

import diffuse
import diffuse.pipeline
from diffuse.adapters.embeddings import (
    Embedding,
    embeddings_used,
    load_embeddings,
    read_embedding,
)
from diffuse.checkpoints.errors import CheckpointError, UnsafeCheckpointError
from diffuse.hashes import sha256_file
from diffuse.metadata import format_addon_hashes
from diffuse.prompts import encode_prompt_pair, encode_prompts, prompt_chunks

WIDTH = {"sd1": 32, "sd2": 48}  # the tiny text encoders' widths (tests/conftest.py)


def vectors(count: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed)) * 0.2


def write_a1111(path, vecs: torch.Tensor, **extra) -> None:
    """An embedding as A1111's textual_inversion.py saves it."""
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": vecs}, "name": path.stem, **extra}
    torch.save(data, path)


def write_sd_scripts(path, vecs: torch.Tensor) -> None:
    save_file({"emb_params": vecs.contiguous()}, path)


def write_diffusers(path, vecs: torch.Tensor, token: str) -> None:
    save_file({token: vecs.contiguous()}, path)


WRITERS = {
    "a1111": lambda path, vecs: write_a1111(path.with_suffix(".pt"), vecs),
    "sd-scripts": lambda path, vecs: write_sd_scripts(path.with_suffix(".safetensors"), vecs),
    "diffusers": lambda path, vecs: write_diffusers(path.with_suffix(".safetensors"), vecs, path.stem),
}
SUFFIX = {"a1111": ".pt", "sd-scripts": ".safetensors", "diffusers": ".safetensors"}


# ---------------------------------------------------------------- reading


@pytest.mark.parametrize("fmt", list(WRITERS))
@pytest.mark.parametrize("count", [1, 3])
def test_each_format_reads_its_vectors(tmp_path, fmt, count):
    vecs = vectors(count, 32, seed=count)
    WRITERS[fmt](tmp_path / "mytok", vecs)
    path = (tmp_path / "mytok").with_suffix(SUFFIX[fmt])
    embedding = read_embedding(path)
    assert embedding.name == "mytok" and embedding.path == path
    assert (embedding.count, embedding.width) == (count, 32)
    assert torch.equal(embedding.vectors, vecs)
    assert embedding.sha256 == sha256_file(path) and embedding.short_hash == embedding.sha256[:12]


def test_format_comes_from_the_bytes_not_the_name(tmp_path):
    vecs = vectors(2, 32, seed=1)
    write_sd_scripts(tmp_path / "x.safetensors", vecs)
    os.rename(tmp_path / "x.safetensors", tmp_path / "renamed.pt")
    write_a1111(tmp_path / "y.pt", vecs)
    os.rename(tmp_path / "y.pt", tmp_path / "also.safetensors")
    assert torch.equal(read_embedding(tmp_path / "renamed.pt").vectors, vecs)
    assert torch.equal(read_embedding(tmp_path / "also.safetensors").vectors, vecs)


def test_a1111_fields_are_kept_for_the_api(tmp_path):
    path = tmp_path / "style.pt"
    write_a1111(path, vectors(4, 32, seed=2), step=500, sd_checkpoint="a1b2c3d4e5", sd_checkpoint_name="tiny")
    embedding = read_embedding(path)
    assert embedding.api_entry() == {
        "step": 500,
        "sd_checkpoint": "a1b2c3d4e5",
        "sd_checkpoint_name": "tiny",
        "shape": 32,
        "vectors": 4,
    }
    diffusers_file = tmp_path / "plain.safetensors"
    write_diffusers(diffusers_file, vectors(1, 32, seed=3)[0], "<plain>")  # a [D] token vector
    assert read_embedding(diffusers_file).api_entry() == {
        "step": None,
        "sd_checkpoint": None,
        "sd_checkpoint_name": None,
        "shape": 32,
        "vectors": 1,
    }


def test_a_pickled_parameter_dict_is_read_without_torch_nn(tmp_path):
    """torch 1.11 pickled string_to_param as a ParameterDict module; an inert stand-in takes its place."""
    vecs = vectors(2, 32, seed=4)
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vecs.clone())})
    torch.save({"string_to_param": params, "name": "old", "step": 3}, tmp_path / "old.pt")
    embedding = read_embedding(tmp_path / "old.pt")
    assert torch.equal(embedding.vectors, vecs) and not embedding.vectors.requires_grad
    assert embedding.step == 3


class RunsShell:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_unsafe_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": RunsShell(f"touch {marker}")}}, path)
    with pytest.raises(UnsafeCheckpointError, match="evil.pt: refused") as caught:
        read_embedding(path)
    assert "\n" not in str(caught.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "contents, message",
    [
        ({"string_to_param": {"*": torch.zeros(2, 32), "#": torch.zeros(2, 32)}}, "exactly one tensor"),
        ({"clip_l": torch.zeros(2, 32), "clip_g": torch.zeros(2, 48)}, "SDXL embedding"),
        ({"a": torch.zeros(2, 32), "b": torch.zeros(2, 32)}, "not a textual-inversion embedding"),
        ({"emb_params": torch.zeros(2, 3, 32)}, r"expected floats \[n, D\]"),
        ({"emb_params": torch.zeros(2, 32, dtype=torch.long)}, "expected floats"),
        ({"emb_params": torch.zeros(76, 32)}, "76 vectors; a prompt chunk holds 75"),
        ({"emb_params": torch.tensor([[0.0, float("nan")], [float("inf"), 1.0]])}, "2 non-finite"),
        ({"string_to_param": {"*": "text"}}, "not a tensor"),
    ],
)
def test_bad_files_are_refused_in_one_line(tmp_path, contents, message):
    path = tmp_path / "bad.pt"
    torch.save(contents, path)
    with pytest.raises(CheckpointError, match=message) as caught:
        read_embedding(path)
    assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)


def test_load_embeddings_splits_loaded_and_skipped(tmp_path):
    main, other = tmp_path / "main", tmp_path / "other"
    (main / "sub").mkdir(parents=True)
    other.mkdir()
    write_a1111(main / "good.pt", vectors(2, 32, seed=5))
    write_sd_scripts(main / "sub" / "deep.safetensors", vectors(1, 32, seed=6))
    write_sd_scripts(main / "wide.safetensors", vectors(1, 48, seed=7))
    write_sd_scripts(other / "good.safetensors", vectors(1, 32, seed=8))
    (main / "broken.pt").write_bytes(b"\x80\x04 not really a pickle")
    (main / "empty.pt").write_bytes(b"")  # left out, as A1111 does
    (main / "notes.txt").write_text("mytok")
    loaded, skipped = load_embeddings([main], width=32)
    assert sorted(loaded) == ["deep", "good"]
    assert loaded["good"].path == main / "good.pt"
    assert sorted(skipped) == ["broken", "wide"]
    assert "48 wide" in skipped["wide"] and "takes 32" in skipped["wide"]
    assert skipped["broken"].startswith(str(main / "broken.pt"))
    loaded, skipped = load_embeddings([other, main], width=32)
    assert loaded["good"].path == other / "good.safetensors"
    assert "taken by another file" in skipped["good"]
    with pytest.raises(CheckpointError, match="not a folder"):
        load_embeddings([tmp_path / "missing"], width=32)


# ---------------------------------------------------------------- matching and packing


def embedding(name: str, count: int, width: int = 32, seed: int = 0) -> Embedding:
    return Embedding(name=name, vectors=vectors(count, width, seed), path=None, sha256="0" * 64)


@pytest.fixture(scope="module")
def tokenizer():
    return diffuse.tokenizer.CLIPTokenizer.from_bpe_gz()


@pytest.fixture(scope="module")
def encoder():
    from diffuse.models.clip import CLIPTextEncoder
    from diffuse.models.configs import TextEncoderConfig

    torch.manual_seed(0)
    model = CLIPTextEncoder(TextEncoderConfig(width=32, layers=2, heads=4, mlp_width=64)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_name_matches_on_token_ids_whatever_the_case_or_punctuation(tokenizer):
    embeddings = {"MyTok": embedding("MyTok", 3)}
    (chunk,) = prompt_chunks(tokenizer, "a mytok, cat", embeddings)
    a, comma, cat = tokenizer.encode("a , cat")
    assert chunk.ids[:7] == (49406, a, 0, 0, 0, comma, cat)
    assert chunk.fixes == ((2, "MyTok"),)
    for prompt in ["a MYTOK, cat", "a MyTok , cat"]:
        assert prompt_chunks(tokenizer, prompt, embeddings) == [chunk]
    assert embeddings_used(tokenizer, ["mytokx cat", "a cat"], embeddings) == []  # "mytokx" is other tokens


def test_longest_name_wins(tokenizer):
    embeddings = {"my tok": embedding("my tok", 1), "my": embedding("my", 2)}
    (chunk,) = prompt_chunks(tokenizer, "my tok my", embeddings)
    assert chunk.fixes == ((1, "my tok"), (2, "my"))
    assert chunk.ids[1:5] == (0, 0, 0, 49407)


def test_vectors_that_do_not_fit_start_a_new_chunk(tokenizer):
    embeddings = {"mytok": embedding("mytok", 3)}
    fits = prompt_chunks(tokenizer, " ".join(["cat"] * 72) + " mytok", embeddings)
    assert len(fits) == 1 and fits[0].fixes == ((73, "mytok"),) and fits[0].ids[73:] == (0, 0, 0, 49407)
    first, second = prompt_chunks(tokenizer, " ".join(["cat"] * 73) + " mytok dog", embeddings)
    assert first.fixes == () and first.ids[74:] == (49407,) * 3
    assert second.fixes == ((1, "mytok"),) and second.ids[1:5] == (0, 0, 0, tokenizer.encode("dog")[0])


def test_a_comma_break_carries_the_vectors_with_it(tokenizer):
    embeddings = {"mytok": embedding("mytok", 3)}
    prompt = " ".join(["cat"] * 70) + ", mytok dog bird"
    first, second = prompt_chunks(tokenizer, prompt, embeddings)
    assert first.fixes == () and len([i for i in first.ids if i != 49407]) == 72  # BOS, 70 cats, comma
    assert second.fixes == ((1, "mytok"),)
    assert second.ids[1:6] == (0, 0, 0, *tokenizer.encode("dog bird"))


def test_break_and_emphasis_apply_to_the_slots(tokenizer):
    embeddings = {"mytok": embedding("mytok", 2)}
    first, second = prompt_chunks(tokenizer, "cat BREAK (mytok:1.5) [mytok]", embeddings)
    assert first.fixes == ()
    assert second.fixes == ((1, "mytok"), (3, "mytok"))
    assert second.weights[1:5] == (1.5, 1.5, 1 / 1.1, 1 / 1.1)


def test_more_vectors_than_a_chunk_cannot_be_placed(tokenizer):
    with pytest.raises(ValueError, match="80 vectors; a prompt chunk holds 75"):
        prompt_chunks(tokenizer, "mytok", {"mytok": embedding("mytok", 80)})


def test_without_embeddings_nothing_changes_bit_for_bit(tokenizer, encoder):
    prompts = ["a (red:1.2) car, BREAK blurry", "a cat"]
    with torch.no_grad():
        plain = encode_prompts(tokenizer, encoder, prompts)
        unused = {"mytok": embedding("mytok", 3)}
        for given in (None, {}, unused):
            assert torch.equal(encode_prompts(tokenizer, encoder, prompts, embeddings=given), plain)
            pair = encode_prompt_pair(tokenizer, encoder, prompts, prompts[::-1], embeddings=given)
            assert torch.equal(pair[0], plain) and torch.equal(pair[1], plain.flip(0))


def test_vectors_replace_the_token_vectors_then_emphasis_weights_them(tokenizer, encoder):
    emb = embedding("mytok", 3, seed=9)
    with torch.no_grad():
        got = encode_prompts(tokenizer, encoder, ["a (mytok:1.5) cat"], embeddings={"mytok": emb})[0]
        ids = tokenizer(["a x x x cat"])
        tokens = encoder.embeddings.token_embedding(ids)
        tokens[0, 2:5] = emb.vectors
        plain = encoder(ids, token_embeddings=tokens)[0]
    weights = torch.tensor([1.0, 1.0, 1.5, 1.5, 1.5] + [1.0] * 72)
    scaled = plain * weights[:, None]
    expected = scaled * (plain.mean() / scaled.mean())
    assert (got - expected).abs().max().item() <= 1e-6


def test_a_width_mismatch_is_refused_at_encoding(tokenizer, encoder):
    with pytest.raises(ValueError, match="'wide' is 48 wide; this text encoder's tokens are 32 wide"):
        encode_prompts(tokenizer, encoder, ["a wide cat"], embeddings={"wide": embedding("wide", 1, width=48)})


def test_hashes_for_the_infotext(tokenizer):
    embeddings = {
        "a:b,c": Embedding("a:b,c", vectors(1, 32, 0), None, "0123456789abcdef" * 4),
        "mytok": Embedding("mytok", vectors(2, 32, 1), None, "fedcba9876543210" * 4),
    }
    used = embeddings_used(tokenizer, ["mytok cat", "a cat", "a:b,c and mytok"], embeddings)
    assert used == ["mytok", "a:b,c"]
    assert (
        format_addon_hashes([(n, embeddings[n].short_hash) for n in used]) == "mytok: fedcba987654, abc: 0123456789ab"
    )


# ---------------------------------------------------------------- parity with diffusers


@pytest.fixture(scope="module")
def twins(reference_folders):
    """Per style: diffuse's pipeline and a fresh diffusers one of the same folder (this module adds
    tokens to the diffusers tokenizer, so it must not share the session's reference pipelines)."""
    from diffusers import StableDiffusionPipeline

    return {
        style: (
            diffuse.load_pipeline(folder, dtype="float32"),
            StableDiffusionPipeline.from_pretrained(folder, safety_checker=None).to(torch.float32),
        )
        for style, folder in reference_folders.items()
    }


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_context_matches_diffusers_load_textual_inversion(tmp_path, twins, style):
    ours, theirs = twins[style]
    width = WIDTH[style]
    files = {}
    for k, (fmt, writer) in enumerate(WRITERS.items()):
        name = f"emb{style}{fmt.replace('-', '')}"
        writer(tmp_path / name, vectors(k + 2, width, seed=10 + k))  # 2, 3 and 4 vectors
        files[name] = (tmp_path / name).with_suffix(SUFFIX[fmt])
    loaded, skipped = load_embeddings([tmp_path], width=width)
    assert sorted(loaded) == sorted(files) and skipped == {}
    for name, path in files.items():
        theirs.load_textual_inversion(str(path), token=name)
    names = sorted(files)
    prompts = [f"a photo of {names[0]} riding a horse", f"{names[1]} and {names[2]}, in the rain", "a plain cat"]
    with torch.no_grad():
        got = encode_prompts(ours.tokenizer, ours.text_encoder, prompts, embeddings=loaded)
        expected, _ = theirs.encode_prompt(prompts, "cpu", 1, False)
    assert max_err(got, expected) <= TOL


def test_images_match_diffusers_with_embeddings_in_both_prompts(tmp_path, twins, monkeypatch):
    ours, _ = twins["sd1"]
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    folder_pipe = twins["sd1"][1]
    theirs = StableDiffusionPipeline(
        **{**folder_pipe.components, "scheduler": EulerDiscreteScheduler.from_config(folder_pipe.scheduler.config)}
    )
    write_a1111(tmp_path / "shapeimg.pt", vectors(3, 32, seed=20))
    write_sd_scripts(tmp_path / "blurimg.safetensors", vectors(2, 32, seed=21))
    loaded, _ = load_embeddings([tmp_path], width=32)
    for name, embedding_ in loaded.items():
        theirs.load_textual_inversion(str(embedding_.path), token=name)
    # The pipeline's loader wiring comes later; here its encoder call is given the embeddings.
    monkeypatch.setattr(
        diffuse.pipeline, "encode_prompt_pair", functools.partial(encode_prompt_pair, embeddings=loaded)
    )
    prompt, negative = "a red shapeimg above a blue square", "blurimg, green"
    settings = dict(guidance_scale=7.5, width=32, height=32)
    expected = theirs(
        prompt, negative_prompt=negative, num_inference_steps=10, generator=torch.Generator().manual_seed(7), **settings
    ).images
    result = ours.txt2img(prompt, negative_prompt=negative, steps=10, sampler="Euler", seed=7, **settings)
    diff = np.abs(np.asarray(result.images[0], np.int16) - np.asarray(expected[0], np.int16)).max()
    assert diff <= 2, f"max pixel difference {diff}/255"
    monkeypatch.undo()  # the same request without the embeddings draws something else
    plain = ours.txt2img(prompt, negative_prompt=negative, steps=10, sampler="Euler", seed=7, **settings)
    assert np.abs(np.asarray(plain.images[0], np.int16) - np.asarray(expected[0], np.int16)).max() > 2
