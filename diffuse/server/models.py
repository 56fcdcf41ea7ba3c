"""The models a server offers, and the one it has loaded.

The list is made when the server starts: the model it was started with, and every checkpoint
in its --models-dir (diffusers folders, .safetensors and .ckpt files, found by looking, one
level deep). A request names a model only by something from that list (A1111's title
"name [hash]", the name, or the short hash); it is never turned into a path, so nothing a
client sends reaches the filesystem.

Switching loads the new model first and swaps it in only when the load succeeded: a
checkpoint that fails to load leaves the current model in place, and the error says why.

A request may also name an SDXL refiner (A1111's refiner_checkpoint), from the same list and
loaded by the same rules; it is kept for the next request that names it. The host holds at most
two models at once, loads included: the kept refiner is let go before another model loads
(a refiner that the new current model is, is moved over rather than loaded twice).

Every model loads with the server's dtype, device and quantization (`serve --quantize int8`),
so a switch or a refiner never changes them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from diffuse.loader import load_pipeline, model_paths
from diffuse.metadata import model_hash, sha256_file
from diffuse.pipeline import Pipeline

T = TypeVar("T")


class UnknownModel(LookupError):
    """No listed model has that title, name or hash."""


class NotARefiner(ValueError):
    """A refiner_checkpoint that is no SDXL model (base or refiner), so it cannot take over SDXL latents."""


@dataclass(frozen=True)
class ModelEntry:
    path: Path
    name: str  # the folder's name, or the file's without its extension (A1111's model_name)
    short_hash: str  # A1111's AutoV2 hash (10 hex digits)

    @property
    def title(self) -> str:
        """A1111's "title": the file name (a folder's name) and the short hash."""
        shown = self.path.name if self.path.is_file() else self.name
        return f"{shown} [{self.short_hash}]"

    def matches(self, wanted: str) -> bool:
        wanted = wanted.strip()
        return wanted in (self.title, self.name, self.path.name, self.short_hash)


def find_models(default: Path, models_dir: Path | None) -> list[ModelEntry]:
    """The model the server starts with, then every checkpoint in `models_dir`, sorted by name."""
    paths = [default]
    if models_dir is not None:
        if not models_dir.is_dir():
            raise ValueError(f"--models-dir {models_dir} is not a folder")
        paths += [path for path in model_paths(models_dir) if path.resolve() != default.resolve()]
    return [ModelEntry(path, path.stem if path.is_file() else path.name, model_hash(path)) for path in paths]


class ModelHost:
    """The listed models, the loaded pipeline and the kept refiner; switch() is safe to call while
    others read `pipe`."""

    def __init__(
        self,
        entries: list[ModelEntry],
        dtype: str = "auto",
        device: str = "cpu",
        lora_dirs: tuple[Path, ...] = (),
        embedding_dirs: tuple[Path, ...] = (),
        quantize: str | None = None,
    ) -> None:
        if not entries:
            raise ValueError("no model to serve")
        self.entries, self.dtype, self.device, self.quantize = entries, dtype, device, quantize
        self.addon_dirs = {"lora_dirs": lora_dirs, "embedding_dirs": embedding_dirs}  # every model gets the same
        self._lock = threading.Lock()
        self._sha256: dict[ModelEntry, str | None] = {}
        self.current = entries[0]
        self.pipe: Pipeline = self._load(self.current)
        self.refiner_entry: ModelEntry | None = None  # the refiner kept from the last request that named one
        self._refiner: Pipeline | None = None
        self._not_sdxl: set[ModelEntry] = set()  # asked for as refiners and found not SDXL: not loaded again

    def find(self, wanted: str) -> ModelEntry:
        for entry in self.entries:
            if entry.matches(wanted):
                return entry
        raise UnknownModel(f"no model {wanted!r} on this server; GET /sdapi/v1/sd-models lists them")

    def switch(self, wanted: str) -> ModelEntry:
        """Load the named model and make it current; on any failure the current one stays."""
        entry = self.find(wanted)
        with self._lock:
            if entry != self.current:
                kept = self._refiner if entry == self.refiner_entry else None
                self._refiner = self.refiner_entry = None  # let go first: two models at most while loading
                pipe = kept if kept is not None else self._load(entry)  # raises: the current model stays
                self.pipe, self.current = pipe, entry
        return entry

    def refiner(self, wanted: str | None) -> Pipeline | None:
        """The loaded refiner a request names; None for none, or for the current model itself, which
        A1111 does not hand over to. NotARefiner (a ValueError) when either model is not SDXL."""
        if wanted is None:
            return None
        entry = self.find(wanted)
        if entry == self.current:
            return None
        if not self.pipe.is_xl:
            raise NotARefiner(
                f"refiner_checkpoint: the model {self.current.title} is not SDXL, which a refiner continues"
            )
        with self._lock:
            if entry != self.refiner_entry:
                self._refiner = self.refiner_entry = None  # let go first: two models at most while loading
                pipe = None if entry in self._not_sdxl else self._load(entry)
                if pipe is None or not pipe.is_xl:
                    self._not_sdxl.add(entry)
                    raise NotARefiner(
                        f"refiner_checkpoint: {entry.title} is not an SDXL model; a refiner must be an SDXL "
                        "refiner or base"
                    )
                self._refiner, self.refiner_entry = pipe, entry
            return self._refiner

    def _load(self, entry: ModelEntry) -> Pipeline:
        return load_pipeline(
            entry.path, dtype=self.dtype, device=self.device, quantize=self.quantize, **self.addon_dirs
        )

    def run_on(self, wanted: str | None, restore: bool, work: Callable[[Pipeline], T]) -> T:
        """work(pipe) on the named model (None: the current one); with `restore`, the model that was
        current is loaded back afterwards, as A1111 undoes a request's override_settings."""
        if wanted is None:
            return work(self.pipe)
        previous = self.current
        self.switch(wanted)
        try:
            return work(self.pipe)
        finally:
            if restore:
                self.switch(previous.title)

    def sha256(self, entry: ModelEntry) -> str | None:
        """The whole file's sha256 for a single-file checkpoint (A1111's sd_checkpoint_hash); None for a folder.
        Read once per model: a checkpoint is gigabytes, and clients ask for the options often."""
        if entry not in self._sha256:
            self._sha256[entry] = sha256_file(entry.path) if entry.path.is_file() else None
        return self._sha256[entry]
