"""Text encoder key layouts: transformers' CLIPTextModel (diffusers folders, SD1 single
files) and OpenCLIP (SD2 single files), to and from ours (diffuse.models.clip).

Ours is transformers' layout without the leading "text_model.". OpenCLIP differs in
names, stores the position embedding as a bare parameter, and fuses the attention's
q, k, v projections into one `in_proj` matrix stacked along dim 0 in that order.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from diffuse.checkpoints.fields import check_fields, integer, number, text
from diffuse.checkpoints.keymap import PrefixPairs, count_numbered, dims, invert, rename_prefixes
from diffuse.models import configs as limits
from diffuse.models.clip import ACTIVATIONS
from diffuse.models.configs import TextEncoderConfig

# (transformers prefix, our prefix). Keys without "text_model." (older SD1 single files,
# and what transformers 5 itself saves) match no pair and already have our names.
TRANSFORMERS_PAIRS: PrefixPairs = [
    ("text_model.embeddings", "embeddings"),
    ("text_model.encoder", "encoder"),
    ("text_model.final_layer_norm", "final_layer_norm"),
]

# (OpenCLIP prefix, our prefix) outside the transformer blocks.
OPEN_CLIP_PAIRS: PrefixPairs = [
    ("token_embedding", "embeddings.token_embedding"),
    ("positional_embedding", "embeddings.position_embedding.weight"),  # a bare nn.Parameter in OpenCLIP
    ("ln_final", "final_layer_norm"),
]

# (OpenCLIP prefix, our prefix) inside block i: "transformer.resblocks.{i}." / "encoder.layers.{i}.".
# "attn" covers out_proj and the fused in_proj, which is split into q/k/v afterwards.
OPEN_CLIP_BLOCK_PAIRS: PrefixPairs = [
    ("ln_1", "layer_norm1"),
    ("attn", "self_attn"),
    ("ln_2", "layer_norm2"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
]

# Tensors the checkpoints carry that conditioning never uses: CLIP's contrastive head
# (projection and temperature) and transformers' position-id buffer of older files. SDXL's
# second encoder keeps its projection (TextEncoderConfig.projection_dim).
UNUSED_KEYS = ("text_projection", "logit_scale", "embeddings.position_ids")
PROJECTION = "text_projection"

OPEN_CLIP_BLOCKS = "transformer.resblocks."
FUSED_QKV = {"in_proj_weight": "weight", "in_proj_bias": "bias"}


def without_unused(state: Mapping[str, torch.Tensor], keep: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    unused = [u for u in UNUSED_KEYS if u not in keep]
    return {k: v for k, v in state.items() if not any(k == u or k.startswith(u + ".") for u in unused)}


# ---------------------------------------------------------------- transformers


def from_transformers(state: Mapping[str, torch.Tensor], *, with_projection: bool = False) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel state dict ("text_model.*", or the older unprefixed layout) -> ours;
    `with_projection` keeps CLIPTextModelWithProjection's `text_projection` (SDXL's text_encoder_2)."""
    return without_unused(rename_prefixes(state, TRANSFORMERS_PAIRS), keep=(PROJECTION,) if with_projection else ())


