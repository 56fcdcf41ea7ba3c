"""Reading an add-on file: its tensors, its safetensors metadata and A1111's short hash.

The format comes from the bytes (diffuse.checkpoints.reader), pickles go through the
weights-only reader, and non-finite tensors are refused, all as for a checkpoint.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch

from diffuse.checkpoints.reader import check_finite, read_state_dict, sniff_format
from diffuse.checkpoints.safetensors_header import header_length, read_header

CHUNK = 1 << 20  # A1111 hashes in 1 MiB reads


def _sha256(path: Path, start: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        file.seek(start)
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


_BY_VERSION: dict[tuple[Path, int, int, str], str] = {}


def per_file_version(path: Path, kind: str, compute: Callable[[Path], str]) -> str:
    """compute(path), kept while the file's size and modification time stay: an add-on is hashed
    once, not again each time it is read or listed."""
    stat = path.stat()
    key = (path, stat.st_size, stat.st_mtime_ns, kind)
    if key not in _BY_VERSION:
        _BY_VERSION[key] = compute(path)
    return _BY_VERSION[key]


def addnet_hash(path: str | Path) -> str:
    """The full hash A1111 keeps for a LoRA file: for safetensors the "addnet" hash, SHA-256 of
    the bytes after the header (so editing the metadata keeps it); for a pickle, of the whole file."""
    return per_file_version(Path(path), "addnet", _addnet_hash)


def _addnet_hash(path: Path) -> str:
    if sniff_format(path) != "safetensors":
        return _sha256(path, 0)
    with open(path, "rb") as file:
        length = header_length(path, path.stat().st_size, file.read(8))
    return _sha256(path, 8 + length)


def read_addon(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """(tensors, safetensors metadata ({} for a pickle), short hash: 12 hex as A1111 shows it).

    The hash is the metadata's `sshs_model_hash` when the trainer stored one, as A1111 takes it."""
    path = Path(path)
    state = read_state_dict(path)
    check_finite(state, path)
    metadata: dict[str, str] = {}
    if sniff_format(path) == "safetensors":
        metadata = dict(read_header(path).get("__metadata__", {}))
    full = metadata.get("sshs_model_hash") or addnet_hash(path)
    return state, metadata, full[:12]
