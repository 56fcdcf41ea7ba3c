"""Reading a checkpoint file into a flat {name: tensor} dict, without trusting it.

The format is decided from the file's bytes, never its name: downloads get renamed,
and a .ckpt/.pt/.bin is a pickle that could run code when loaded. Pickles are only
ever read by torch's weights-only unpickler, given a short list of inert stand-ins
for the harmless training metadata real SD checkpoints carry beside the weights.
Every failure is a CheckpointError that names the file and says what was wrong.
"""

from __future__ import annotations

import contextlib
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from diffuse.checkpoints.errors import CheckpointError, UnsafeCheckpointError
from diffuse.checkpoints.safetensors_header import header_length, read_header
from diffuse.checkpoints.zip_records import check_zip_records

LFS_POINTER = b"version https://git-lfs.github.com/spec/"


class _InertMetadata:
    """Stands in for a metadata global of a training checkpoint (a Lightning callback,
    a numpy scalar or its dtype). It takes any arguments and state and keeps none of
    them, so no code of those packages runs and nothing of them reaches the weights."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


# Globals besides the tensors that SD's original Lightning .ckpt files pickle.
ALLOWED_METADATA_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",  # under "callbacks"
    "numpy.core.multiarray.scalar",  # a numpy scalar (e.g. "global_step"), as numpy 1.x names it
    "numpy._core.multiarray.scalar",  # ... and as numpy 2.x names it
    "numpy.dtype",  # the scalar's dtype
)
_STAND_INS = [(_InertMetadata, name) for name in ALLOWED_METADATA_GLOBALS]


# ---------------------------------------------------------------- format sniffing


def sniff_format(path: str | Path) -> str:
    """ "safetensors", "torch-zip" or "torch-legacy", decided from the first bytes."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "no such file")
    if path.is_dir():
        raise CheckpointError(path, "is a directory, not a checkpoint file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            head = file.read(1024)
    except OSError as e:
        raise CheckpointError(path, f"cannot be read: {e.strerror or e}") from e
    if size == 0:
        raise CheckpointError(path, "empty file (0 bytes)")
    if head.startswith(LFS_POINTER):
        raise CheckpointError(
            path,
            "is a Git LFS pointer file, not the weights: the real file was never "
            "fetched (run `git lfs pull` in its repository, or download it directly)",
        )
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<") and (b"<html" in text or b"<!doctype html" in text):
        raise CheckpointError(path, "is an HTML page, not a checkpoint (a failed or login-walled download?)")
    if size < 8:
        raise CheckpointError(path, f"too short to be a checkpoint ({size} bytes)")
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"  # torch.save's zip format (the usual .ckpt/.pt/.bin)
    if head[0] == 0x80 and 2 <= head[1] <= 5:
        return "torch-legacy"  # a bare pickle stream: torch.save's old non-zip format
    if head[8:9] == b"{":  # safetensors: u64 header length, then a JSON object
        header_length(path, size, head)  # refused here, unread, when over the cap or past the file's end
        return "safetensors"
    raise CheckpointError(
        path, f"unrecognized format, first bytes {head[:16]!r} (expected safetensors or a torch.save checkpoint)"
    )


# ---------------------------------------------------------------- safetensors


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    # The header is checked in full first (diffuse.checkpoints.safetensors_header), so a cut-off
    # or malformed file fails naming its fault rather than with a low-level error from the library.
    read_header(path)
    try:
        return load_file(path, device="cpu")
    except Exception as e:
        raise CheckpointError(path, f"corrupt safetensors file: {e}") from e


# ---------------------------------------------------------------- torch pickles


def _refused(path: Path, message: str) -> UnsafeCheckpointError:
    """The weights-only unpickler stopped before running anything; say which global it met."""
    blocked = re.search(r"GLOBAL (\S+) whose module \S+ is blocked", message)
    unknown = re.search(r"GLOBAL (\S+) was not an allowed global", message)
    if blocked or unknown:
        name = (blocked or unknown).group(1)
        if unknown and "." not in name:
            name = f"builtins.{name}"  # torch's message drops the "builtins." of e.g. builtins.eval
        return UnsafeCheckpointError(
            path,
            f"refused: its pickle calls {name}, which is not tensor data "
            "(nothing was executed; do not load this file with plain torch.load)",
        )
    paragraphs = [p.strip() for p in message.split("\n\n") if p.strip()]
    reason = next((p for p in reversed(paragraphs) if not p.startswith("Check the documentation")), message)
    return UnsafeCheckpointError(
        path,
        f"refused: its pickle does something torch's weights-only loader "
        f"does not allow ({reason}); nothing was executed",
    )


def read_torch_object(path: Path, is_zip: bool) -> object:
    """Whatever a torch pickle holds (nested dicts included), unpickled with only tensors and the
    allowed stand-ins: the one safe way into a .pt or .ckpt file."""
    # torch.load routes a path ending in ".safetensors" to safetensors by its NAME. Our
    # bytes say pickle, so it gets an open file instead (mmap needs a path, so none then).
    by_name = str(path).endswith(".safetensors")
    try:
        source = open(path, "rb") if by_name else contextlib.nullcontext(path)
        # weights_only=True is explicit: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD only flips the default.
        with source as f, torch.serialization.safe_globals(_STAND_INS):
            return torch.load(f, map_location="cpu", weights_only=True, mmap=is_zip and not by_name)
    except pickle.UnpicklingError as e:
        raise _refused(path, str(e)) from None
    except Exception as e:
        what = "zip archive" if is_zip else "pickle stream (or a pickle not written by torch.save)"
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(path, f"truncated or corrupt torch {what}: {detail}") from e


def _unwrap(loaded: object, path: Path) -> Mapping:
    """The dict that holds the weights: Lightning nests them under "state_dict", other
    training scripts under "model" or "module" when nothing else is at the top."""
    for _ in range(4):  # bounded: a pickle can make a dict contain itself
        if not isinstance(loaded, Mapping):
            raise CheckpointError(path, f"holds a {type(loaded).__name__}, not a dict of tensors")
        wrapped = next((loaded[k] for k in ("model", "module") if isinstance(loaded.get(k), Mapping)), None)
        if isinstance(loaded.get("state_dict"), Mapping):
            loaded = loaded["state_dict"]
        elif wrapped is not None and not any(isinstance(v, torch.Tensor) for v in loaded.values()):
            loaded = wrapped
        else:
            break
    return loaded


# ---------------------------------------------------------------- public


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file, by name, on the CPU (memory-mapped where the format allows).

    Non-tensor entries (step counters, callbacks) are dropped; a saved nn.Parameter
    comes back as a plain tensor.
    """
    path = Path(path)
    fmt = sniff_format(path)
    if fmt == "safetensors":
        state = _read_safetensors(path)
    else:
        if fmt == "torch-zip":
            check_zip_records(path)  # torch's loader trusts the records' layout; it is checked first
        found = _unwrap(read_torch_object(path, is_zip=fmt == "torch-zip"), path)
        state = {k: v.detach() for k, v in found.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(path, "contains no tensors")
    return state


def check_finite(state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Raise naming the first floating tensor with a NaN or Inf (a broken fine-tune or
    fp16 overflow at save time would otherwise surface as a black image)."""
    for name, tensor in state.items():
        if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
            continue
        nan = int(torch.isnan(tensor).sum())
        bad = tensor.numel() - int(torch.isfinite(tensor).sum())
        raise CheckpointError(
            path, f"tensor {name} has {bad} non-finite value(s) of {tensor.numel()} ({nan} NaN, {bad - nan} Inf)"
        )