def to_transformers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> a transformers CLIPTextModel state dict ("text_model.*")."""
    return rename_prefixes(state, invert(TRANSFORMERS_PAIRS))


def count_layers(state: Mapping[str, torch.Tensor]) -> int:
    """How many encoder layers our-layout state holds (numbered 0..n-1)."""
    layers = count_numbered(state, "encoder.layers.")
    if not layers:
        raise ValueError("no encoder.layers.* tensors in the text encoder state")
    return layers


# ---------------------------------------------------------------- OpenCLIP


def _block_index(key: str) -> int | None:
    """i for "transformer.resblocks.{i}.*", else None."""
    return int(key[len(OPEN_CLIP_BLOCKS) :].split(".")[0]) if key.startswith(OPEN_CLIP_BLOCKS) else None


def open_clip_layers(state: Mapping[str, torch.Tensor]) -> int:
    """How many transformer blocks an OpenCLIP text tower state holds (numbered 0..n-1)."""
    blocks = count_numbered(state, OPEN_CLIP_BLOCKS)
    if not blocks:
        raise ValueError(f"no {OPEN_CLIP_BLOCKS}* tensors: this is not an OpenCLIP text tower")
    return blocks


def sd2_layers(state: Mapping[str, torch.Tensor]) -> int:
    """How many of an OpenCLIP state's blocks SD2's text encoder uses.

    SD2 conditions on the PENULTIMATE block of OpenCLIP ViT-H/14, so the original
    24-block tower (as exported with its contrastive head, text_projection and
    logit_scale) gives a 23-layer encoder and its last block is never used. A
    file converted from a 23-layer encoder (diffusers' conversion script, or
    to_open_clip here) has no contrastive head and only the blocks in use.
    """
    blocks = open_clip_layers(state)
    has_contrastive_head = "text_projection" in state or "logit_scale" in state
    return blocks - 1 if has_contrastive_head else blocks


def _block_pairs(layers: int) -> PrefixPairs:
    return [
        (f"{OPEN_CLIP_BLOCKS}{i}.{a}", f"encoder.layers.{i}.{b}")
        for i in range(layers)
        for a, b in OPEN_CLIP_BLOCK_PAIRS
    ]


def from_open_clip(
    state: Mapping[str, torch.Tensor], layers: int, *, with_projection: bool = False
) -> dict[str, torch.Tensor]:
    """An OpenCLIP text tower state ("cond_stage_model.model." already stripped) -> ours,
    keeping blocks 0..layers-1 (see sd2_layers for how many SD2 uses). `with_projection` keeps
    the contrastive head's `text_projection` (SDXL's bigG), which OpenCLIP applies as x @ P:
    our Linear weight is its transpose."""
    blocks = open_clip_layers(state)
    if not 1 <= layers <= blocks:
        raise ValueError(f"cannot keep {layers} layers of an OpenCLIP tower with {blocks} blocks")
    projection = {}
    if with_projection:
        if PROJECTION not in state:
            raise ValueError(f"no {PROJECTION} in the OpenCLIP tower")
        dims(state, PROJECTION, 2)  # a matrix, before it is transposed
        projection = {f"{PROJECTION}.weight": state[PROJECTION].t().contiguous()}
    kept = {k: v for k, v in without_unused(state).items() if _block_index(k) is None or _block_index(k) < layers}
    renamed = rename_prefixes(kept, OPEN_CLIP_PAIRS + _block_pairs(layers))
    ours = {}
    for key, tensor in renamed.items():
        head, _, leaf = key.rpartition(".")
        if leaf not in FUSED_QKV:
            ours[key] = tensor
            continue
        if tensor.ndim == 0 or tensor.shape[0] % 3 != 0:
            raise ValueError(f"{key} has shape {tuple(tensor.shape)}, not a stack of equal q, k, v projections")
        # Cloned so the three tensors own their storage (safetensors refuses to save shared storage).
        for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
            ours[f"{head}.{name}.{FUSED_QKV[leaf]}"] = part.clone()
    return {**ours, **projection}


def to_open_clip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> OpenCLIP names, q/k/v fused into in_proj; only the blocks we have (and the contrastive
    head's projection only where ours has one: SDXL's bigG)."""
    fused = {}
    for key, tensor in state.items():
        head, _, leaf = key.rpartition(".")
        attn, _, proj = head.rpartition(".")
        if key == f"{PROJECTION}.weight":
            fused[PROJECTION] = tensor.t().contiguous()  # OpenCLIP applies it as x @ P
        elif proj not in ("q_proj", "k_proj", "v_proj"):
            fused[key] = tensor
        elif proj == "q_proj":  # k_proj and v_proj are gathered here too
            fused[f"{attn}.in_proj_{leaf}"] = torch.cat(
                [state[f"{attn}.{p}.{leaf}"] for p in ("q_proj", "k_proj", "v_proj")]
            )
    return rename_prefixes(fused, invert(OPEN_CLIP_PAIRS + _block_pairs(count_layers(state))))


# ---------------------------------------------------------------- configs


