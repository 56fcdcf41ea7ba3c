"""Train one stage of diffuse's own model:  python -m diffuse.train {vae,clip,unet} --config FILE --out DIR

or an add-on for any model:  python -m diffuse.train lora --model M --data DIR --out DIR
                             python -m diffuse.train embedding --model M --data DIR --out DIR --token NAME

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
from typing import Any

from diffuse.train.config_files import config_from_dict, read_json
from diffuse.train.stages.clip import CLIPTrainConfig, train_clip
from diffuse.train.stages.embedding import EmbeddingTrainConfig, train_embedding
from diffuse.train.stages.lora import LoraTrainConfig, train_lora
from diffuse.train.stages.unet import UNetTrainConfig, train_unet
from diffuse.train.stages.vae import VAETrainConfig, train_vae

STAGES: dict[str, tuple[type, Callable[..., Any]]] = {
    "vae": (VAETrainConfig, train_vae),
    "clip": (CLIPTrainConfig, train_clip),
    "unet": (UNetTrainConfig, train_unet),
    "lora": (LoraTrainConfig, train_lora),
    "embedding": (EmbeddingTrainConfig, train_embedding),
}
# Options that set an add-on stage's config field (over the config file's value).
FIELD_OPTIONS = {"model": "model", "data": "data", "token": "token", "vectors": "vectors", "init_text": "init_text"}


def main_train(argv: list[str]) -> int:
    """Parse `argv` (stage first), train that stage; 0 on success, 2 with a message on a bad config."""
    parser = argparse.ArgumentParser(
        prog="diffuse train",
        description="Train one stage of the model, from scratch or, with the config's init_from, from a finished stage.",
    )
    parser.add_argument(
        "stage",
        choices=sorted(STAGES),
        help="vae first, then clip, then unet (needs both); lora and embedding train add-ons for a finished model",
    )
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
    add_on = parser.add_argument_group("lora and embedding")
    add_on.add_argument("--model", help="the frozen base model (folder or file; default: the shipped model)")
    add_on.add_argument("--data", help="a folder of images, each with a caption .txt beside it")
    add_on.add_argument("--token", help="embedding: its name, the word prompts use (and the file's stem)")
    add_on.add_argument("--vectors", type=int, help="embedding: how many token vectors it has")
    add_on.add_argument("--init-text", help="embedding: the text whose token vectors it starts from")
    args = parser.parse_args(argv)
    if args.data_workers < 0:
        parser.error(f"--data-workers must be 0 (inline) or more, not {args.data_workers}")

    config_cls, train_stage = STAGES[args.stage]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    overrides = {
        field: getattr(args, option) for option, field in FIELD_OPTIONS.items() if getattr(args, option) is not None
    }
    for field in sorted(set(overrides) - fields):
        parser.error(f"--{field.replace('_', '-')} does not apply to the {args.stage} stage")
    try:
        if args.config is not None and not args.config.is_file():
            raise ValueError(f"config file {args.config} does not exist")
        values = read_json(args.config, f"config file {args.config}") if args.config is not None else {}
        if isinstance(values, dict):
            values = {**values, **overrides, **({"steps": args.steps} if args.steps is not None else {})}
        config = config_from_dict(config_cls, values, where=str(args.config or "the options"))
        result = train_stage(
            config, args.out, resume=not args.no_resume, progress=not args.no_progress, data_workers=args.data_workers
        )
    except ValueError as error:
        print(f"diffuse train {args.stage}: {error}", file=sys.stderr)
        return 2
    if isinstance(result, Path):
        print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main_train(sys.argv[1:]))
