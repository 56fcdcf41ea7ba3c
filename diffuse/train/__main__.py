"""Train one stage of diffuse's own model:  python -m diffuse.train {vae,clip,unet} --config FILE --out DIR

Under torchrun (`torchrun --standalone --nproc_per_node=2 -m diffuse.train ...`) the
processes share each global batch. A stage started again with the same --out resumes
from its latest checkpoint; see diffuse.train.components for the files a stage leaves.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

from diffuse.train.config_files import read_config
from diffuse.train.stages.clip import CLIPTrainConfig, train_clip
from diffuse.train.stages.unet import UNetTrainConfig, train_unet
from diffuse.train.stages.vae import VAETrainConfig, train_vae

STAGES: dict[str, tuple[type, Callable[..., list[float]]]] = {
    "vae": (VAETrainConfig, train_vae),
    "clip": (CLIPTrainConfig, train_clip),
    "unet": (UNetTrainConfig, train_unet),
}


def main_train(argv: list[str]) -> int:
    """Parse `argv` (stage first), train that stage; 0 on success, 2 with a message on a bad config."""
    parser = argparse.ArgumentParser(
        prog="diffuse train",
        description="Train one stage of the model, from scratch or, with the config's init_from, from a finished stage.",
    )
    parser.add_argument("stage", choices=sorted(STAGES), help="vae first, then clip, then unet (needs both)")
    parser.add_argument("--config", type=Path, help="JSON file with the stage's config fields (others keep defaults)")
    parser.add_argument("--out", type=Path, required=True, help="the run's folder: checkpoints, log.jsonl, final.*")
    parser.add_argument("--steps", type=int, help="train to this many steps instead of the config's")
    parser.add_argument("--no-resume", action="store_true", help="refuse a folder that already holds checkpoints")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--data-workers",
        type=int,
        default=0,
        metavar="N",
        help="make batches ahead in N processes (for a GPU; the losses do not change; default 0)",
    )
    args = parser.parse_args(argv)
    if args.data_workers < 0:
        parser.error(f"--data-workers must be 0 (inline) or more, not {args.data_workers}")

    config_cls, train_stage = STAGES[args.stage]
    try:
        config = read_config(config_cls, args.config) if args.config is not None else config_cls()
        if args.steps is not None:
            config = dataclasses.replace(config, steps=args.steps)
        train_stage(
            config, args.out, resume=not args.no_resume, progress=not args.no_progress, data_workers=args.data_workers
        )
    except ValueError as error:
        print(f"diffuse train {args.stage}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main_train(sys.argv[1:]))
