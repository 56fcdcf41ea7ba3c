"""One text chunk of a PNG file, read from the chunk stream without decoding a single pixel.

A PNG is an 8-byte signature and then chunks: a 4-byte length, a 4-byte type, the data and
a CRC. Generation parameters live in a tEXt, zTXt or iTXt chunk, before or after the pixel
data (IDAT), which this reader skips over unread. So a decompression bomb (a tiny file whose
pixels would fill gigabytes) costs nothing to inspect, and is refused by its declared size;
a compressed text chunk is inflated only up to a limit; a truncated file, a damaged chunk or
a file that is not a PNG fails with one line naming the file and what was wrong.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

from PIL import Image

SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
MAX_TEXT_CHUNK = 1 << 20  # bytes of one text chunk as stored; A1111's longest parameters are a few kB
MAX_TEXT = 1 << 20  # bytes of a compressed text once inflated: the same bound for zTXt/iTXt
MAX_CHUNK = (1 << 31) - 1  # the PNG specification's largest chunk length


class PngTextError(ValueError):
    """A file whose text could not be read safely; the message is one line naming the file."""


def max_pixels() -> int:
    """The pixel count Pillow refuses to open as a decompression bomb (twice its warning size)."""
    limit = Image.MAX_IMAGE_PIXELS
    return 2 * limit if limit else 1 << 62


def read_png_text(path: str | os.PathLike, keyword: str) -> str | None:
    """The text stored under `keyword` in the PNG at `path`, or None when it has none.

    Raises PngTextError for a file that is not a PNG, is truncated or damaged, declares more
    pixels than Pillow would open, holds an oversized text chunk, or holds the keyword twice
    with different texts (a reader could then be shown either).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            return _read(f, size, path, keyword.encode("latin-1"))
    except FileNotFoundError:
        raise PngTextError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise PngTextError(f"{path}: is a folder, not a PNG file") from None


def _read(f, size: int, path: Path, keyword: bytes) -> str | None:
    if f.read(8) != SIGNATURE:
        raise PngTextError(f"{path}: not a PNG file (no PNG signature)")
    found: str | None = None
    first = True
    while True:
        header = f.read(8)
        if len(header) < 8:
            raise PngTextError(f"{path}: truncated PNG (the file ends before its IEND chunk)")
        length, kind = struct.unpack(">I4s", header)
        if length > MAX_CHUNK or f.tell() + length + 4 > size:
            raise PngTextError(
                f"{path}: truncated or damaged PNG (chunk {kind!r} claims {length} bytes past the end of the file)"
            )
        if first:
            if kind != b"IHDR" or length != 13:
                raise PngTextError(f"{path}: damaged PNG (it does not start with an IHDR chunk)")
            _check_header(f.read(13), path)
            f.seek(4, os.SEEK_CUR)
            first = False
            continue
        if kind == b"IEND":
            return found
        if kind not in TEXT_CHUNKS:
            f.seek(length + 4, os.SEEK_CUR)  # pixels and other chunks: never read
            continue
        if length > MAX_TEXT_CHUNK:
            raise PngTextError(
                f"{path}: a {kind.decode()} text chunk of {length} bytes is over the {MAX_TEXT_CHUNK}-byte limit"
            )
        data = f.read(length)
        (crc,) = struct.unpack(">I", f.read(4))
        if zlib.crc32(kind + data) != crc:
            raise PngTextError(f"{path}: damaged PNG (the {kind.decode()} chunk's checksum is wrong)")
        name, _, body = data.partition(b"\0")
        if name != keyword:
            continue
        text = _decode(kind, body, path)
        if found is not None and text != found:
            raise PngTextError(f"{path}: two different {keyword.decode()!r} text chunks; refusing to pick one")
        found = text


def _check_header(data: bytes, path: Path) -> None:
    width, height = struct.unpack(">II", data[:8])
    if width == 0 or height == 0:
        raise PngTextError(f"{path}: damaged PNG (size {width}x{height})")
    if width * height > max_pixels():
        raise PngTextError(
            f"{path}: refused as a decompression bomb: it declares {width}x{height} pixels, "
            f"over the {max_pixels()}-pixel limit"
        )


def _decode(kind: bytes, body: bytes, path: Path) -> str:
    what = f"{path}: the {kind.decode()} chunk"
    if kind == b"tEXt":
        return body.decode("latin-1")
    if kind == b"zTXt":
        if body[:1] != b"\0":
            raise PngTextError(f"{what} uses an unknown compression method")
        return _inflate(body[1:], what).decode("latin-1")
    # iTXt: compression flag, method, language tag \0, translated keyword \0, UTF-8 text.
    if len(body) < 2:
        raise PngTextError(f"{what} is too short")
    compressed, method = body[0], body[1]
    parts = body[2:].split(b"\0", 2)
    if len(parts) != 3:
        raise PngTextError(f"{what} is malformed (missing its language or translated keyword field)")
    text = parts[2]
    if compressed:
        if method != 0:
            raise PngTextError(f"{what} uses an unknown compression method")
        text = _inflate(text, what)
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError:
        raise PngTextError(f"{what} is not valid UTF-8") from None


def _inflate(data: bytes, what: str) -> bytes:
    """zlib data inflated to at most MAX_TEXT bytes: a text bomb is refused, not expanded."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, MAX_TEXT + 1)
    except zlib.error as e:
        raise PngTextError(f"{what} is damaged ({e})") from None
    if len(out) > MAX_TEXT or inflater.unconsumed_tail:
        raise PngTextError(f"{what} inflates past the {MAX_TEXT}-byte limit")
    if not inflater.eof:
        raise PngTextError(f"{what} is truncated")
    return out
