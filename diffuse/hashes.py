"""What a model and an input picture hash to: A1111's short model hash and a full sha256.

A single-file checkpoint's full hash is the file's sha256, and A1111's "Model hash"
(AutoV2) is its first 10 hex digits, so one read of the file gives both. A diffusers folder
has no single file: its full hash covers every file of every component that
model_index.json names (weights, configs, tokenizer, scheduler) with its relative path, so a
changed VAE, text encoder or tokenizer changes it; its short hash stays A1111-style, the
UNet weights file's.

Reading a multi-GB checkpoint takes seconds, and every process that makes an image needs its
hash, so large files' hashes are kept in the user's cache folder (diffuse.user_cache), each
under what changes whenever the file does: its device, inode, size, modification and change
times. The change time cannot be set back by a program, and a hash is only kept once the file
has been still for a moment, so a file written twice within one clock tick is read again.
DIFFUSE_HASH_CACHE=0 reads every file every time.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from diffuse.user_cache import cache_folder

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


HASH_CACHE_FILE = "file-hashes.json"
HASH_CACHE_ENTRIES = 2048  # the most recently hashed files kept
HASH_CACHE_MIN_BYTES = 16 << 20  # smaller files are read faster than the cache is
SETTLED_SECONDS = 2.0  # how long a file's change time must lie in the past before its hash is kept


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """sha256 of a whole file: from the hash cache where the file is unchanged since it was read, else
    read in chunks so a multi-GB checkpoint never sits in memory."""
    before = os.stat(path)
    if before.st_size < HASH_CACHE_MIN_BYTES or os.environ.get("DIFFUSE_HASH_CACHE") == "0":
        return _read_sha256(path, chunk_size)
    key, stamp = os.path.realpath(path), _stamp(before)
    entries = _cached_hashes()
    if entries.get(key, {}).get("stamp") == stamp:
        return entries[key]["sha256"]
    digest = _read_sha256(path, chunk_size)
    settled = time.time_ns() - before.st_ctime_ns >= SETTLED_SECONDS * 1e9
    if settled and _stamp(os.stat(path)) == stamp:  # not written meanwhile
        _keep_hash(key, stamp, digest)
    return digest


def _read_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp(stat: os.stat_result) -> list[int]:
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def _cached_hashes() -> dict:
    """The cache's entries; an unreadable or malformed cache counts as empty (it is made again)."""
    try:
        entries = json.loads((cache_folder() / HASH_CACHE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _keep_hash(key: str, stamp: list[int], digest: str) -> None:
    """Adds an entry, dropping the oldest past HASH_CACHE_ENTRIES, replacing the file atomically;
    a cache that cannot be written is left alone (the hash is simply read again next time)."""
    entries = _cached_hashes()
    entries.pop(key, None)
    entries[key] = {"stamp": stamp, "sha256": digest}
    entries = dict(list(entries.items())[-HASH_CACHE_ENTRIES:])
    folder = cache_folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(entries, f)
        os.replace(temp, folder / HASH_CACHE_FILE)
    except OSError:
        Path(temp).unlink(missing_ok=True)


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
