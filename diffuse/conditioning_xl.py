"""SDXL's conditioning: what its UNet cross-attends to, and the vector y added to its time embedding.

    prompt ─tokenizer 1 (pads with EOS)─▶ CLIP ViT-L ──penultimate──┐
          ─tokenizer 2 (pads with id 0)─▶ OpenCLIP bigG ─penultimate─┴─▶ context [B, 77·k, 768 + 1280]
                                                 └─last layer, final norm, first EOS, projection─▶ pooled [B, 1280]
    y = [pooled | sinusoids of (original h, w, crop top, left, target h, w)]  [B, 1280 + 6·256]

The refiner reads bigG alone (context [B, 77·k, 1280]) and an aesthetic score in place of the
target size (y [B, 1280 + 5·256]).

Both encoders give their penultimate layer WITHOUT the final layer norm (SD1's "clip skip 2"
does apply it). Long prompts are read in 75-token chunks as for SD 1/2 (diffuse.prompts), each
encoder's chunks laid end to end; the pooled vector comes from bigG's first chunk, as in A1111.
An empty negative prompt is all zeros, context and pooled alike (diffusers'
`force_zeros_for_empty_prompt`, A1111's `force_zero_embeddings`): the model was trained to
read zeros as "no text".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from diffuse.models.clip import CLIPTextEncoder
from diffuse.models.unet import timestep_embedding
from diffuse.prompts import PromptChunk, TokenVectors, apply_weights, prompt_chunks, token_vectors
from diffuse.tokenizer import CLIPTokenizer

# The refiner's aesthetic scores for the prompts and the negative prompts (diffusers' and A1111's
# defaults): high asks for the look of the training images rated good, low steers away from the poor.
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's micro-conditioning in pixels, (height, width) and (top, left): the size of the
    training image the model is told it sees, the corner of the crop taken from it, and the size
    it is asked to draw. The size asked for, uncropped (`plain`), draws as the model did for
    uncropped training images of that size, as diffusers and A1111 set it."""

    original: tuple[int, int]
    crop: tuple[int, int]
    target: tuple[int, int]

    @classmethod
    def plain(cls, height: int, width: int, crop: tuple[int, int] = (0, 0)) -> SizeConditioning:
        return cls((height, width), crop, (height, width))


def size_conditioning(batch: int, sizes: SizeConditioning, dim: int, aesthetic_score: float | None = None) -> Tensor:
    """The micro-conditioning part of y [batch, 6·dim]: original size, crop corner, target size,
    height first, each scalar as a dim-wide [cos | sin] sinusoid (max period 10000). The refiner
    reads an aesthetic score in place of the target size: [batch, 5·dim]."""
    last = list(sizes.target) if aesthetic_score is None else [aesthetic_score]
    values = torch.tensor([*sizes.original, *sizes.crop, *last], dtype=torch.float32)
    return timestep_embedding(values, dim).reshape(1, -1).expand(batch, -1)


def vector_conditioning(
    pooled: Tensor, sizes: SizeConditioning, dim: int, aesthetic_score: float | None = None
) -> Tensor:
    """y = [pooled | size_conditioning] [B, pooled width + 6·dim (refiner: 5·dim)], in float32."""
    micro = size_conditioning(len(pooled), sizes, dim, aesthetic_score).to(pooled.device)
    return torch.cat([pooled.float(), micro], dim=1)


# Per text encoder, the embeddings its prompts may name: {name: that encoder's half}
# (diffuse.adapters.embeddings.per_encoder); the same names in each, so the token slots agree.
EncoderEmbeddings = Sequence[Mapping[str, TokenVectors]]


def _chunks_per_text(
    tokenizers: Sequence[CLIPTokenizer], text: str, embeddings: EncoderEmbeddings
) -> list[list[PromptChunk]]:
    """The text's chunks for each tokenizer; the counts must agree, as the contexts are joined on channels."""
    per_tokenizer = [prompt_chunks(tokenizer, text, table) for tokenizer, table in zip(tokenizers, embeddings)]
    if len({len(chunks) for chunks in per_tokenizer}) != 1:
        raise ValueError(f"the two tokenizers split the prompt {text[:60]!r} into different numbers of chunks")
    return per_tokenizer


