"""Reading and checking a safetensors file's header before any tensor is made from it.

The format is a little-endian u64 header length, that many bytes of JSON (one entry per
tensor: dtype, shape, data_offsets into the data area; and an optional "__metadata__" of
strings), then the data. Everything here is checked strictly and in an order that keeps
memory small: the length against the cap and the file size before a byte of the header
is read, the JSON's nesting before it is parsed (so a header cannot turn its 100 MB into
gigabytes of Python lists), then each entry, then that the entries tile the data area
exactly as the safetensors library requires. Every fault is a CheckpointError naming
the file, the tensor and the field.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import torch

from diffuse.checkpoints.errors import CheckpointError
from diffuse.checkpoints.fields import shown

MAX_HEADER_BYTES = 100_000_000  # the safetensors library refuses larger headers too
# JSON values in a header (one comma each): ten per tensor, so 100,000 tensors, 40 times
# SDXL's count, while a header of nothing but tiny values stays near 100 MB in Python.
MAX_HEADER_VALUES = 1_000_000
MAX_RANK = 8  # a tensor's dimensions (SD's convolutions: 4)
MAX_DIM = 2**40  # one dimension; only an empty tensor could have a larger one
METADATA = "__metadata__"

# The dtypes safetensors' torch loader knows, with their sizes in bytes.
ITEM_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "C64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
}

# The dtypes of ITEM_SIZES that tensors are read and written in here, as torch dtypes.
TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b"{}[],")
_LEAF_LIST = re.compile(rb"\[,*\]")
_FLAT_OBJECT = re.compile(rb"\{,*\}")


def header_length(path: Path, file_size: int, first_bytes: bytes) -> int:
    """The declared header length, refused when over the cap or longer than the file, unread."""
    length = struct.unpack("<Q", first_bytes[:8])[0]
    if length > MAX_HEADER_BYTES:
        raise CheckpointError(
            path,
            f"safetensors header length {length} is over the {MAX_HEADER_BYTES}-byte limit "
            "(a corrupt or hostile file; nothing of it was read)",
        )
    if 8 + length > file_size:
        raise CheckpointError(
            path,
            f"truncated: the safetensors header is {length} bytes but only {file_size - 8} bytes follow its length",
        )
    return length


def _check_structure(path: Path, raw: bytes) -> None:
    """Refuse JSON nested deeper than a header's object -> entry -> list of numbers, or with more
    values than MAX_HEADER_VALUES, using only byte operations (before json builds anything)."""
    skeleton = _STRING.sub(b"", raw).translate(None, _NOT_STRUCTURE)
    if skeleton.count(b",") >= MAX_HEADER_VALUES:
        raise CheckpointError(path, f"safetensors header holds over {MAX_HEADER_VALUES} JSON values")
    flat = _FLAT_OBJECT.sub(b"", _FLAT_OBJECT.sub(b"", _LEAF_LIST.sub(b"", skeleton)))
    if flat:
        raise CheckpointError(
            path,
            "corrupt safetensors header: JSON nested deeper than "
            "{tensor: {field: [numbers]}} (or its brackets do not match)",
        )


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of two equal names; a header naming a tensor twice is refused instead.
    seen: set[str] = set()
    for name, _ in pairs:
        if name in seen:
            raise ValueError(f"{shown(name)} appears twice")
        seen.add(name)
    return dict(pairs)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(path: Path, name: str, entry: Any, data_size: int) -> tuple[int, int]:
    """One tensor's (start, end) in the data area, after checking its every field."""

    def fault(problem: str) -> CheckpointError:
        return CheckpointError(path, f"safetensors header: tensor {shown(name)}: {problem}")

    if not isinstance(entry, dict):
        raise fault(f"is a JSON {type(entry).__name__}, not an object")
    extra = set(entry) - {"dtype", "shape", "data_offsets"}
    if extra:
        raise fault(f"unknown field(s) {', '.join(sorted(map(shown, extra)))}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in ITEM_SIZES:
        raise fault(f"dtype {shown(dtype)} is not one of {', '.join(ITEM_SIZES)}")
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        raise fault(f"shape {shown(shape)} is not a list of at most {MAX_RANK} dimensions")
    if not all(_is_count(d) and 0 <= d <= MAX_DIM for d in shape):
        raise fault(f"shape {shown(shape)} has a dimension that is not an integer from 0 to {MAX_DIM}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise fault(f"data_offsets {shown(offsets)} is not a list of two integers")
    start, end = offsets
    if not 0 <= start <= end:
        raise fault(f"data_offsets {offsets} are not in order (0 <= start <= end)")
    if end > data_size:
        raise CheckpointError(
            path,
            f"truncated: header promises {end} bytes of tensor data but the file has "
            f"{data_size} (tensor {shown(name)})",
        )
    numel = 1
    for d in shape:
        numel *= d
    if numel * ITEM_SIZES[dtype] != end - start:
        raise fault(
            f"shape {shape} of {dtype} needs {numel * ITEM_SIZES[dtype]} bytes "
            f"but data_offsets {offsets} hold {end - start}"
        )
    return start, end


def read_header(path: Path) -> dict[str, Any]:
    """The checked header of the safetensors file at `path` (its format already sniffed):
    {tensor name: {"dtype", "shape", "data_offsets"}}, plus "__metadata__" where present."""
    with open(path, "rb") as file:
        size = path.stat().st_size
        length = header_length(path, size, file.read(8))
        raw = file.read(length)
    if len(raw) != length:
        raise CheckpointError(
            path, f"truncated: the safetensors header is {length} bytes but only {len(raw)} were read"
        )
    _check_structure(path, raw)
    try:
        header = json.loads(raw, object_pairs_hook=_object_without_duplicates)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(path, f"corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, f"corrupt safetensors header: a JSON {type(header).__name__}, not an object")

    metadata = header.get(METADATA, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(path, f"safetensors header: {METADATA} must be an object of strings")
    data_size = size - 8 - length
    spans = sorted((_entry(path, name, entry, data_size), name) for name, entry in header.items() if name != METADATA)
    # The safetensors library needs the tensors to tile the data area: no gap, no overlap.
    covered, previous = 0, None
    for (start, end), name in spans:
        if start < covered:
            raise CheckpointError(
                path,
                f"safetensors header: tensor {shown(name)}'s data {start}..{end} overlaps tensor {shown(previous)}'s",
            )
        if start > covered:
            raise CheckpointError(
                path,
                f"safetensors header: bytes {covered}..{start} of the data area belong "
                f"to no tensor (before tensor {shown(name)})",
            )
        covered, previous = max(covered, end), name
    if covered != data_size:
        raise CheckpointError(
            path,
            f"safetensors header: its tensors cover {covered} bytes of data but the file "
            f"has {data_size} (bytes after the last tensor)",
        )
    return header
