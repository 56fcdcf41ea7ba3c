"""What a model and an input picture hash to: A1111's short model hash and a full sha256.

A single-file checkpoint's full hash is the file's sha256, and A1111's "Model hash"
(AutoV2) is its first 10 hex digits, so one read of the file gives both. A diffusers folder
has no single file: its full hash covers every file of every component that
model_index.json names (weights, configs, tokenizer, scheduler) with its relative path, so a
changed VAE, text encoder or tokenizer changes it; its short hash stays A1111-style, the
UNet weights file's.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

# For a diffusers folder: the UNet is the part that makes one model differ from another
# (fine-tunes share text encoder and VAE), so its weights file stands for the model.
DIFFUSERS_UNET_WEIGHTS = (
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.fp16.bin",
)


@dataclass(frozen=True)
class ModelHashes:
    short: str  # A1111's "Model hash": 10 hex digits
    sha256: str  # the whole model's sha256: 64 hex digits


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """sha256 of a whole file, read in chunks so a multi-GB checkpoint never sits in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _unet_weights(folder: Path) -> Path:
    found = next((folder / name for name in DIFFUSERS_UNET_WEIGHTS if (folder / name).is_file()), None)
    if found is None:
        raise ValueError(
            f"{folder} is a folder without UNet weights to hash (looked for {', '.join(DIFFUSERS_UNET_WEIGHTS)})"
        )
    return found


def model_hash(path: str | os.PathLike) -> str:
    """A1111's "Model hash" (AutoV2): the first 10 hex digits of the sha256 of the whole file.

    A single-file checkpoint hashes to exactly what A1111 shows. A diffusers folder has no
    single file, so its UNet weights file is hashed instead (the first of
    unet/diffusion_pytorch_model{,.fp16}.{safetensors,bin} that exists).
    """
    path = Path(path)
    if path.is_dir():
        return sha256_file(_unet_weights(path))[:10]
    if not path.is_file():
        raise ValueError(f"cannot hash model {path}: no such file or folder")
    return sha256_file(path)[:10]


def _component_files(folder: Path) -> list[Path]:
    """model_index.json and every non-hidden file under the component folders it names."""
    index = folder / "model_index.json"
    names: list[str] = []
    if index.is_file():
        try:
            entries = json.loads(index.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot hash model {folder}: model_index.json is not valid JSON ({e})") from None
        if isinstance(entries, dict):
            names = [k for k, v in entries.items() if not k.startswith("_") and isinstance(v, list) and v[:1] != [None]]
    names = sorted(set(names) | {"unet"})  # the UNet is always a part, even without an index
    files = [index] if index.is_file() else []
    for name in names:
        component = folder / name
        if component.is_dir():
            files += sorted(
                p
                for p in component.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
            )
    return files


def model_hashes(path: str | os.PathLike) -> ModelHashes:
    """Both hashes of a model file or diffusers folder, every file read once.

    A folder's sha256 is that of the lines "<sha256 of file>  <path relative to the folder>"
    (sorted by path, '/' separators, as `sha256sum` prints them), one per file.
    """
    path = Path(path)
    if path.is_file():
        full = sha256_file(path)
        return ModelHashes(full[:10], full)
    if not path.is_dir():
        raise ValueError(f"cannot hash model {path}: no such file or folder")
    unet = _unet_weights(path)
    lines, short = [], None
    for file in _component_files(path):
        digest = sha256_file(file)
        if file == unet:
            short = digest[:10]
        lines.append(f"{digest}  {file.relative_to(path).as_posix()}\n")
    lines.sort(key=lambda line: line[66:])
    if short is None:  # not listed (unet/ reached through a link rglob does not follow): hash it alone
        short = sha256_file(unet)[:10]
    return ModelHashes(short, hashlib.sha256("".join(lines).encode("utf-8")).hexdigest())