# Every field of `text_encoder/config.json` that config_from_transformers reads: its type
# and range, checked before any is used (diffuse.checkpoints.fields).
TRANSFORMERS_FIELDS = {
    "vocab_size": integer(1, limits.MAX_VOCAB),
    "max_position_embeddings": integer(1, limits.MAX_POSITIONS),
    "hidden_size": integer(1, limits.MAX_WIDTH),
    "num_hidden_layers": integer(1, limits.MAX_TEXT_LAYERS),
    "num_attention_heads": integer(1, limits.MAX_HEADS),
    "intermediate_size": integer(1, limits.MAX_MLP_WIDTH),
    "hidden_act": text(),  # the supported names are checked below, where the message lists them
    "layer_norm_eps": number(0, 1, above_low=True),
    "projection_dim": integer(1, limits.MAX_WIDTH),
}


def config_from_transformers(config: Mapping, *, with_projection: bool = False) -> TextEncoderConfig:
    """A diffusers folder's text_encoder/config.json (a transformers CLIPTextConfig) -> ours.

    `with_projection`: the folder holds a CLIPTextModelWithProjection (SDXL's text_encoder_2),
    whose `projection_dim` (CLIPTextConfig's default: 512) sizes text_projection. A plain
    CLIPTextModel's config names a projection_dim too, but its weights have no projection."""
    check_fields(config, TRANSFORMERS_FIELDS)
    missing = [
        k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size") if k not in config
    ]
    if missing:
        raise ValueError(f"text encoder config lacks {missing}")
    activation = config.get("hidden_act", "quick_gelu")  # CLIPTextConfig's default
    if activation not in ACTIVATIONS:
        raise ValueError(f"unsupported text encoder hidden_act {activation!r}; expected one of {sorted(ACTIVATIONS)}")
    cfg = TextEncoderConfig(
        vocab_size=int(config.get("vocab_size", 49408)),
        max_length=int(config.get("max_position_embeddings", 77)),
        width=int(config["hidden_size"]),
        layers=int(config["num_hidden_layers"]),
        heads=int(config["num_attention_heads"]),
        mlp_width=int(config["intermediate_size"]),
        activation=activation,
        layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)),
        projection_dim=int(config.get("projection_dim", 512)) if with_projection else 0,
    )
    limits.check_text_encoder(cfg)  # what the fields allow one by one may still not build (heads vs width)
    return cfg


def config_to_transformers(cfg: TextEncoderConfig, *, bos_token_id: int, eos_token_id: int, pad_token_id: int) -> dict:
    """A transformers CLIPTextConfig dict (text_encoder/config.json) for ours; the inverse of
    config_from_transformers. The special-token ids come from the tokenizer the encoder is used with."""
    return {
        "architectures": ["CLIPTextModelWithProjection" if cfg.projection_dim else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_length,
        "hidden_size": cfg.width,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "intermediate_size": cfg.mlp_width,
        "hidden_act": cfg.activation,
        "layer_norm_eps": cfg.layer_norm_eps,
        # Only CLIPTextModelWithProjection has a projection; SD 1/2 use the hidden states, so
        # theirs is sized like them (as CLIP-L's 768 and OpenCLIP-H's 1024 are).
        "projection_dim": cfg.projection_dim or cfg.width,
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
    }


def config_from_weights(state: Mapping[str, torch.Tensor], *, activation: str, head_dim: int = 64) -> TextEncoderConfig:
    """Detect the architecture from our-layout tensors (after from_transformers / from_open_clip).

    Shapes give width, depth, MLP width, vocabulary and positions. The head count is
    not stored anywhere, so it is width // head_dim: CLIP-L (768 = 12 x 64) and
    OpenCLIP-H (1024 = 16 x 64) both use 64 channels per head. The activation is not
    in the weights either (the caller knows the family); both families use the
    default layer-norm epsilon, 1e-5.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unsupported text encoder activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
    for key in (
        "embeddings.token_embedding.weight",
        "embeddings.position_embedding.weight",
        "encoder.layers.0.mlp.fc1.weight",
    ):
        if key not in state:
            raise ValueError(f"text encoder state lacks {key}")
    vocab_size, width = dims(state, "embeddings.token_embedding.weight", 2)
    if width % head_dim != 0:
        raise ValueError(f"text encoder width {width} is not a multiple of the head size {head_dim}")
    return TextEncoderConfig(
        vocab_size=vocab_size,
        max_length=dims(state, "embeddings.position_embedding.weight", 2)[0],
        width=width,
        layers=count_layers(state),
        heads=width // head_dim,
        mlp_width=dims(state, "encoder.layers.0.mlp.fc1.weight", 2)[0],
        activation=activation,
    )