def encode_prompts_xl(
    tokenizers: Sequence[CLIPTokenizer],
    text_encoders: Sequence[CLIPTextEncoder],
    texts: list[str],
    embeddings: EncoderEmbeddings | None = None,
) -> tuple[Tensor, Tensor]:
    """Prompts -> (context [B, 77·k, sum of widths], pooled [B, projection width]) from the last encoder.

    k is the largest chunk count among the prompts; a prompt with fewer chunks is filled up with
    the empty prompt's chunk, as A1111 fills a conditioning up. Each distinct text is encoded once.
    An embedding named in a prompt puts each encoder's half of it in the same token slots."""
    embeddings = embeddings or [{}] * len(tokenizers)
    unique = list(dict.fromkeys(texts))
    per_text = [_chunks_per_text(tokenizers, text, embeddings) for text in unique]
    count = max(len(chunks[0]) for chunks in per_text)
    empty = [prompt_chunks(tokenizer, "")[0] for tokenizer in tokenizers]
    padded = [[c + [e] * (count - len(c)) for e, c in zip(empty, chunks)] for chunks in per_text]
    contexts, pooled = [], None
    for n, (tokenizer, encoder, table) in enumerate(zip(tokenizers, text_encoders, embeddings)):
        chunks = [chunk for per_tokenizer in padded for chunk in per_tokenizer[n]]
        device = next(encoder.parameters()).device
        ids = torch.tensor([chunk.ids for chunk in chunks], dtype=torch.long, device=device)
        vectors = token_vectors(encoder, ids, chunks, table) if any(c.fixes for c in chunks) else None
        hidden, pooled = encoder.sdxl_outputs(ids, tokenizer.eos_token_id, token_embeddings=vectors)
        contexts.append(apply_weights(hidden, chunks).reshape(len(unique), count * ids.shape[1], -1))
    context = torch.cat([c.to(contexts[0].dtype) for c in contexts], dim=-1)
    first_chunk_pooled = pooled.reshape(len(unique), count, -1)[:, 0]
    row = {text: i for i, text in enumerate(unique)}
    index = torch.tensor([row[text] for text in texts], device=context.device)
    return context[index], first_chunk_pooled[index.to(pooled.device)]


def encode_prompt_pair_xl(
    tokenizers: Sequence[CLIPTokenizer],
    text_encoders: Sequence[CLIPTextEncoder],
    prompts: list[str],
    negative_prompts: list[str],
    zeros_for_empty: bool = True,
    embeddings: EncoderEmbeddings | None = None,
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """((context, pooled) of the prompts, (context, pooled) of the negative prompts), with the same
    context length, encoded in one call per encoder. With `zeros_for_empty` an empty negative
    prompt's context and pooled vector are zeros."""
    if len(prompts) != len(negative_prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(negative_prompts)} negative prompts; they must pair up")
    texts = list(prompts) + list(negative_prompts)
    context, pooled = encode_prompts_xl(tokenizers, text_encoders, texts, embeddings)
    n = len(prompts)
    uncond_context, uncond_pooled = context[n:], pooled[n:]
    if zeros_for_empty:
        empty = torch.tensor([text == "" for text in negative_prompts])
        uncond_context = torch.where(empty.to(context.device)[:, None, None], 0.0, uncond_context)
        uncond_pooled = torch.where(empty.to(pooled.device)[:, None], 0.0, uncond_pooled)
    return (context[:n], pooled[:n]), (uncond_context, uncond_pooled)


# SDXL's crop and negative size conditioning as a request sets it and as the parameters record it:
# each request field and its two record keys, (top, left) for a crop and (width, height) for a size,
# written together and only away from the default (uncropped; the negative prompts' the prompts' own).
SIZE_PAIRS = {
    "crop": ("crop_top", "crop_left"),
    "negative_original_size": ("negative_original_width", "negative_original_height"),
    "negative_target_size": ("negative_target_width", "negative_target_height"),
    "negative_crop": ("negative_crop_top", "negative_crop_left"),
}


def size_info(own: SizeConditioning, negative: SizeConditioning) -> dict:
    """The record of SDXL's crop and negative size conditioning (SIZE_PAIRS' keys), each where it
    differs from its default."""
    values = {  # (as recorded, its default); sizes are held (height, width)
        "crop": (own.crop, (0, 0)),
        "negative_original_size": (negative.original[::-1], own.original[::-1]),
        "negative_target_size": (negative.target[::-1], own.target[::-1]),
        "negative_crop": (negative.crop, own.crop),
    }
    return {
        key: value
        for name, (pair, default) in values.items()
        if pair != default
        for key, value in zip(SIZE_PAIRS[name], pair)
    }


def aesthetic_info(score: float, negative_score: float) -> dict:
    """The refiner's aesthetic scores, each where it differs from the default, for the record."""
    pairs = {
        "aesthetic_score": (score, AESTHETIC_SCORE),
        "negative_aesthetic_score": (negative_score, NEGATIVE_AESTHETIC_SCORE),
    }
    return {key: value for key, (value, default) in pairs.items() if value != default}
