"""Random weights of the full Stable Diffusion 1.5 architecture, built once and cached on disk.

No model hub is reachable here, so the benchmarks time the real architecture with
random weights: the cost of a network does not depend on its weights' values. The
folder is a diffusers folder (fp32 safetensors, about 4.1 GB), which both diffuse and
diffusers load, so both time the very same weights. It is written to a temporary
folder and renamed into place, so an interrupted build never leaves a half folder.

    .venv/bin/python bench/sd15.py        # builds bench/cache/sd15-random if missing
"""

from __future__ import annotations

import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
CACHE = BENCH / "cache"
FOLDER = CACHE / "sd15-random"

sys.path.insert(0, str(BENCH.parent / "tests"))
warnings.filterwarnings("ignore")


def sd15_folder(seed: int = 0) -> Path:
    """The cached folder, built first if missing."""
    if (FOLDER / "model_index.json").is_file():
        return FOLDER
    import conftest  # the CLIP vocabulary writer the tests use
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    start = time.perf_counter()
    print(f"building random SD1.5 weights into {FOLDER} (once) ...", file=sys.stderr)
    torch.manual_seed(seed)
    # diffusers' defaults are SD1.x's UNet except these three.
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            hidden_act="quick_gelu",
            projection_dim=768,
        )
    )
    perturb(unet, vae, text_encoder)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    CACHE.mkdir(parents=True, exist_ok=True)
    vocab = conftest.write_clip_vocab(CACHE / "clip-vocab")
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=conftest.reference_tokenizer(vocab, "sd1"),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    save_into(pipe, FOLDER)
    print(f"built in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return FOLDER


def perturb(*modules: torch.nn.Module) -> None:
    """Random init leaves zeroed output convolutions: perturb every weight, so no activation (and no
    image compared between dtypes) is flat."""
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.02)


def save_into(pipe, folder: Path) -> None:
    """A diffusers pipeline saved as `folder`, written beside it first so a build cut short leaves none."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    pipe.save_pretrained(partial, safe_serialization=True)
    partial.rename(folder)


if __name__ == "__main__":
    print(sd15_folder())
