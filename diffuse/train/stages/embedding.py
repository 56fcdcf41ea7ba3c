"""`diffuse train embedding`: textual inversion, a few new token vectors learnt with everything
else frozen, written as an A1111 / sd-scripts `.safetensors` embedding ({"emb_params": [N, D]},
named by its file's stem) that A1111, diffusers' load_textual_inversion and diffuse read.

The captions name the embedding as a prompt would (its token, or A1111's `[name]` template
placeholder), and are encoded by diffuse.prompts exactly as at generation: the token's slots get
the N trained vectors, the frozen text encoder and UNet carry the gradient back to them, and
the loss is the UNet stage's (objectives.unet_loss). The vectors start as the init text's token
vectors, spread over the N slots as A1111 spreads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from diffuse.adapters.embeddings import Embedding, embeddings_used
from diffuse.train.captioned_folder import CaptionedFolder
from diffuse.train.components import is_main_process
from diffuse.train.loop import BatchRandom, LoopConfig
from diffuse.train.stages.frozen_base import (
    DEFAULT_MODEL,
    FrozenBase,
    diffusion_loss,
    load_base,
    train_beside_base,
    write_safetensors,
)
from diffuse.train.state import resumable

TEMPLATE_NAME = "[name]"  # A1111's placeholder for the embedding in caption templates
MAX_VECTORS = 75  # one prompt chunk: more vectors could never be placed in a prompt


@dataclass(frozen=True)
class EmbeddingTrainConfig(LoopConfig):
    model: str = DEFAULT_MODEL  # the frozen base: a diffusers folder or a single-file checkpoint
    data: str = ""  # a folder of images, each with a caption .txt naming the embedding
    token: str = ""  # the embedding's name: the word prompts use, and the file's stem
    vectors: int = 1  # token slots the embedding fills
    init_text: str = "*"  # its vectors start as this text's token vectors
    image_size: int | None = None  # the side images are cropped to; None: the model's native size
    caption_dropout: float = 0.0
    min_snr_gamma: float | None = None  # see objectives.unet_loss
    steps: int = resumable(400)
    batch_size: int = 8
    lr: float = 5e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0  # the vectors should keep their size, as token vectors have one
    checkpoint_every: int = resumable(100)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.token != self.token.strip() or any(c in self.token for c in "/\\:<>()[]"):
            raise ValueError(f"token must be a plain word to write in prompts (and a file name), not {self.token!r}")
        if not 1 <= self.vectors <= MAX_VECTORS:
            raise ValueError(f"vectors must be from 1 to {MAX_VECTORS}, not {self.vectors}")
        if not self.init_text.strip():
            raise ValueError("init_text must hold at least one token")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], not {self.caption_dropout}")


class TokenVectors(nn.Module):
    """The N trained vectors; calling it gives them (the loop calls each trained model once a step)."""

    def __init__(self, start: Tensor):
        super().__init__()
        self.vectors = nn.Parameter(start.detach().clone().float())

    def forward(self) -> Tensor:
        return self.vectors


@dataclass(frozen=True)
class _Vectors:
    vectors: Tensor  # what diffuse.prompts needs of an embedding


def initial_vectors(base: FrozenBase, init_text: str, count: int) -> Tensor:
    """[count, D]: the init text's token vectors, the i-th slot taking token i * tokens // count (A1111)."""
    ids = base.pipe.tokenizer.encode(init_text)
    if not ids:
        raise ValueError(f"init_text {init_text!r} has no tokens")
    table = base.pipe.text_encoder.embeddings.token_embedding.weight
    rows = [ids[i * len(ids) // count] for i in range(count)]
    return table[torch.tensor(rows)].detach().float().clone()


def with_token(caption: str, token: str) -> str:
    return caption.replace(TEMPLATE_NAME, token)


def check_captions(data: CaptionedFolder, base: FrozenBase, token: str) -> None:
    """Refuse a folder where some caption does not name the embedding (that image would train nothing)."""
    probe = {token: Embedding(token, torch.zeros(1, 1), None, "")}
    for item in data.items:
        if not embeddings_used(base.pipe.tokenizer, [with_token(item.caption, token)], probe):
            raise ValueError(
                f"{item.path.with_suffix('.txt')}: the caption does not name the embedding {token!r} "
                f"(write {token} or {TEMPLATE_NAME} where it belongs)"
            )


def loss_fn(
    config: EmbeddingTrainConfig, base: FrozenBase, models: dict[str, nn.Module], batch: dict, random: BatchRandom
) -> tuple[Tensor, dict[str, float]]:
    batch = {**batch, "captions": [with_token(c, config.token) for c in batch["captions"]]}
    embeddings = {config.token: _Vectors(models["embedding"]())}
    loss, logs = diffusion_loss(
        base, base.pipe.unet, batch, random, config.caption_dropout, config.min_snr_gamma, embeddings
    )
    logs["vector_norm"] = models["embedding"].vectors.detach().norm(dim=1).mean().item()
    return loss, logs


def train_embedding(
    config: EmbeddingTrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = True,
    progress: bool = True,
    data_workers: int = 0,
) -> Path:
    """Train the vectors in `out_dir`, then write `<token>.safetensors` there; returns its path."""
    out_dir = Path(out_dir)
    if not config.data or not config.token:
        raise ValueError("an embedding needs data, a folder of images with captions, and its token (--data, --token)")
    base = load_base(config.model, config.image_size)
    data = CaptionedFolder(config.data, base.image_size)
    check_captions(data, base, config.token)
    embedding = TokenVectors(initial_vectors(base, config.init_text, config.vectors))
    train_beside_base(
        config,
        base,
        data,
        ("embedding", embedding),
        partial(loss_fn, config, base),
        out_dir,
        resume=resume,
        progress=progress,
        data_workers=data_workers,
    )
    path = out_dir / f"{config.token}.safetensors"
    if is_main_process():
        write_safetensors(path, {"emb_params": embedding.vectors.detach()}, {"name": config.token})
    return path
