"""Add-ons through the public API and the command line, on the tiny SD1 reference model: a random
kohya LoRA and a random embedding in temporary folders, named in prompts."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import diffuse
from diffuse.adapters.library import AddonError, AddonLibrary, addnet_hash
from diffuse.cli import main
from diffuse.metadata import parse_infotext, read_parameters

FAST = {"steps": 2, "seed": 3, "sampler": "Euler"}


def kohya_lora(reference, rank: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random kohya LoRA on the reference's attention projections, UNet and text encoder both."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for prefix, network in (("lora_unet", reference.unet), ("lora_te", reference.text_encoder)):
        for name, module in network.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(("to_q", "to_v", "q_proj", "v_proj")):
                key = f"{prefix}_{name.replace('.', '_')}"
                state[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=generator)
                state[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=generator)
                state[f"{key}.alpha"] = torch.tensor(float(rank))
    return state


@pytest.fixture(scope="module")
def folders(tmp_path_factory, reference_folders, reference_pipes) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("addons")
    loras, embeddings = root / "loras", root / "embeddings"
    (loras / "styles").mkdir(parents=True)
    embeddings.mkdir()
    save_file(kohya_lora(reference_pipes["sd1"]), loras / "styles" / "detail.safetensors", {"ss_output_name": "fine"})
    width = reference_pipes["sd1"].text_encoder.config.hidden_size
    generator = torch.Generator().manual_seed(1)
    save_file({"emb_params": torch.randn(2, width, generator=generator) * 3}, embeddings / "shiny.safetensors")
    return {"model": reference_folders["sd1"], "loras": loras, "embeddings": embeddings, "root": root}


@pytest.fixture(scope="module")
def pipes(folders):
    with_addons = diffuse.load_pipeline(
        folders["model"], dtype="float32", lora_dirs=[folders["loras"]], embedding_dirs=[folders["embeddings"]]
    )
    return with_addons, diffuse.load_pipeline(folders["model"], dtype="float32")


def pixels(result) -> np.ndarray:
    return np.stack([np.asarray(image) for image in result.images])


def weights(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value.clone()
        for name in ("unet", "text_encoder")
        for key, value in getattr(pipe, name).state_dict().items()
    }


def test_the_folders_are_listed_with_names_aliases_and_hashes(pipes, folders):
    pipe, _ = pipes
    (entry,) = pipe.loras()
    assert (entry.name, entry.alias) == ("detail", "fine")
    assert entry.short_hash() == addnet_hash(entry.path)[:12]
    assert entry.api_entry()["metadata"] == {"ss_output_name": "fine"}
    loaded, skipped = pipe.embeddings()
    assert list(loaded) == ["shiny"] and skipped == {}


def test_a_lora_tag_changes_the_image_and_without_it_the_image_is_a_fresh_loads_bit_for_bit(pipes):
    pipe, fresh = pipes
    base = fresh.txt2img("a red circle", **FAST)
    tagged = pipe.txt2img("a red circle <lora:detail:1>", **FAST)
    assert np.abs(pixels(tagged).astype(int) - pixels(base)).max() > 0
    by_alias = pipe.txt2img("a red circle <lora:fine:1>", **FAST)  # the same set: kept merged
    np.testing.assert_array_equal(pixels(by_alias), pixels(tagged))
    parsed = parse_infotext(tagged.infotexts[0])
    assert parsed["Prompt"] == "a red circle <lora:detail:1>"  # the tags stay in the recorded prompt
    assert parsed["Lora hashes"] == f"detail: {pipe.loras()[0].short_hash()}"
    after = pipe.txt2img("a red circle", **FAST)
    np.testing.assert_array_equal(pixels(after), pixels(base))
    fresh_weights = weights(fresh)
    assert all(torch.equal(value, fresh_weights[key]) for key, value in weights(pipe).items())
    assert "Lora hashes" not in parse_infotext(after.infotexts[0])


def test_a_lora_in_the_negative_prompt_applies_too(pipes):
    pipe, _ = pipes
    plain = pipe.txt2img("a red circle", negative_prompt="blurry", **FAST)
    tagged = pipe.txt2img("a red circle", negative_prompt="blurry <lora:detail:0.5>", **FAST)
    assert np.abs(pixels(tagged).astype(int) - pixels(plain)).max() > 0
    pipe.restore_weights()


def test_an_unknown_lora_is_one_line_before_any_work(pipes):
    pipe, fresh = pipes
    pipe.restore_weights()
    with pytest.raises(AddonError, match=r"unknown LoRA 'nope': no such file name or alias in .*loras"):
        pipe.txt2img("a cat <lora:nope:1>", **FAST)
    with pytest.raises(ValueError, match="no LoRA folder was given"):
        fresh.txt2img("a cat <lora:detail:1>", **FAST)
    with pytest.raises(AddonError, match="unknown LoRA 'Detail'"):  # names are case-sensitive
        pipe.txt2img("a cat <lora:Detail:1>", **FAST)


def test_an_embedding_named_in_the_prompt_changes_the_image_and_is_recorded(pipes):
    pipe, _ = pipes
    plain = pipe.txt2img("a red circle", **FAST)
    shiny = pipe.txt2img("a shiny red circle", **FAST)
    assert np.abs(pixels(shiny).astype(int) - pixels(plain)).max() > 0
    loaded, _ = pipe.embeddings()
    assert parse_infotext(shiny.infotexts[0])["TI hashes"] == f"shiny: {loaded['shiny'].short_hash}"


def test_refresh_sees_new_files_and_a_missing_folder_is_refused(pipes, folders, tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        diffuse.load_pipeline(folders["model"], dtype="float32", lora_dirs=[tmp_path / "nowhere"])
    library = AddonLibrary([tmp_path])
    assert library.loras == []
    shutil.copy(folders["loras"] / "styles" / "detail.safetensors", tmp_path / "second.safetensors")
    library.refresh()
    assert [entry.name for entry in library.loras] == ["second"]
    assert library.find_lora("second").path == tmp_path / "second.safetensors"


def test_the_cli_applies_a_lora_and_regenerate_finds_it_by_hash(folders, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--model", str(folders["model"]), "--dtype", "float32", "--steps", "2", "--seed", "5"]
    assert (
        main(
            [
                "txt2img",
                "a shiny circle <lora:fine:0.8>",
                *common,
                "--out",
                str(out),
                "--lora-dir",
                str(folders["loras"]),
                "--embeddings-dir",
                str(folders["embeddings"]),
            ]
        )
        == 0
    )
    png = Path(capsys.readouterr().out.split()[-1])
    parsed = parse_infotext(read_parameters(png))
    assert parsed["Lora hashes"].startswith("fine: ") and parsed["TI hashes"].startswith("shiny: ")
    elsewhere = tmp_path / "mine"
    elsewhere.mkdir()
    shutil.copy(folders["loras"] / "styles" / "detail.safetensors", elsewhere / "renamed.safetensors")
    args = ["regenerate", str(png), "--model", str(folders["model"]), "--out", str(tmp_path / "again"), "--check"]
    assert main([*args, "--lora-dir", str(elsewhere), "--embeddings-dir", str(folders["embeddings"])]) == 0
    assert "matches" in capsys.readouterr().out
    assert main([*args, "--embeddings-dir", str(folders["embeddings"])]) == 2
    assert "the PNG's LoRA 'fine'" in capsys.readouterr().err
    assert main([*args, "--lora-dir", str(elsewhere)]) == 2
    assert "the PNG's embedding 'shiny'" in capsys.readouterr().err


def test_the_cli_refuses_a_missing_addon_folder_before_loading(tmp_path, capsys):
    assert main(["txt2img", "a cat", "--lora-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    assert "--lora-dir" in capsys.readouterr().err
