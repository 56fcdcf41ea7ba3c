"""The Stable Diffusion pipeline: the tokenizer, the three networks and their config, together."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .models.clip import CLIPTextEncoder
from .models.configs import PipelineConfig
from .models.unet import UNet
from .models.vae import AutoencoderKL
from .tokenizer import CLIPTokenizer


@dataclass
class Pipeline:
    """Prompt → tokenizer → text_encoder → context; unet predicts noise in the vae's latent space.

    `source` is the checkpoint file or folder the weights came from.
    """

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextEncoder
    unet: UNet
    vae: AutoencoderKL
    config: PipelineConfig
    source: Path

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @torch.no_grad()
    def encode_prompt(self, prompts: str | list[str], clip_skip: int = 1) -> torch.Tensor:
        """Text conditioning: prompts → token ids [B,77] → context [B,77,D]."""
        ids = self.tokenizer(prompts).to(self.device)
        return self.text_encoder(ids, clip_skip=clip_skip)
