"""Checking a torch.save zip archive's records before torch reads any of them.

torch.load memory-maps a zip checkpoint and takes each tensor's bytes at the offset its
record's local header gives, for as many bytes as the pickle says, without looking at the
zip's own sizes or checksums. A record cut short (a damaged copy, a hostile edit) whose
central directory still reads well would then hand torch the next record's header as
weights. So every record is checked first: the end-of-directory structures agree with
where the directory lies, every record is stored (not compressed) with its local header
where the directory says, its data ends before the next record begins, and a record that
carries a data descriptor after its data (torch's writer always does) has one there that
repeats the directory's checksum and sizes.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path
from typing import BinaryIO

from diffuse.checkpoints.errors import CheckpointError

MAX_DIRECTORY_BYTES = 64_000_000  # SD's .ckpt: ~1,200 records, ~150 kB of directory
MAX_RECORDS = 1_000_000
MAX_PICKLE_BYTES = 64_000_000  # the pickle torch reads whole (SD's: ~100 kB)

_END = struct.Struct("<4s4H2LH")  # end of central directory
_END64_LOCATOR = struct.Struct("<4sLQL")
_END64 = struct.Struct("<4sQ2H2L4Q")
_LOCAL = struct.Struct(
    "<4s5H3L2H"
)  # local file header: sig, version, flags, method, time, date, crc, sizes, name/extra lengths
_SEARCH = _END.size + 65_535  # the end record can be followed by a comment of up to 64 kB
_HAS_DESCRIPTOR = 0x08


def _directory_span(file: BinaryIO, size: int, path: Path) -> tuple[int, int, int]:
    """(directory offset, directory size, record count) from the end records, checked against the file."""
    tail_start = max(0, size - _SEARCH)
    file.seek(tail_start)
    tail = file.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + _END.size > len(tail):
        raise CheckpointError(path, "truncated or corrupt torch zip archive: no end of central directory")
    _, _, _, _, count, dir_size, dir_offset, comment = _END.unpack_from(tail, at)
    end_record = tail_start + at
    if end_record + _END.size + comment != size:
        raise CheckpointError(path, "corrupt torch zip archive: bytes after the end of central directory")
    directory_end = end_record
    locator = at - _END64_LOCATOR.size
    if locator >= 0 and tail[locator : locator + 4] == b"PK\x06\x07":
        end64 = _END64_LOCATOR.unpack_from(tail, locator)[2]
        if end64 + _END64.size > tail_start + locator:
            raise CheckpointError(path, "corrupt torch zip archive: its zip64 end record lies outside the file")
        file.seek(end64)
        signature, _, _, _, _, _, _, count, dir_size, dir_offset = _END64.unpack(file.read(_END64.size))
        if signature != b"PK\x06\x06":
            raise CheckpointError(path, "corrupt torch zip archive: no zip64 end record where its locator points")
        directory_end = end64
    if dir_offset + dir_size != directory_end:
        raise CheckpointError(
            path,
            f"corrupt torch zip archive: the central directory is said to span "
            f"{dir_offset}..{dir_offset + dir_size} but ends at {directory_end}",
        )
    if dir_size > MAX_DIRECTORY_BYTES or count > MAX_RECORDS:
        raise CheckpointError(
            path,
            f"torch zip archive has {count} records in a {dir_size}-byte directory, over "
            f"the limits ({MAX_RECORDS} records, {MAX_DIRECTORY_BYTES} bytes)",
        )
    return dir_offset, dir_size, count


def _descriptor_matches(raw: bytes, info: zipfile.ZipInfo) -> bool:
    """Whether `raw`, read where the data ends, is a data descriptor repeating the directory's CRC and sizes."""
    if raw.startswith(b"PK\x07\x08"):
        raw = raw[4:]
    for sizes in ("<LLL", "<LQQ"):  # 32-bit sizes, or zip64's
        need = struct.calcsize(sizes)
        if len(raw) >= need and struct.unpack_from(sizes, raw) == (info.CRC, info.compress_size, info.file_size):
            return True
    return False


def check_zip_records(path: Path) -> None:
    """CheckpointError naming the file and the record for anything torch's loader would misread."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        dir_offset, _, count = _directory_span(file, size, path)
        try:
            infos = zipfile.ZipFile(file).infolist()
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
            raise CheckpointError(path, f"truncated or corrupt torch zip archive: {e}") from None
        if len(infos) != count:
            raise CheckpointError(
                path, f"corrupt torch zip archive: {len(infos)} records in the directory, {count} in its end record"
            )
        names = [info.filename for info in infos]
        if len(set(names)) != len(names):
            raise CheckpointError(path, "corrupt torch zip archive: a record name appears twice")
        ordered = sorted(infos, key=lambda info: info.header_offset)
        starts = [info.header_offset for info in ordered[1:]] + [dir_offset]
        for info, next_start in zip(ordered, starts):
            _check_record(file, path, info, next_start)


def _check_record(file: BinaryIO, path: Path, info: zipfile.ZipInfo, next_start: int) -> None:
    def fault(problem: str) -> CheckpointError:
        return CheckpointError(path, f"zip record {info.filename!r}: {problem}")

    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        raise fault(f"compressed (method {info.compress_type}); torch reads only stored records")
    if info.filename.endswith("data.pkl") and info.file_size > MAX_PICKLE_BYTES:
        raise fault(f"a {info.file_size}-byte pickle, over the {MAX_PICKLE_BYTES}-byte limit")
    file.seek(info.header_offset)
    local = file.read(_LOCAL.size)
    if len(local) != _LOCAL.size or local[:4] != b"PK\x03\x04":
        raise fault(f"no local header at offset {info.header_offset}, where the directory puts it")
    _, _, flags, _, _, _, crc, stated, _, name_length, extra_length = _LOCAL.unpack(local)
    if file.read(name_length).decode("utf-8", "replace") != info.filename:
        raise fault("its local header names another record")
    data_start = info.header_offset + _LOCAL.size + name_length + extra_length
    data_end = data_start + info.compress_size
    if data_end > next_start:
        raise fault(
            f"short: its {info.compress_size} bytes of data from offset {data_start} run past "
            f"the next record at {next_start}"
        )
    if flags & _HAS_DESCRIPTOR:
        file.seek(data_end)
        if not _descriptor_matches(file.read(min(24, next_start - data_end)), info):
            raise fault(
                f"short or altered: no data descriptor with its CRC and {info.compress_size}-byte size "
                f"where its data should end (offset {data_end})"
            )
    elif crc != info.CRC or (stated != 0xFFFFFFFF and stated != info.compress_size):
        raise fault("its local header's CRC or size differs from the central directory's")
