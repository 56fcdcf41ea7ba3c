"""Textual-inversion embeddings: files of learned token vectors that a prompt uses by name.

An embedding is n vectors [n, D] in the text encoder's token space (D = 768 for SD1's
CLIP-L, 1024 for SD2's OpenCLIP-H). Writing its name in a prompt or negative prompt puts
its vectors where the name's tokens were (diffuse.prompts does the matching and packing).

Formats, decided from the file's bytes through diffuse.checkpoints' safe readers (a
pickle only ever goes through torch's weights-only unpickler; nothing in it runs):
  - A1111 `.pt`: {"string_to_param": {"*": [n, D]}, "name", "step", "sd_checkpoint",
    "sd_checkpoint_name", ...}, exactly one vector entry; a pickled ParameterDict in its
    place (files saved by torch 1.11) is read through an inert stand-in for its class.
  - sd-scripts `.safetensors`: {"emb_params": [n, D]}.
  - diffusers `learned_embeds.bin` / `.safetensors`: {token: [D] or [n, D]}.
An SDXL embedding ({"clip_l": [n, 768], "clip_g": [n, 1280]}, as sd-scripts writes it) holds
one half per text encoder, for the same n token slots: read_sdxl_embedding / load_sdxl_embeddings
read it, and `per_encoder` gives each encoder its half (CLIP-L's clip_l, bigG's clip_g), as A1111
and diffusers' two load_textual_inversion calls put them. SD1/SD2 models refuse it.

Public API:
  read_embedding(path, name=None) -> Embedding        one file; its name is the file's stem
  load_embeddings(dirs, width) -> (loaded, skipped)   every embedding file under the folders,
      loaded: {name: Embedding} that fit a text encoder `width` wide, skipped: {name: reason}
      (A1111's "skipped" list: another width, an unreadable file, a name taken twice)
  embeddings_used(tokenizer, texts, embeddings) -> [name]   those the prompts use, in order
  read_sdxl_embedding(path, widths, name=None) -> SDXLEmbedding   both halves, widths checked
      (widths[0] None: the refiner, which has no CLIP-L, takes clip_g alone)
  load_sdxl_embeddings(dirs, widths) -> (loaded, skipped)   the same for an SDXL model's two
      encoders, widths = (CLIP-L's, bigG's)
  per_encoder(embeddings) -> ({name: Embedding}, {name: Embedding})   each encoder's half
Errors are diffuse.checkpoints' CheckpointError (a ValueError; EmbeddingError and
UnsafeCheckpointError are kinds of it): one line naming the file and what was wrong.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from diffuse.checkpoints.errors import CheckpointError
from diffuse.checkpoints.reader import check_finite, read_state_dict, read_torch_object, sniff_format
from diffuse.checkpoints.zip_records import check_zip_records
from diffuse.hashes import sha256_file
from diffuse.prompts import prompt_chunks
from diffuse.tokenizer import CLIPTokenizer

T = TypeVar("T")

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")  # A1111 also reads embeddings hidden in images: not here
MAX_VECTORS = 75  # one prompt chunk; more could never be placed
PARAMETER_DICT = "torch.nn.modules.container.ParameterDict"


class EmbeddingError(CheckpointError):
    """An embedding file could not be used; the message names the file and the problem."""


@dataclass(frozen=True, eq=False)
class Embedding:
    """One textual-inversion embedding: its name (as written in prompts), vectors and provenance.

    `step`, `sd_checkpoint` (the training model's short hash) and `sd_checkpoint_name` are kept
    from A1111 files for its /sdapi/v1/embeddings listing; other formats leave them None.
    """

    name: str
    vectors: torch.Tensor  # [n, D] float32
    path: Path | None  # None for one made in memory (training, tests)
    sha256: str  # of the whole file
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None

    @property
    def width(self) -> int:
        return self.vectors.shape[1]

    @property
    def count(self) -> int:
        """How many token slots it takes in a prompt chunk."""
        return self.vectors.shape[0]

    @property
    def short_hash(self) -> str:
        """A1111's embedding hash (PNG "TI hashes"): the first 12 hex digits of the file's sha256."""
        return self.sha256[:12]

    def api_entry(self) -> dict:
        """This embedding as A1111's /sdapi/v1/embeddings lists it."""
        return {
            "step": self.step,
            "sd_checkpoint": self.sd_checkpoint,
            "sd_checkpoint_name": self.sd_checkpoint_name,
            "shape": self.width,
            "vectors": self.count,
        }


class _InertParameterDict:
    """Stands in for a pickled torch.nn.ParameterDict: keeps its `_parameters` (tensors by name)
    and nothing else, so no torch.nn code runs while the file is read."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __setstate__(self, state):
        parameters = state.get("_parameters") if isinstance(state, dict) else None
        self._parameters = parameters if isinstance(parameters, Mapping) else {}


def _read_contents(path: Path) -> Mapping:
    """The file's top-level dict: tensors for safetensors, the unpickled (inert) dict for a pickle."""
    fmt = sniff_format(path)
    if fmt == "safetensors":
        return read_state_dict(path)
    if fmt == "torch-zip":
        check_zip_records(path)
    with torch.serialization.safe_globals([(_InertParameterDict, PARAMETER_DICT)]):
        loaded = read_torch_object(path, is_zip=fmt == "torch-zip")
    if not isinstance(loaded, Mapping):
        raise EmbeddingError(path, f"holds a {type(loaded).__name__}, not a dict")
    return loaded


def _vectors_of(contents: Mapping, path: Path) -> torch.Tensor:
    """The one [n, D] (or [D]) tensor of an A1111, sd-scripts or diffusers embedding file."""
    if "string_to_param" in contents:
        params = contents["string_to_param"]
        params = getattr(params, "_parameters", params)  # the ParameterDict stand-in
        if not isinstance(params, Mapping) or len(params) != 1:
            raise EmbeddingError(path, "string_to_param must hold exactly one tensor (an A1111 embedding)")
        (vectors,) = params.values()
    elif "clip_l" in contents and "clip_g" in contents:
        raise EmbeddingError(path, "is an SDXL embedding (clip_l + clip_g); SD1/SD2 models take one text encoder's")
    else:
        tensors = [value for value in contents.values() if isinstance(value, torch.Tensor)]
        if len(tensors) != 1:
            keys = ", ".join(sorted(map(str, contents))[:6])
            raise EmbeddingError(
                path,
                f"not a textual-inversion embedding: expected string_to_param, emb_params or one token's "
                f"tensor, found {len(tensors)} tensors (keys: {keys})",
            )
        (vectors,) = tensors
    if not isinstance(vectors, torch.Tensor):
        raise EmbeddingError(path, f"its vectors are a {type(vectors).__name__}, not a tensor")
    return vectors


def _checked_vectors(vectors: torch.Tensor, path: Path) -> torch.Tensor:
    vectors = vectors.detach()
    if vectors.dim() == 1:
        vectors = vectors[None]  # a diffusers single-vector token
    if not vectors.is_floating_point() or vectors.dim() != 2 or 0 in vectors.shape:
        raise EmbeddingError(path, f"its vectors are {vectors.dtype} {tuple(vectors.shape)}; expected floats [n, D]")
    if vectors.shape[0] > MAX_VECTORS:
        raise EmbeddingError(path, f"has {vectors.shape[0]} vectors; a prompt chunk holds {MAX_VECTORS}")
    check_finite({"vectors": vectors}, path)
    return vectors.to(torch.float32).contiguous()


def _text_field(contents: Mapping, key: str) -> str | None:
    value = contents.get(key)
    return value if isinstance(value, str) else None


def read_embedding(path: str | os.PathLike, name: str | None = None) -> Embedding:
    """One embedding file; its name is `name`, or the file's stem (as A1111 names them)."""
    path = Path(path)
    contents = _read_contents(path)
    vectors = _checked_vectors(_vectors_of(contents, path), path)
    step = contents.get("step")
    return Embedding(
        name=path.stem if name is None else name,
        vectors=vectors,
        path=path,
        sha256=sha256_file(path),
        step=step if isinstance(step, int) and not isinstance(step, bool) else None,
        sd_checkpoint=_text_field(contents, "sd_checkpoint"),
        sd_checkpoint_name=_text_field(contents, "sd_checkpoint_name"),
    )


def embedding_files(dirs: Iterable[str | os.PathLike]) -> list[Path]:
    """Embedding files under the folders (subfolders too): folder by folder in the order given, each
    one's files in path order; empty files are left out, as A1111 does."""
    found: list[Path] = []
    for folder in map(Path, dirs):
        if not folder.is_dir():
            raise EmbeddingError(folder, "is not a folder of embeddings")
        in_folder = [
            Path(root, file_name)
            for root, _, names in os.walk(folder, followlinks=True)
            for file_name in names
            if Path(file_name).suffix.lower() in EMBEDDING_SUFFIXES
        ]
        found += sorted(path for path in in_folder if path.stat().st_size > 0)
    return found


def load_embeddings(dirs: Iterable[str | os.PathLike], width: int) -> tuple[dict[str, Embedding], dict[str, str]]:
    """Every embedding under `dirs` for a text encoder whose token vectors are `width` wide.

    Returns (loaded, skipped): loaded maps each name (file stem) to its Embedding; skipped
    maps the name of each file that cannot be used to why (another width, an unreadable or
    refused file, or a name an earlier file, in path order, already has).
    """

    def read(path: Path) -> Embedding:
        embedding = read_embedding(path)
        if embedding.width != width:
            raise CheckpointError(path, f"vectors are {embedding.width} wide; this model's text encoder takes {width}")
        return embedding

    return _load_each(dirs, read)


def _load_each(dirs: Iterable[str | os.PathLike], read: Callable[[Path], T]) -> tuple[dict[str, T], dict[str, str]]:
    """read(path) for every embedding file under `dirs`, by file stem: (loaded, skipped with the reason)."""
    loaded: dict[str, T] = {}
    skipped: dict[str, str] = {}
    for path in embedding_files(dirs):
        name = path.stem
        if name in loaded or name in skipped:
            skipped.setdefault(name, f"{path}: the name {name!r} is taken by another file")
            continue
        try:
            loaded[name] = read(path)
        except CheckpointError as e:
            skipped[name] = str(e)
    return loaded, skipped


def embeddings_used(tokenizer: CLIPTokenizer, texts: Iterable[str], embeddings: Mapping[str, Embedding]) -> list[str]:
    """The names of the embeddings the prompts use (as diffuse.prompts matches them), first use first."""
    used: dict[str, None] = {}
    for text in dict.fromkeys(texts):
        for chunk in prompt_chunks(tokenizer, text, embeddings):
            used.update((name, None) for _, name in chunk.fixes)
    return list(used)


# ---- SDXL: one half per text encoder -------------------------------------------------------------

SDXL_HALVES = ("clip_l", "clip_g")  # the first encoder's (CLIP-L) half, then the second's (bigG)


@dataclass(frozen=True, eq=False)
class SDXLEmbedding:
    """An SDXL embedding: `halves` are the Embeddings for the first and the second text encoder,
    named alike and with as many vectors each (the same token slots in both encoders' prompts)."""

    name: str
    halves: tuple[Embedding, Embedding]

    @property
    def vectors(self) -> torch.Tensor:
        """Both halves side by side [n, clip_g + clip_l width], bigG's first, as A1111 lists an SDXL
        embedding's shape; a prompt's matching needs only n. Each encoder reads its half (per_encoder)."""
        return torch.cat([self.halves[1].vectors, self.halves[0].vectors], dim=1)

    @property
    def count(self) -> int:
        return self.halves[0].count

    @property
    def width(self) -> int:
        """Both halves' widths together, as A1111's listing gives an SDXL embedding's shape."""
        return sum(half.width for half in self.halves)

    @property
    def short_hash(self) -> str:
        return self.halves[0].short_hash

    # Training provenance, as A1111's listing gives it: safetensors files record none.
    step = property(lambda self: self.halves[0].step)
    sd_checkpoint = property(lambda self: self.halves[0].sd_checkpoint)
    sd_checkpoint_name = property(lambda self: self.halves[0].sd_checkpoint_name)

    def api_entry(self) -> dict:
        return self.halves[0].api_entry() | {"shape": self.width}


def read_sdxl_embedding(
    path: str | os.PathLike, widths: tuple[int | None, int], name: str | None = None
) -> SDXLEmbedding:
    """An SDXL embedding file {"clip_l": [n, widths[0]], "clip_g": [n, widths[1]]}; EmbeddingError
    (one line naming the file) when a half is missing, has another width, or the counts differ.
    widths[0] None: a model without CLIP-L (the refiner), whose clip_l width is not checked."""
    path = Path(path)
    contents = _read_contents(path)
    missing = [key for key in SDXL_HALVES if key not in contents]
    if missing:
        keys = ", ".join(sorted(map(str, contents))[:6])
        raise EmbeddingError(
            path, f"an SDXL embedding needs clip_l and clip_g; it lacks {' and '.join(missing)} (keys: {keys})"
        )
    name = path.stem if name is None else name
    digest = sha256_file(path)
    halves = []
    for key, width in zip(SDXL_HALVES, widths, strict=True):
        vectors = contents[key]
        if not isinstance(vectors, torch.Tensor):
            raise EmbeddingError(path, f"its {key} is a {type(vectors).__name__}, not a tensor")
        vectors = _checked_vectors(vectors, path)
        if width is not None and vectors.shape[1] != width:
            raise EmbeddingError(
                path, f"its {key} vectors are {vectors.shape[1]} wide; this model's encoder takes {width}"
            )
        halves.append(Embedding(name=name, vectors=vectors, path=path, sha256=digest))
    if halves[0].count != halves[1].count:
        raise EmbeddingError(
            path, f"clip_l has {halves[0].count} vectors and clip_g {halves[1].count}; they must agree"
        )
    return SDXLEmbedding(name, (halves[0], halves[1]))


def load_sdxl_embeddings(
    dirs: Iterable[str | os.PathLike], widths: tuple[int | None, int]
) -> tuple[dict[str, SDXLEmbedding], dict[str, str]]:
    """Every embedding under `dirs` for an SDXL model whose encoders are `widths` wide: (loaded, skipped)
    as load_embeddings gives them; a one-encoder (SD 1/2) file is skipped with the reason."""
    return _load_each(dirs, lambda path: read_sdxl_embedding(path, widths))


def per_encoder(embeddings: Mapping[str, SDXLEmbedding]) -> tuple[dict[str, Embedding], dict[str, Embedding]]:
    """The embeddings each SDXL text encoder reads, by name: the first encoder's halves, the second's."""
    return (
        {name: e.halves[0] for name, e in embeddings.items()},
        {name: e.halves[1] for name, e in embeddings.items()},
    )
