"""The UNet stage's training step in float32 against bf16 autocast (a stage config's
"autocast": "bfloat16"), at the sizes of the CPU recipes: the shipped shapes model's
(configs/) and the emoji world's (configs/emoji/). Median seconds of interleaved rounds
of the same step (forward under the loop's autocast, backward, AdamW), their ratio, the
host's GEMM peaks beside them. Random weights and images: the time does not depend on them.

    .venv/bin/python bench/train_autocast.py [--rounds 5] [--threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import cpu_model, dense_peaks, interleaved, timed  # noqa: E402

from diffuse.models.clip import CLIPTextEncoder  # noqa: E402
from diffuse.models.unet import UNet  # noqa: E402
from diffuse.models.vae import AutoencoderKL  # noqa: E402
from diffuse.tokenizer import CLIPTokenizer  # noqa: E402
from diffuse.train.config_files import read_config  # noqa: E402
from diffuse.train.loop import BatchRandom, forward_precision  # noqa: E402
from diffuse.train.stages.clip import CLIPTrainConfig  # noqa: E402
from diffuse.train.stages.unet import Conditioning, UNetTrainConfig, loss_fn  # noqa: E402
from diffuse.train.stages.vae import VAETrainConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"shapes": ROOT / "configs", "emoji": ROOT / "configs" / "emoji"}
CAPTION = "a small dog face at the top left, left of a red apple"


def step_of(folder: Path, autocast: str | None):
    """One training step of the recipe in `folder` (its UNet, on its VAE and text encoder, at its
    batch size and image size), with the loop's autocast setting."""
    unet_config = read_config(UNetTrainConfig, folder / "train_unet.json")
    config = dataclasses.replace(unet_config, autocast=autocast)
    vae_config = read_config(VAETrainConfig, folder / "train_vae.json").vae
    text_config = read_config(CLIPTrainConfig, folder / "train_clip.json").text_encoder
    torch.manual_seed(0)
    conditioning = Conditioning(
        AutoencoderKL(vae_config).requires_grad_(False),
        1.0,
        CLIPTextEncoder(text_config).requires_grad_(False),
        CLIPTokenizer.from_bpe_gz(),
        {},
    )
    unet = UNet(config.unet).train()
    models = {"unet": unet, "vae": conditioning.vae, "text_encoder": conditioning.text_encoder}
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr)
    size, batch_size = config.data.image_size, config.batch_size
    batch = {"images": torch.rand(batch_size, 3, size, size) * 2 - 1, "captions": [CAPTION] * batch_size}
    generator, device = torch.Generator().manual_seed(0), torch.device("cpu")

    def step() -> None:
        random = BatchRandom(generator, 0, batch_size, batch_size, device)
        with forward_precision(config, device):
            loss, _ = loss_fn(config, conditioning, models, batch, random)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, batch_size, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of one step each (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = dense_peaks()  # no int8 peak: the training step does no int8 arithmetic
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"GEMM peak (4096^3): fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s")
    for name, folder in RECIPES.items():
        steps = {}
        for autocast in (None, "bfloat16"):
            step, batch_size, size = step_of(folder, autocast)
            steps["float32" if autocast is None else "bf16 autocast"] = lambda step=step: timed(step)
        medians = interleaved(steps, args.rounds)
        plain, mixed = medians["float32"], medians["bf16 autocast"]
        print(
            f"{name} recipe UNet step (batch {batch_size}, {size}x{size}): float32 {plain:.3f} s, "
            f"bf16 autocast {mixed:.3f} s: {plain / mixed:.2f}x"
        )


if __name__ == "__main__":
    main()
