"""LoRA file keys -> one group of tensors per target module, and target names -> diffuse's modules.

Two key families exist (reference 1.1-1.3):
- kohya / A1111 / LyCORIS: `<prefix>_<module path with "." as "_">.<param>`, split at the first dot;
- diffusers / PEFT: `<component>.<dotted diffusers path>.lora_A.weight`, and the older
  attention-processor spellings (`to_q_lora.down.weight`, `lora_linear_layer.up.weight`).
Both end up as (network, target) with the target's dots and underscores all underscores, which is
how kohya spells it; `module_index` lists every module of a network under those spellings, in
diffuse's own (LDM) names and, for the UNet, diffusers' names as well.

SDXL: kohya's `lora_te1_` (CLIP-L) and `lora_te2_` (bigG), PEFT's `text_encoder_2.`; its kohya UNet
names are LDM names (`input_blocks_4_1_...`), which are diffuse's own, so the UNet needs no table of
its own: unet_layout's pairs already follow SDXL's per-level depths, levels without attention and
label_emb. `lora_te_` marks a file made for a model with one text encoder (SD 1.x / 2.x).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from diffuse.checkpoints.keymap import invert, rename_prefixes
from diffuse.checkpoints.unet_layout import diffusers_pairs
from diffuse.models.configs import UNetConfig

# kohya prefix -> (network, the part of the module path the file writes and diffuse's module lacks).
KOHYA_NETWORKS: dict[str, tuple[str, str]] = {
    "lora_unet_": ("unet", ""),
    "lora_te_": ("text_encoder", "text_model_"),
    "lora_te1_": ("text_encoder", "text_model_"),
    "lora_te2_": ("text_encoder_2", "text_model_"),
}
SINGLE_ENCODER_PREFIX = "lora_te_"  # SD 1.x / 2.x kohya files; SDXL's write lora_te1_ / lora_te2_
# PEFT component prefix -> (network, path prefix diffuse's module lacks).
PEFT_NETWORKS: dict[str, tuple[str, str]] = {
    "unet.": ("unet", ""),
    "text_encoder.": ("text_encoder", "text_model."),
    "text_encoder_2.": ("text_encoder_2", "text_model."),
}

# A kohya key's part after the module name -> the canonical tensor name (lora_math).
KOHYA_PARAMS: dict[str, str] = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora_mid.weight": "mid",
    "alpha": "alpha",
    "scale": "scale",
    "dora_scale": "dora_scale",
    **{n: n for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")},
    **{n: n for n in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")},
    "diff": "diff",
    "diff_b": "diff_b",
}
# A PEFT key's ending -> (text that replaces it on the module path, canonical tensor name).
PEFT_ENDINGS: list[tuple[str, str, str]] = [
    (".lora_A.weight", "", "down"),
    (".lora_B.weight", "", "up"),
    (".lora_linear_layer.down.weight", "", "down"),
    (".lora_linear_layer.up.weight", "", "up"),
    (".lora.down.weight", "", "down"),
    (".lora.up.weight", "", "up"),
    (".alpha", "", "alpha"),
    *[(f".to_{p}_lora.{d}.weight", f".to_{p}", c) for p in "qkv" for d, c in (("down", "down"), ("up", "up"))],
    (".to_out_lora.down.weight", ".to_out.0", "down"),
    (".to_out_lora.up.weight", ".to_out.0", "up"),
]
BUNDLED_EMBEDDING = "bundle_emb."  # textual inversions some LoRA files carry along (reference 1.2)

Group = dict[str, dict[str, torch.Tensor]]  # canonical tensor name -> tensor, plus "keys"


def underscored(path: str) -> str:
    return path.replace(".", "_")


def _kohya(key: str) -> tuple[str, str, str, str] | None:
    """(network, target, canonical param, diffusers-style path or "") for a kohya key, else None."""
    module, _, param = key.partition(".")
    for prefix, (network, inner) in KOHYA_NETWORKS.items():
        if module.startswith(prefix) and param in KOHYA_PARAMS:
            target = module[len(prefix) :]
            return network, target.removeprefix(inner), KOHYA_PARAMS[param], ""
    return None


def _peft(key: str) -> tuple[str, str, str, str] | None:
    key = key.replace(".processor.", ".")
    for prefix, (network, inner) in PEFT_NETWORKS.items():
        if not key.startswith(prefix):
            continue
        for ending, replacement, param in PEFT_ENDINGS:
            if key.endswith(ending):
                path = key[len(prefix) : -len(ending)] + replacement
                path = path.removeprefix(inner)
                return network, underscored(path), param, path
    return None


def parse_key(key: str) -> tuple[str, str, str, str] | None:
    """(network, target, canonical param, dotted path as written or "") of a LoRA key; None: unknown."""
    return _kohya(key) or _peft(key)


def module_index(networks: Mapping[str, nn.Module]) -> dict[tuple[str, str], str]:
    """(network, underscored name) -> diffuse's module path, for every Linear and Conv2d a LoRA
    may patch, under diffuse's names and, for a UNet, diffusers' names too."""
    index: dict[tuple[str, str], str] = {}
    for network, root in networks.items():
        paths = [p for p, m in root.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        for path in paths:
            index[(network, underscored(path))] = path
        cfg = getattr(root, "cfg", None)
        if isinstance(cfg, UNetConfig):
            # unet_layout maps weight keys, so each module path goes through it as "<path>.weight".
            renamed = rename_prefixes({f"{p}.weight": p for p in paths}, invert(diffusers_pairs(cfg)))
            for key, path in renamed.items():
                index.setdefault((network, underscored(key.removesuffix(".weight"))), path)
    return index


def alpha_for(path: str, config: Mapping) -> float | None:
    """PEFT's lora_alpha for a module: the first alpha_pattern entry matching the end of its path
    (as PEFT matches them), else the config's lora_alpha; None when the config has neither."""
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern})", path):
            return float(value)
    alpha = config.get("lora_alpha")
    return None if alpha is None else float(alpha)
