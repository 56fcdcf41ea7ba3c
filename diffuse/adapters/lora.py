"""A LoRA / LyCORIS file read into patches: one per module it changes, on no model yet.

`read_lora(path)` reads any supported file (kohya / A1111, LyCORIS LoHa / LoKr / Full / DoRA,
diffusers / PEFT and its older spellings) safely; `lora_from_state_dict` does the same for
tensors already in memory. Matching the patches to a model's modules happens when they are
applied (diffuse.adapters.merge), so one read LoRA serves any pipeline.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffuse.adapters.files import SafetensorsFile, read_addon, short_hash_of
from diffuse.adapters.lora_keys import BUNDLED_EMBEDDING, PEFT_NETWORKS, alpha_for, parse_key
from diffuse.adapters.lora_math import COMMON, KINDS, OPTIONAL, Patch
from diffuse.checkpoints.errors import CheckpointError
from diffuse.checkpoints.reader import check_finite, sniff_format

PEFT_METADATA = "lora_adapter_metadata"  # diffusers' JSON of each component's LoraConfig


class LoraError(CheckpointError):
    """A LoRA could not be read or applied; the message names the file and what was wrong."""


def listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


@dataclass(eq=False)
class Lora:
    """One add-on file, read. `name` is the file stem (what `<lora:NAME:W>` finds), `alias` the
    trainer's `ss_output_name` or the stem, `short_hash` the 12 hex A1111 writes in `Lora hashes`."""

    name: str
    alias: str
    path: Path | None
    short_hash: str
    metadata: dict[str, str]
    patches: list[Patch]
    bundled_embeddings: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def base(self) -> str | None:
        """The base the trainer names in its metadata ("SD 1.x", "SD 2.x", "SDXL"), None if it names none."""
        if self.metadata.get("ss_base_model_version", "").startswith("sdxl"):
            return "SDXL"
        return {"True": "SD 2.x", "False": "SD 1.x"}.get(self.metadata.get("ss_v2", ""))


def _kind(names: set[str]) -> str | None:
    if "down" in names or "up" in names:
        return "lora"
    for kind, prefix in (("loha", "hada_"), ("lokr", "lokr_")):
        if any(n.startswith(prefix) for n in names):
            return kind
    return "full" if "diff" in names else None


def _patch(network: str, target: str, group: dict, source: str | Path) -> Patch:
    tensors, keys, file_keys = group["tensors"], group["keys"], group["file_keys"]
    kind = _kind(set(tensors))
    if kind is None:
        raise LoraError(source, f"{listing(keys)}: no weight change beside them (a lone alpha or scale?)")
    missing = [n for n in KINDS[kind] if n not in tensors]
    stray = sorted(set(tensors) - set(KINDS[kind]) - set(OPTIONAL[kind]) - set(COMMON))
    if missing or stray:
        what = f"lacks {', '.join(missing)}" if missing else f"mixes in {', '.join(stray)}"
        raise LoraError(source, f"module {target}: its {kind} tensors are incomplete ({what}): {listing(keys)}")
    return Patch(network, target, kind, tensors, keys, file_keys=file_keys)


def _peft_configs(metadata: Mapping[str, str], source: str | Path) -> dict[str, dict]:
    """Each PEFT component's LoraConfig fields from the metadata, by network: {} without it."""
    if PEFT_METADATA not in metadata:
        return {}
    try:
        packed = json.loads(metadata[PEFT_METADATA])
    except ValueError as e:
        raise LoraError(source, f"metadata {PEFT_METADATA} is not JSON: {e}") from None
    if not isinstance(packed, dict):
        raise LoraError(source, f"metadata {PEFT_METADATA} is not a JSON object")
    configs: dict[str, dict] = {}
    for prefix, (network, _) in PEFT_NETWORKS.items():
        configs[network] = {k[len(prefix) :]: v for k, v in packed.items() if k.startswith(prefix)}
    return configs


def patches_from_state_dict(
    state: Mapping[str, torch.Tensor], metadata: Mapping[str, str], source: str | Path
) -> tuple[list[Patch], dict[str, torch.Tensor]]:
    """The patches a LoRA state dict describes, and any textual inversions bundled with it."""
    groups: dict[tuple[str, str], dict] = {}
    bundled, unknown = {}, []
    for key, tensor in state.items():
        if key.startswith(BUNDLED_EMBEDDING):
            bundled[key] = tensor
            continue
        parsed = parse_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        network, target, param, path = parsed
        group = groups.setdefault((network, target), {"tensors": {}, "keys": [], "file_keys": {}, "path": path})
        if param in group["tensors"]:
            raise LoraError(source, f"keys {group['keys'][0]} and {key} give module {target} two {param} tensors")
        group["tensors"][param] = tensor
        group["keys"].append(key)
        group["file_keys"][param] = key
    if unknown:
        raise LoraError(source, f"unsupported key(s), not a LoRA or LyCORIS tensor diffuse reads: {listing(unknown)}")
    if not groups:
        raise LoraError(source, "holds no LoRA tensors")
    configs = _peft_configs(metadata, source)
    patches = []
    for (network, target), group in groups.items():
        patch = _patch(network, target, group, source)
        if group["path"] and network in configs:
            patch.default_alpha = alpha_for(group["path"], configs[network])
        patches.append(patch)
    return patches, bundled


def lora_from_state_dict(
    state: Mapping[str, torch.Tensor],
    name: str,
    metadata: Mapping[str, str] | None = None,
    path: Path | None = None,
    short_hash: str = "",
) -> Lora:
    """A Lora from tensors in memory (a trainer's output, a test); `name` stands for the file in errors."""
    metadata = dict(metadata or {})
    source = path or name
    check_finite({key: tensor for key, tensor in state.items() if not tensor.is_meta}, source)
    patches, bundled = patches_from_state_dict(state, metadata, source)
    alias = metadata.get("ss_output_name") or name
    return Lora(name, alias, path, short_hash, metadata, patches, bundled)


def read_lora(path: str | Path) -> Lora:
    """Read a LoRA / LyCORIS file (.safetensors, .pt, .ckpt: the bytes decide) into a Lora.

    A safetensors file is checked in full (its header, every tensor finite) but only its scalars
    and bundled embeddings stay in memory: the patches' tensors are read again, module by module,
    when they are merged (Patch.loaded). A pickle is read whole, as it can only be.
    Raises CheckpointError (LoraError for LoRA-specific faults), one line naming the file."""
    path = Path(path)
    if sniff_format(path) != "safetensors":
        state, metadata, short_hash = read_addon(path)
        return lora_from_state_dict(state, path.stem, metadata, path, short_hash)
    file = SafetensorsFile(path)
    file.check_finite()
    eager = [n for n in file.names() if n.startswith(BUNDLED_EMBEDDING) or file.meta(n).numel() <= 1]
    state = {name: file.meta(name) for name in file.names()} | file.read(eager)
    lora = lora_from_state_dict(state, path.stem, file.metadata, path, short_hash_of(path, file.metadata))
    for patch in lora.patches:
        patch.source = file
    return lora
