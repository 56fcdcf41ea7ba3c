"""The add-on folders: which LoRA and embedding files they hold, their names and their hashes.

A LoRA is named in a prompt (`<lora:NAME:0.8>`) by its file stem or by the alias its
safetensors metadata gives (`ss_output_name`, as kohya writes it) when no other file shares
that alias; names are exact and case-sensitive, as in A1111. A name is only ever looked up in
this list, never turned into a path, so a prompt or an HTTP request reaches no other file.

Hashes are A1111's, computed on first use and kept while the file's size and time stay:
a LoRA's "addnet" hash (sha256 of a safetensors file's tensor data, its header left out) or
the `sshs_model_hash` that sd-scripts stores, and an embedding's sha256 of the whole file;
PNG parameters carry their first 12 hex digits.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from diffuse.adapters.files import addnet_hash, per_file_version
from diffuse.adapters.lora import read_lora
from diffuse.adapters.merge import LoraMerge
from diffuse.checkpoints.errors import CheckpointError
from diffuse.checkpoints.reader import sniff_format
from diffuse.checkpoints.safetensors_header import METADATA, read_header
from diffuse.hashes import sha256_file

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
SHORT_HASH = 12  # hex digits of an add-on's hash in PNG parameters (A1111's shorthash)

# The metadata keys A1111's /sdapi/v1/loras lists first, in its order.
_METADATA_FIRST = ("ss_sd_model_name", "ss_resolution", "ss_clip_skip", "ss_num_train_images", "ss_tag_frequency")


@dataclass(frozen=True)
class AddonFile:
    """One add-on file: `name` its stem, `alias` (LoRAs) the metadata's ss_output_name or the stem."""

    name: str
    path: Path
    alias: str
    metadata: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    def sha256(self) -> str:
        """The hash A1111 records (64 hex digits): the whole file's, computed once per file version."""
        return _cached_hash(self.path, None, "file")

    def short_hash(self) -> str:
        return self.sha256()[:SHORT_HASH]


@dataclass(frozen=True)
class LoraFile(AddonFile):
    def sha256(self) -> str:
        """sd-scripts' stored sshs_model_hash, else the addnet hash (a safetensors file's tensor data,
        a pickle's whole file; the bytes say which)."""
        return _cached_hash(self.path, self.metadata.get("sshs_model_hash"), "addnet")

    def api_entry(self) -> dict:
        """A1111's /sdapi/v1/loras entry: name, alias, path and the decoded metadata."""
        ordered = {key: self.metadata[key] for key in _METADATA_FIRST if key in self.metadata}
        ordered.update(self.metadata)
        return {"name": self.name, "alias": self.alias, "path": str(self.path), "metadata": _decoded(ordered)}


@dataclass(frozen=True)
class EmbeddingFile(AddonFile):
    """A textual-inversion file; its hash is the whole file's sha256, as A1111's "TI hashes"."""


class AddonError(ValueError):
    """An add-on named in a request or PNG that the folders cannot supply; one line, naming it."""


class AddonLibrary:
    """The LoRA and embedding files in the given folders (and their subfolders), found by looking.

    `refresh()` looks again; until then the lists stay as found. Unreadable files are kept out
    of the lists and reported in `unreadable` (path -> reason) rather than failing the scan."""

    def __init__(self, lora_dirs: Iterable[str | Path] = (), embedding_dirs: Iterable[str | Path] = ()) -> None:
        self.lora_dirs = _folders(lora_dirs, "LoRA")
        self.embedding_dirs = _folders(embedding_dirs, "embeddings")
        self.loras: list[LoraFile] = []
        self.embeddings: list[EmbeddingFile] = []
        self.unreadable: dict[Path, str] = {}
        self.refresh()

    def refresh(self) -> None:
        """Scan the folders again (files added, removed or changed since)."""
        unreadable: dict[Path, str] = {}
        loras = [_lora_entry(path, unreadable) for path in _files(self.lora_dirs, LORA_SUFFIXES)]
        embeddings = [EmbeddingFile(p.stem, p, p.stem) for p in _files(self.embedding_dirs, EMBEDDING_SUFFIXES)]
        self.loras = [entry for entry in loras if entry is not None]
        self.embeddings = embeddings
        self.unreadable = unreadable

    def find_lora(self, name: str) -> LoraFile:
        """The LoRA a prompt names: by exact stem, else by an alias no other file has."""
        by_stem = [entry for entry in self.loras if entry.name == name]
        if len(by_stem) > 1:
            paths = ", ".join(str(entry.path) for entry in by_stem)
            raise AddonError(f"LoRA name {name!r} is ambiguous: {len(by_stem)} files have it ({paths})")
        if by_stem:
            return by_stem[0]
        by_alias = [entry for entry in self.loras if entry.alias == name]
        if len(by_alias) == 1:
            return by_alias[0]
        if not self.lora_dirs:
            raise AddonError(f"unknown LoRA {name!r}: no LoRA folder was given (--lora-dir, lora_dirs=)")
        if by_alias:
            raise AddonError(f"LoRA alias {name!r} is shared by {len(by_alias)} files: name one by its file name")
        folders = ", ".join(str(folder) for folder in self.lora_dirs)
        raise AddonError(f"unknown LoRA {name!r}: no such file name or alias in {folders}")

    def lora_by_hash(self, short_hash: str) -> LoraFile | None:
        """The LoRA whose A1111 hash starts with `short_hash` (as PNG parameters record it), if any."""
        return _by_hash(self.loras, short_hash)

    def embedding_by_hash(self, short_hash: str) -> EmbeddingFile | None:
        return _by_hash(self.embeddings, short_hash)


