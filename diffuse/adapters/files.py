"""Reading an add-on file: its tensors, its safetensors metadata and A1111's short hash.

The format comes from the bytes (diffuse.checkpoints.reader), pickles go through the
weights-only reader, and non-finite tensors are refused, all as for a checkpoint. A
safetensors file can also be read a few tensors at a time (SafetensorsFile), from the offsets
of its checked header, so a LoRA is merged module by module without all of it in memory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch

from diffuse.checkpoints.errors import CheckpointError
from diffuse.checkpoints.reader import check_finite, read_state_dict, sniff_format
from diffuse.checkpoints.safetensors_header import METADATA, TORCH_DTYPES, header_length, read_header

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
    return state, metadata, short_hash_of(path, metadata)


def short_hash_of(path: Path, metadata: dict[str, str]) -> str:
    """The 12 hex A1111 shows for an add-on: sd-scripts' stored `sshs_model_hash`, else the addnet hash's."""
    return (metadata.get("sshs_model_hash") or addnet_hash(path))[:12]


FINITE_CHECK_BYTES = 64 << 20  # tensors read per batch while checking a whole file


class SafetensorsFile:
    """A safetensors file whose header is checked now and whose tensors are read when asked for.

    `meta(name)` is a tensor's shape and dtype on the meta device; `read(names)` reads those
    tensors from their offsets (each into memory of its own, nothing mapped) and refuses
    non-finite values naming the file and the tensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        header = read_header(self.path)
        self.metadata: dict[str, str] = dict(header.get(METADATA, {}))
        self.entries: dict[str, dict] = {name: entry for name, entry in header.items() if name != METADATA}
        for name, entry in self.entries.items():
            if entry["dtype"] not in TORCH_DTYPES:
                raise CheckpointError(self.path, f"tensor {name}: dtype {entry['dtype']} is not one an add-on holds")
        with open(self.path, "rb") as file:
            self.data_start = 8 + header_length(self.path, self.path.stat().st_size, file.read(8))

    def names(self) -> list[str]:
        return list(self.entries)

    def meta(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        return torch.empty(entry["shape"], dtype=TORCH_DTYPES[entry["dtype"]], device="meta")

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        tensors = {}
        with open(self.path, "rb") as file:
            for name in names:
                entry = self.entries[name]
                start, end = entry["data_offsets"]
                raw = torch.empty(end - start, dtype=torch.uint8)
                file.seek(self.data_start + start)
                if end > start and file.readinto(memoryview(raw.numpy())) != end - start:
                    raise CheckpointError(self.path, f"truncated since it was opened: tensor {name} cannot be read")
                tensors[name] = raw.view(TORCH_DTYPES[entry["dtype"]]).reshape(entry["shape"])
        check_finite(tensors, self.path)
        return tensors

    def check_finite(self) -> None:
        """Refuse the file if any tensor holds a NaN or an infinity; reads it a batch at a time,
        once per file version (an unchanged file is not read again)."""
        per_file_version(self.path, "finite", self._check_all)

    def _check_all(self, path: Path) -> str:
        batch, size = [], 0
        for name, entry in sorted(self.entries.items(), key=lambda item: item[1]["data_offsets"][0]):
            batch.append(name)
            size += entry["data_offsets"][1] - entry["data_offsets"][0]
            if size >= FINITE_CHECK_BYTES:
                self.read(batch)
                batch, size = [], 0
        self.read(batch)
        return "finite"
