"""Shared fixtures: tiny SD1- and SD2-style reference pipelines built with diffusers
and transformers from random weights, saved as diffusers folders.

The references are built here, independently of diffuse's own code, so a parity
test compares two implementations rather than one with itself.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from diffuse.models.configs import UNetConfig

# The runtime tests' UNet: two levels, two heads each, in a few milliseconds.
TINY_RUNTIME_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2), heads=(2, 2), context_dim=16, norm_groups=8)


def clip_bpe_path() -> Path:
    spec = importlib.util.find_spec("clip")
    assert spec is not None, "the openai-clip package (CLIP's BPE vocabulary) is not installed"
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


def bytes_to_unicode() -> dict[int, str]:
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def write_clip_vocab(out: Path) -> Path:
    """vocab.json + merges.txt as OpenAI's CLIP defines them, for transformers' CLIPTokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    units = list(bytes_to_unicode().values())
    vocab = units + [u + "</w>" for u in units] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def clip_vocab_dir(tmp_path_factory) -> Path:
    return write_clip_vocab(tmp_path_factory.mktemp("clip_vocab"))


def reference_tokenizer(vocab_dir: Path, style: str):
    from transformers import CLIPTokenizer

    pad = "<|endoftext|>" if style == "sd1" else "!"
    return CLIPTokenizer(
        str(vocab_dir / "vocab.json"), str(vocab_dir / "merges.txt"), pad_token=pad, model_max_length=77
    )


# Tiny but structurally complete: three levels, attention on two of them, skip
# connections that change channel counts, and for SD2 linear projections,
# per-level head counts and two transformer layers per block.
TINY_UNET = {
    "sd1": dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4,
        cross_attention_dim=32,
        use_linear_projection=False,
    ),
    "sd2": dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=48,
        use_linear_projection=True,
        transformer_layers_per_block=2,
    ),
}

TINY_TEXT = {
    "sd1": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, hidden_act="quick_gelu"
    ),
    "sd2": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, hidden_act="gelu"),
}


def build_reference(style: str, vocab_dir: Path, seed: int = 0, in_channels: int = 4):
    """A diffusers StableDiffusionPipeline of tiny random components."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=2,
        norm_num_groups=32,
        **TINY_UNET[style],
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=2,
        norm_num_groups=32,
        sample_size=32,
    )
    text_config = CLIPTextConfig(
        vocab_size=49408,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407 if style == "sd1" else 0,
        **TINY_TEXT[style],
    )
    text_encoder = CLIPTextModel(text_config)
    # Random init leaves some parameters at constants (norms at 1/0, zeroed output
    # convs); perturb everything so a wrongly mapped tensor cannot hide.
    with torch.no_grad():
        for module in (unet, vae, text_encoder):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon" if style == "sd1" else "v_prediction",
    )
    for module in (unet, vae, text_encoder):
        module.eval()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=reference_tokenizer(vocab_dir, style),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.fixture(scope="session", params=["sd1", "sd2"])
def style(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def reference_folders(tmp_path_factory, clip_vocab_dir) -> dict[str, Path]:
    """Both tiny reference pipelines, saved once per session as diffusers folders."""
    folders = {}
    for name in ("sd1", "sd2"):
        pipe = build_reference(name, clip_vocab_dir)
        folder = tmp_path_factory.mktemp(f"tiny_{name}")
        pipe.save_pretrained(folder, safe_serialization=True)
        folders[name] = folder
    return folders


@pytest.fixture(scope="session")
def reference_pipes(reference_folders):
    """The saved reference pipelines reloaded by diffusers, in eval mode (fp32)."""
    from diffusers import StableDiffusionPipeline

    return {
        name: StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
        for name, folder in reference_folders.items()
    }


@pytest.fixture(scope="session")
def sdxl_folder(tmp_path_factory, clip_vocab_dir) -> Path:
    """The tiny SDXL base (test_sdxl_pipeline's reference), saved once per session for every module that reads it."""
    from test_sdxl_pipeline import build_sdxl_reference

    folder = tmp_path_factory.mktemp("tiny_sdxl")
    build_sdxl_reference(clip_vocab_dir).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def refiner_folder(tmp_path_factory, clip_vocab_dir) -> Path:
    """The tiny SDXL refiner (test_sdxl_refiner's reference), saved once per session."""
    from test_sdxl_refiner import build_refiner_reference

    folder = tmp_path_factory.mktemp("tiny_sdxl_refiner")
    build_refiner_reference(clip_vocab_dir).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture
def one_thread():
    """Train in this process with the workers' thread count, leaving the global RNGs as found."""
    from diffuse.train.state import capture_rng_state, restore_rng_state

    threads, rng = torch.get_num_threads(), capture_rng_state()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    restore_rng_state(rng)


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """diffuse's command line on args: its exit code, stdout and stderr (this command's only: a
    fixture may have made an image inside the test)."""
    from diffuse.cli import main

    capsys.readouterr()
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: for refusals that must come before loading."""
    import diffuse.loader

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(diffuse.loader, "load_pipeline", refuse)
