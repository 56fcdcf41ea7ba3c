"""Renaming state-dict keys by module prefix.

Checkpoint formats differ mostly in what they call a module ("down_blocks.0.resnets.1"
vs "input_blocks.2.0"), not in the tensors below it. So each layout module
(unet_layout, vae_layout, clip_layout) states its correspondences once, as a list of
(prefix in one format, prefix in the other) pairs, and this file applies them in
either direction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

PrefixPairs = list[tuple[str, str]]


def rename_prefixes(state: Mapping[str, torch.Tensor], pairs: Iterable[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Rename every key by the longest pair whose first prefix matches it at a dot boundary.

    Keys that no pair matches keep their name, so a loader's later check reports
    them as unexpected by their original name.
    """
    table = dict(pairs)
    renamed = {}
    for key, tensor in state.items():
        parts = key.split(".")
        for cut in range(len(parts), 0, -1):
            head = ".".join(parts[:cut])
            if head in table:
                key = ".".join([table[head], *parts[cut:]]) if table[head] else ".".join(parts[cut:])
                break
        renamed[key] = tensor
    return renamed


def invert(pairs: Iterable[tuple[str, str]]) -> PrefixPairs:
    return [(b, a) for a, b in pairs]


def child_indices(state: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    """The sorted numbers n for which some key starts with f"{prefix}{n}." (e.g. prefix "encoder.layers.")."""
    indices = set()
    for key in state:
        if key.startswith(prefix):
            head = key[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                indices.add(int(head))
    return sorted(indices)


def count_numbered(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    """How many children, numbered 0..n-1, stand under `prefix`; ValueError if the numbering has gaps."""
    indices = child_indices(state, prefix)
    if indices != list(range(len(indices))):
        raise ValueError(f"{prefix}* are not numbered 0..{len(indices) - 1}: found {indices}")
    return len(indices)


def dims(state: Mapping[str, torch.Tensor], key: str, rank: int) -> torch.Size:
    """The shape of state[key], which must have `rank` dimensions; ValueError naming the tensor otherwise.

    Architectures are read off these shapes, so a missing or odd one must say which it is."""
    if key not in state:
        raise ValueError(f"no tensor {key}")
    shape = state[key].shape
    if len(shape) != rank or 0 in shape:  # an empty tensor costs no bytes but would declare a network
        raise ValueError(f"tensor {key} has shape {tuple(shape)}, not {rank} non-empty dimensions")
    return shape


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix` (e.g. "model.diffusion_model."), with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
