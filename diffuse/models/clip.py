"""The CLIP text encoder: prompt token ids -> the hidden states the UNet cross-attends to.

SD1 uses OpenAI's CLIP ViT-L/14 text tower, SD2 OpenCLIP's ViT-H/14 one; both are
the same pre-norm causal transformer and differ only in size and MLP activation.
Stable Diffusion conditions on the per-token hidden states (after the final layer
norm), not on CLIP's pooled contrastive embedding. SDXL conditions on both: the
penultimate layer's hidden states (without the final norm) and, from its second
encoder (OpenCLIP ViT-bigG/14), the pooled embedding through `text_projection`.

Parameter names follow transformers' CLIPTextModel (without its leading
"text_model."), so a diffusers folder's text encoder loads by a prefix strip.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffuse.models.configs import TextEncoderConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """The sigmoid approximation of GELU that OpenAI's CLIP was trained with (SD1)."""
    return x * torch.sigmoid(1.702 * x)


# OpenCLIP-H (SD2) was trained with the exact erf GELU.
ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_length, cfg.width)

    def forward(self, ids: torch.Tensor, token_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """Token vectors plus position vectors; `token_embeddings` [B, T, width], when given, stands
        in for the lookup of `ids` (a textual-inversion embedding's vectors are written into it)."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        tokens = self.token_embedding(ids) if token_embeddings is None else token_embeddings
        return tokens + self.position_embedding(positions)


class CausalSelfAttention(nn.Module):
    """Each token attends to itself and the tokens before it (CLIP's text tower is causal)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        if cfg.width % cfg.heads != 0:
            raise ValueError(f"text encoder width {cfg.width} is not divisible by its {cfg.heads} heads")
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape

        def split_heads(t: torch.Tensor) -> torch.Tensor:  # [B, T, W] -> [B, heads, T, W/heads]
            return t.view(batch, tokens, self.heads, width // self.heads).transpose(1, 2)

        q, k, v = split_heads(self.q_proj(x)), split_heads(self.k_proj(x)), split_heads(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, width))


class MLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        if cfg.activation not in ACTIVATIONS:
            raise ValueError(
                f"unsupported text encoder activation {cfg.activation!r}; expected one of {sorted(ACTIVATIONS)}"
            )
        self.activation = ACTIVATIONS[cfg.activation]
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.self_attn = CausalSelfAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    """Only holds the layer stack, so parameter names read "encoder.layers.{i}" as in transformers."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))


class CLIPTextEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        if cfg.projection_dim:
            # CLIP's contrastive head: the pooled token into the joint text-image space.
            self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    def forward(
        self, ids: torch.Tensor, clip_skip: int = 1, token_embeddings: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token ids [B, T] -> hidden states [B, T, width], the UNet's text conditioning.

        clip_skip=k takes the output of layer (layers - k + 1), counting from 1, and
        passes it through the final layer norm: 1 is the last layer, 2 the
        penultimate ("clip skip 2" as A1111 and diffusers apply it). No padding
        mask: SD runs the encoder with the causal mask only, so padding tokens see
        the prompt and the prompt never sees them. `token_embeddings` replaces the
        token-vector lookup (see TextEmbeddings.forward).
        """
        layers = len(self.encoder.layers)
        if not 1 <= clip_skip <= layers:
            raise ValueError(f"clip_skip must be between 1 and {layers} (the encoder's layer count), got {clip_skip}")
        x = self.embed(ids, token_embeddings)
        for layer in self.encoder.layers[: layers - clip_skip + 1]:
            x = layer(x)
        return self.final_layer_norm(x)

    def embed(self, ids: torch.Tensor, token_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """The first layer's input [B, T, width], after checking ids (and token_embeddings) fit the encoder."""
        if ids.shape[1] > self.cfg.max_length:
            raise ValueError(f"{ids.shape[1]} tokens exceed the text encoder's {self.cfg.max_length} positions")
        if token_embeddings is not None and token_embeddings.shape != (*ids.shape, self.cfg.width):
            raise ValueError(f"token_embeddings {tuple(token_embeddings.shape)} do not fit ids {tuple(ids.shape)}")
        return self.embeddings(ids, token_embeddings)

    def sdxl_outputs(
        self, ids: torch.Tensor, eos_token_id: int = 49407, token_embeddings: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What SDXL takes from this encoder, in one pass: (the penultimate layer's hidden states
        [B, T, width], WITHOUT the final layer norm, and the last layer's final-normed state at the
        first end-of-text token [B, projection_dim], through text_projection where there is one,
        else [B, width]). The two are different layers: the context the UNet attends to is the
        input of the last layer, the pooled vector its output."""
        if len(self.encoder.layers) < 2:
            raise ValueError("SDXL's conditioning needs a text encoder of at least 2 layers")
        x = self.embed(ids, token_embeddings)
        for layer in self.encoder.layers[:-1]:
            x = layer(x)
        penultimate = x
        pooled = self.pooled(self.final_layer_norm(self.encoder.layers[-1](x)), ids, eos_token_id)
        if self.cfg.projection_dim:
            pooled = self.text_projection(pooled)
        return penultimate, pooled

    def pooled(self, hidden: torch.Tensor, ids: torch.Tensor, eos_token_id: int = 49407) -> torch.Tensor:
        """The hidden state at each row's first end-of-text token [B, width].

        With a causal mask that is the one position that has seen the whole
        prompt, which is why CLIP's contrastive head reads it. Every row must
        contain the token (the tokenizer always appends it).
        """
        is_eos = ids == eos_token_id
        if not bool(is_eos.any(dim=1).all()):
            raise ValueError(f"every row of ids must contain the end-of-text token {eos_token_id}")
        first_eos = is_eos.int().argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first_eos]
