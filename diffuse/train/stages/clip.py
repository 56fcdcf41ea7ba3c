"""Stage 2: the text encoder, trained CLIP's way against a small image tower.

Captions and images are embedded into one joint space (diffuse.shapes.image_encoder) and
the symmetric contrastive loss pulls each caption toward its own image and away from the
batch's others. The text encoder is the stage's product (final.*); the image encoder, the
text projection and the temperature are left beside it as the image tower
(final_image_tower.*), which generation never uses but which measures the text encoder
later (caption retrieval).

Under torchrun every process embeds its own rows, then the embeddings of all processes
are gathered, with gradients, so the loss compares every image with every caption of the
global batch, exactly as one process holding the whole batch does. That needs the same
number of rows on every process: the global batch must be a multiple of the process count.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from diffuse.models.clip import CLIPTextEncoder
from diffuse.models.configs import TextEncoderConfig
from diffuse.shapes.image_encoder import (
    ImageEncoder,
    ImageEncoderConfig,
    ImageTower,
    ImageTowerConfig,
    LogitScale,
    TextProjection,
)
from diffuse.tokenizer import CONTEXT_LENGTH, CLIPTokenizer
from diffuse.train import distributed
from diffuse.train.components import is_main_process, save_final, stage_inputs, starting_weights
from diffuse.train.loop import BatchRandom, LoopConfig, train
from diffuse.train.objectives import contrastive_loss
from diffuse.train.presets import TINY_IMAGE_ENCODER, TINY_TEXT
from diffuse.train.worlds import DEFAULT_DATA, Dataset, WorldData, data_inputs, make_dataset


@dataclass(frozen=True)
class CLIPTrainConfig(LoopConfig):
    text_encoder: TextEncoderConfig = TINY_TEXT
    image_encoder: ImageEncoderConfig = TINY_IMAGE_ENCODER  # its embed_dim is the joint space's size
    data: WorldData = DEFAULT_DATA  # which world and how (diffuse.train.worlds); the shapes by default
    # How captions are padded to 77 tokens: 49407 (<|endoftext|>) as SD1, 0 ("!") as SD2.
    # The UNet stage and the shipped pipeline read it from the finished encoder.
    pad_token_id: int = 49407
    # Each two-object caption also brings its relation-reversed twin (data.swapped_caption) as
    # one more wrong caption that every image must rank below its own. A random batch almost
    # never holds the same two objects the other way round, so without these the loss barely
    # asks the text encoder which way a relation points.
    hard_negatives: bool = False
    # A finished CLIP stage's folder (e.g. one diffuse.train.unpack wrote) to start from: its text
    # encoder and image tower, instead of random weights. None: from scratch.
    init_from: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_encoder.image_size != self.data.image_size:
            raise ValueError(
                f"image_encoder.image_size {self.image_encoder.image_size} differs from "
                f"data.image_size {self.data.image_size}"
            )
        if self.text_encoder.max_length != CONTEXT_LENGTH:
            raise ValueError(
                f"text_encoder.max_length must be the tokenizer's {CONTEXT_LENGTH} positions, "
                f"not {self.text_encoder.max_length}"
            )


def build_models(config: CLIPTrainConfig) -> dict[str, nn.Module]:
    torch.manual_seed(config.seed)  # the same starting weights for every run of this config
    models = {
        "text_encoder": CLIPTextEncoder(config.text_encoder),
        "text_projection": TextProjection(config.text_encoder.width, config.image_encoder.embed_dim),
        "image_encoder": ImageEncoder(config.image_encoder),
        "logit_scale": LogitScale(),
    }
    if config.init_from is not None:
        text_encoder, extra = starting_weights(config.init_from, "text_encoder", config.text_encoder)
        if extra.get("pad_token_id") != config.pad_token_id:
            raise ValueError(
                f"init_from {config.init_from}: its text encoder was trained with pad_token_id "
                f"{extra.get('pad_token_id')}, this run pads with {config.pad_token_id}"
            )
        # Both sides: a trained text encoder against a random image tower would first be pulled
        # toward whatever the random tower makes of the images.
        tower, _ = starting_weights(
            config.init_from,
            "image_tower",
            ImageTowerConfig(image_encoder=config.image_encoder, text_width=config.text_encoder.width),
        )
        models["text_encoder"].load_state_dict(text_encoder.state_dict())
        for name, part in tower.named_children():
            models[name].load_state_dict(part.state_dict())
    return models


def image_tower(config: CLIPTrainConfig, models: dict[str, nn.Module]) -> ImageTower:
    """The trained image side, as one module: the parts of `models` under the same names."""
    tower = ImageTower(ImageTowerConfig(image_encoder=config.image_encoder, text_width=config.text_encoder.width))
    for name, part in tower.named_children():
        part.load_state_dict(models[name].state_dict())
    return tower.eval()


def make_batch(
    dataset: Dataset, tokenizer: CLIPTokenizer, start: int, count: int, hard_negatives: bool = False
) -> dict[str, Tensor]:
    images, captions, _ = dataset.batch(start, count)
    batch = {"images": images, "ids": tokenizer(captions)}
    if hard_negatives:
        swapped = [dataset.swapped_caption(index) for index in range(start, start + count)]
        batch["negative_ids"] = tokenizer([text or "" for text in swapped])
        batch["has_negative"] = torch.tensor([text is not None for text in swapped])
    return batch


class _GatherRows(torch.autograd.Function):
    """All processes' rows, concatenated in rank order; gradients flow back to this process's rows."""

    @staticmethod
    def forward(ctx, rows: Tensor) -> Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(rows) for _ in range(world)]
        dist.all_gather(parts, rows.contiguous())
        ctx.start, ctx.count, ctx.world = rank * len(rows), len(rows), world
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # Every process computes the same global loss, so the gradient for its own rows is
        # complete here. DDP then averages the parameter gradients over the processes, so
        # scale by the process count to end with the global loss's gradient.
        return grad[ctx.start : ctx.start + ctx.count] * ctx.world


def gather_global_batch(rows: Tensor) -> Tensor:
    """This process's rows -> the global batch's (identity in a single process)."""
    if not distributed.is_initialized():
        return rows
    return _GatherRows.apply(rows)


def loss_fn(
    eos_token_id: int, models: dict[str, nn.Module], batch: dict[str, Tensor], random: BatchRandom
) -> tuple[Tensor, dict[str, float]]:
    ids, images = batch["ids"], batch["images"]
    if distributed.is_initialized() and random.global_batch % dist.get_world_size():
        raise ValueError(
            f"CLIP training gathers equal shares from every process: batch_size {random.global_batch} "
            f"must be a multiple of the {dist.get_world_size()} processes"
        )
    text_encoder = models["text_encoder"]
    negatives = "negative_ids" in batch
    all_ids = torch.cat([ids, batch["negative_ids"]]) if negatives else ids  # one forward: DDP counts calls
    hidden = text_encoder(all_ids)
    # Reading the end-of-text state uses no weights: call it on the encoder, not on a DDP wrapper.
    pooled = getattr(text_encoder, "module", text_encoder).pooled(hidden, all_ids, eos_token_id)
    text_embeds = models["text_projection"](pooled)
    image_embeds = models["image_encoder"](images)
    scale = models["logit_scale"]()
    negative_embeds = has_negative = None
    if negatives:
        text_embeds, negative_embeds = text_embeds[: len(ids)], gather_global_batch(text_embeds[len(ids) :])
        has_negative = gather_global_batch(batch["has_negative"].float()).bool()
    return contrastive_loss(
        gather_global_batch(image_embeds),
        gather_global_batch(text_embeds),
        scale,
        gather_global_batch(ids),
        negative_embeds,
        has_negative,
    )


def train_clip(
    config: CLIPTrainConfig, out_dir: str | Path, *, resume: bool = True, progress: bool = True, data_workers: int = 0
) -> list[float]:
    """Train the text encoder in `out_dir`, then write it as final.safetensors / final.json (and the image
    tower as final_image_tower.*); returns every step's loss."""
    models = build_models(config)
    tokenizer = CLIPTokenizer.from_bpe_gz(pad_token_id=config.pad_token_id)
    dataset = make_dataset(config.data)
    inputs = data_inputs(config.data)
    if config.init_from is not None:
        inputs.update(stage_inputs("init_from", config.init_from, "text_encoder"))
        inputs.update(stage_inputs("init_from", config.init_from, "image_tower"))
    losses = train(
        config,
        models,
        partial(loss_fn, tokenizer.eos_token_id),
        partial(make_batch, dataset, tokenizer, hard_negatives=config.hard_negatives),
        out_dir,
        resume=resume,
        progress=progress,
        data_workers=data_workers,
        inputs=inputs,
    )
    if is_main_process():
        # The tower first: the text encoder's final.json is what marks the stage finished.
        tower = image_tower(config, models)
        save_final(out_dir, "image_tower", tower, tower.cfg, config)
        save_final(
            out_dir,
            "text_encoder",
            models["text_encoder"].eval(),
            config.text_encoder,
            config,
            extra={"pad_token_id": config.pad_token_id},
        )
    return losses
