"""The `diffuse` command line."""

from __future__ import annotations

import argparse
import sys
import time

import torch


def _count(module: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.1f}M"


def info(args: argparse.Namespace) -> int:
    """Load a checkpoint, print what was detected, and run each network once on a small input."""
    from .loader import load_pipeline

    start = time.perf_counter()
    pipe = load_pipeline(args.model, dtype=args.dtype)
    cfg = pipe.config
    print(f"{pipe.source}: loaded in {time.perf_counter() - start:.1f} s ({pipe.dtype})")
    print(f"  text encoder  {_count(pipe.text_encoder):>7}  width {cfg.text_encoder.width}, "
          f"{cfg.text_encoder.layers} layers, {cfg.text_encoder.activation}, pad id {cfg.pad_token_id}")
    print(f"  unet          {_count(pipe.unet):>7}  {cfg.unet.in_channels} in-channels, model channels "
          f"{cfg.unet.model_channels} x {cfg.unet.channel_mult}, context {cfg.unet.context_dim}, {cfg.prediction_type}")
    print(f"  vae           {_count(pipe.vae):>7}  {cfg.vae.latent_channels} latent channels, "
          f"f={cfg.vae.downsample_factor}, scale {cfg.vae.scaling_factor}")

    start = time.perf_counter()
    with torch.no_grad():
        context = pipe.encode_prompt(args.prompt)
        side = 64 // cfg.vae.downsample_factor
        latents = torch.randn(1, cfg.unet.in_channels, side, side, generator=torch.Generator().manual_seed(0))
        noise = pipe.unet(latents.to(pipe.dtype), torch.tensor([500]), context)
        image = pipe.vae.decode(latents[:, : cfg.vae.latent_channels].to(pipe.dtype))
    print(f"  one pass: context {tuple(context.shape)}, noise prediction {tuple(noise.shape)}, "
          f"decoded image {tuple(image.shape)} in {time.perf_counter() - start:.2f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffuse", description="Stable Diffusion from its parts.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("info", help="load a checkpoint and report its architecture")
    p.add_argument("model", help="a diffusers folder, or a single-file .safetensors/.ckpt checkpoint")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    p.add_argument("--prompt", default="a photo of a cat")
    p.set_defaults(run=info)
    args = parser.parse_args(argv)

    from .checkpoints.errors import CheckpointError

    try:
        return args.run(args)
    except (CheckpointError, ValueError) as e:
        print(f"diffuse: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