def _folders(folders: Iterable[str | Path], what: str) -> tuple[Path, ...]:
    """The folders as absolute paths, each checked to be one (a typo must not pass as "no add-ons")."""
    if isinstance(folders, (str, Path)):
        folders = [folders]
    found = []
    for folder in folders:
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise AddonError(f"{what} folder {path} is not a folder")
        found.append(path.resolve())
    return tuple(found)


def _files(folders: Sequence[Path], suffixes: tuple[str, ...]) -> list[Path]:
    """Every non-empty file with one of `suffixes` under the folders, hidden ones left out, in a stable order."""
    found: list[Path] = []
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
            if not hidden and path.suffix.lower() in suffixes and path.is_file() and path.stat().st_size > 0:
                found.append(path)
    return found


def _lora_entry(path: Path, unreadable: dict[Path, str]) -> LoraFile | None:
    """A LoRA file's entry: the safetensors metadata read from its checked header (no tensor is read)."""
    try:
        metadata = read_header(path).get(METADATA, {}) if sniff_format(path) == "safetensors" else {}
    except (CheckpointError, OSError) as e:
        unreadable[path] = str(e)
        return None
    alias = metadata.get("ss_output_name") or path.stem
    return LoraFile(path.stem, path, alias, dict(metadata))


def _decoded(metadata: dict[str, str]) -> dict:
    """As A1111 answers: a value that starts with "{" is JSON-decoded when it can be."""
    decoded: dict = {}
    for key, value in metadata.items():
        if value.startswith("{"):
            try:
                decoded[key] = json.loads(value)
                continue
            except ValueError:
                pass
        decoded[key] = value
    return decoded


def _by_hash(entries: Sequence[AddonFile], short_hash: str):
    short_hash = short_hash.strip().lower()
    if len(short_hash) < 8:  # too short to tell files apart
        return None
    return next((entry for entry in entries if entry.sha256().startswith(short_hash)), None)


def _cached_hash(path: Path, stored: str | None, kind: str) -> str:
    """`stored` (sd-scripts' sshs_model_hash) when given, else the file's hash of `kind`, read once per version."""
    if stored:
        return stored.lower()
    return addnet_hash(path) if kind == "addnet" else per_file_version(path, kind, sha256_file)


@dataclass(frozen=True)
class LoraUse:
    """A LoRA file to merge with its text-encoder and UNet weights."""

    file: LoraFile
    te_weight: float
    unet_weight: float

    def key(self) -> tuple:
        # The file's size and time stand for its contents: a file replaced in place is read again.
        stat = self.file.path.stat()
        return (self.file.path, stat.st_size, stat.st_mtime_ns, self.te_weight, self.unet_weight)


class MergedLoras:
    """The LoRAs merged into a pipeline's networks now, and the way back to its own weights.

    `use(set)` keeps the merge when the set is the one merged already (so repeated generations
    cost no reading or merging), and otherwise restores the networks exactly before merging the
    new set (diffuse.adapters.merge). Every new file is read and checked before the networks are
    touched: a refused set leaves the one merged before in place."""

    def __init__(self, networks: dict) -> None:
        self._merge = LoraMerge(networks)  # {"unet": ..., "text_encoder": ...}; its module index is built on first use
        self._key: tuple = ()

    @property
    def active(self) -> tuple:
        """(path, size, mtime, te weight, unet weight) of each LoRA merged now."""
        return self._key

    def use(self, uses: Sequence[LoraUse]) -> None:
        key = tuple(use.key() for use in uses)
        if key == self._key:
            return
        loras = [(read_lora(use.file.path), use.te_weight, use.unet_weight) for use in uses]
        try:
            self._merge.apply(loras)
        except BaseException:
            # A refusal before the merge began leaves the set merged before; a failure during it
            # leaves the networks' own weights, and the key must not claim otherwise.
            if not self._merge.applied:
                self._key = ()
            raise
        self._key = key

    def restore(self) -> None:
        """The networks' own weights back, bit for bit."""
        self._merge.restore()
        self._key = ()
