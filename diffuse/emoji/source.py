"""`diffuse data emoji`: the pinned emoji set fetched, checked and unpacked into a data folder.

The set is one npm package at one version, pinned below by size and hash. The tarball is
streamed to a temporary file (refused past the pinned size) and its hashes are checked
before any of it is read; only then are the few regular files needed taken out of it, one
member at a time (never extractall): emoji.json, the licence and README, and the 64 px
pictures the catalogue keeps. The data folder is built beside its final name and renamed
into place, so DIR is either absent, the previous folder, or complete:

    DIR/catalogue.json   the kept records (catalogue.py's Emoji), in the package's order
    DIR/google/*.png     their pictures, byte for byte as the package has them
    DIR/LICENCES.md      the package's MIT text (the data) and the Apache-2.0 statement (the pictures)
    DIR/SOURCES.json     the pin, the download's hashes, the date, and a sha256 per written file

`verify(folder)` hashes the files again against SOURCES.json.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import tarfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from PIL import Image

from diffuse.checkpoints.export import move_into_place
from diffuse.emoji.catalogue import CATALOGUE_FILE, PICTURE_SIZE, SOURCES_FILE

LICENCES_FILE = "LICENCES.md"
SOURCES_FORMAT = 1


@dataclass(frozen=True)
class Licence:
    name: str  # SPDX identifier: "MIT"
    covers: str  # which of the folder's files it covers
    holder: str
    url: str


@dataclass(frozen=True)
class Pin:
    """One download, fixed: anything that differs from it is refused."""

    set: str  # the drawing set, also the pictures' folder: "google"
    package: str
    version: str
    url: str
    size: int  # bytes
    sha256: str
    integrity: str  # the npm registry's own record of the tarball (sha512)
    pictures: str  # the pictures' folder inside the package
    licences: tuple[Licence, ...]


PIN = Pin(
    set="google",
    package="emoji-datasource-google",
    version="16.0.0",
    url="https://registry.npmjs.org/emoji-datasource-google/-/emoji-datasource-google-16.0.0.tgz",
    size=74_344_091,
    sha256="fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438",
    integrity="sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A==",
    pictures="img/google/64",
    licences=(
        Licence(
            name="MIT",
            covers=f"{CATALOGUE_FILE} (names, short names, categories: emoji-data)",
            holder="Cal Henderson",
            url="https://github.com/iamcal/emoji-data/blob/master/LICENSE",
        ),
        Licence(
            name="Apache-2.0",
            covers="google/*.png (the Noto Emoji pictures)",
            holder="Google",
            url="https://github.com/googlefonts/noto-emoji/blob/main/LICENSE",
        ),
    ),
)

# Every tarball member lies under this folder, as npm packs it.
PACKAGE_ROOT = "package"
# The package's files a data folder needs besides the pictures, each with the most bytes it may have.
PACKAGE_FILES = {"emoji.json": 16 << 20, "LICENSE": 64 << 10, "README.md": 1 << 20}
MAX_PICTURE_BYTES = 1 << 20
PICTURE_NAME = re.compile(r"[0-9a-f]+(?:-[0-9a-f]+)*\.png")
# The README's sentence that gives the pictures' licence, quoted in LICENCES.md.
PICTURE_LICENCE_LINE = re.compile(r"^\s*\*?\s*Android/Google/Noto images.*$", re.MULTILINE)
CHUNK = 1 << 20

Log = Callable[[str], None]


@dataclass(frozen=True)
class DataFolder:
    path: Path
    pictures: int
    already_there: bool  # an existing complete folder of the same pin, left as it was


@dataclass(frozen=True)
class Package:
    """What the data folder takes from the tarball."""

    files: dict[str, bytes]  # PACKAGE_FILES' names -> contents
    pictures: dict[str, bytes]  # "1f436.png" -> the PNG's bytes


# ---- the data folder ---------------------------------------------------------------------------


def make_data_folder(
    out: str | os.PathLike, *, tarball: str | os.PathLike | None = None, overwrite: bool = False, log: Log | None = None
) -> DataFolder:
    """Fetch (or take `tarball`, a local copy), check and unpack the pinned set into the folder `out`.

    A complete folder of the same pin is left as it is; any other non-empty `out` is refused
    unless `overwrite`, and even then only a data folder (one with a catalogue or SOURCES.json)
    is replaced, never an unrelated folder.
    """
    # Absolute, so that "." or "data/" still name the folder and its staging sibling.
    pin, out, log = PIN, Path(os.path.abspath(out)), log or (lambda _: None)
    existing = _existing(out, pin, overwrite)
    if existing is not None:
        return existing
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.{secrets.token_hex(4)}.partial"
    staging.mkdir()
    try:
        download = staging / "download.tgz"
        found = _fetch(pin, tarball, download, log)
        package = read_package(download, pin)
        download.unlink()
        count = _write_folder(staging, package, pin, found)
        refusal = f"{out} appeared while the data folder was being written; pass --overwrite to replace it"
        move_into_place(staging, out, overwrite, refusal)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return DataFolder(out, count, already_there=False)


def _existing(out: Path, pin: Pin, overwrite: bool) -> DataFolder | None:
    """The folder already there when it is complete for this pin; a refusal when `out` must not be replaced."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return None
    if not (out / SOURCES_FILE).is_file() and not (out / CATALOGUE_FILE).is_file():
        raise ValueError(f"{out} is not empty and is not an emoji data folder; choose another --out")
    try:
        sources = verify(out)
        if _same_pin(sources, pin):
            return DataFolder(out, sources["pictures"], already_there=True)
        reason = "it holds another download"
    except ValueError as e:
        reason = str(e)
    if not overwrite:
        raise ValueError(
            f"{out} is not a complete data folder of {pin.package} {pin.version} ({reason}); "
            "pass --overwrite to replace it"
        )
    return None


def _same_pin(sources: dict, pin: Pin) -> bool:
    recorded = sources.get("sources")
    if not isinstance(recorded, list) or len(recorded) != 1 or not isinstance(recorded[0], dict):
        return False
    keys = ("set", "package", "version", "url", "size", "sha256", "integrity")
    return all(recorded[0].get(k) == getattr(pin, k) for k in keys)


# ---- the download ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Found:
    size: int
    sha256: str
    integrity: str


def _fetch(pin: Pin, tarball: str | os.PathLike | None, dest: Path, log: Log) -> Found:
    """The pinned tarball copied to `dest` from the network or from `tarball`; refused unless it is the pinned one."""
    if tarball is None:
        log(f"downloading {pin.url} ({pin.size / 1e6:.1f} MB)")
        what = pin.url
        found = _download(pin.url, pin.size, dest)
    else:
        what = f"{tarball} (a copy of {pin.url})"
        source = Path(tarball)
        if not source.is_file():
            raise ValueError(f"{tarball}: no such file" if not source.exists() else f"{tarball}: not a file")
        if source.stat().st_size > pin.size:
            raise ValueError(f"{what}: {source.stat().st_size:,} bytes, more than the pinned {pin.size:,}")
        with open(source, "rb") as src, open(dest, "wb") as f:
            found = _copy_hashing(src, f, pin.size, what)
    _check(found, pin, what)
    return found


def _download(url: str, size: int, dest: Path) -> Found:
    request = urllib.request.Request(url, headers={"User-Agent": "diffuse"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response, open(dest, "wb") as f:
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > size:
                raise ValueError(f"{url}: the server offers {int(length):,} bytes, more than the pinned {size:,}")
            return _copy_hashing(response, f, size, url)
    except urllib.error.HTTPError as e:
        raise ValueError(f"{url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise ValueError(f"{url}: download failed ({e.reason})") from None
    except TimeoutError:
        raise ValueError(f"{url}: download failed (timed out)") from None


def _copy_hashing(src: BinaryIO, dst: BinaryIO, cap: int, what: str) -> Found:
    """Copy `src` to `dst` while hashing it, refusing it as soon as it passes `cap` bytes."""
    sha256, sha512, total = hashlib.sha256(), hashlib.sha512(), 0
    while chunk := src.read(CHUNK):
        total += len(chunk)
        if total > cap:
            raise ValueError(f"{what}: more than the pinned {cap:,} bytes; refusing it")
        sha256.update(chunk)
        sha512.update(chunk)
        dst.write(chunk)
    return Found(total, sha256.hexdigest(), "sha512-" + base64.b64encode(sha512.digest()).decode("ascii"))


def _check(found: Found, pin: Pin, what: str) -> None:
    if found.size != pin.size:
        raise ValueError(f"{what}: {found.size:,} bytes, the pin says {pin.size:,}; nothing was written")
    if found.sha256 != pin.sha256:
        raise ValueError(
            f"{what}: the download changed: expected sha256 {pin.sha256}, found {found.sha256}; nothing was written"
        )
    if found.integrity != pin.integrity:
        raise ValueError(
            f"{what}: the download changed: expected {pin.integrity}, found {found.integrity}; nothing was written"
        )


# ---- reading the tarball -----------------------------------------------------------------------


def read_package(tarball: str | os.PathLike, pin: Pin) -> Package:
    """The needed regular files of a package tarball, read member by member; links, absolute
    paths, ".." and anything but files and folders are refused wherever they appear."""
    package = Package({}, {})
    try:
        with tarfile.open(tarball, "r:gz") as archive:
            for member in archive:
                _take_member(archive, member, package, pin)
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise ValueError(f"{tarball}: not a readable tarball ({e})") from None
    missing = [f"{PACKAGE_ROOT}/{n}" for n in PACKAGE_FILES if n not in package.files]
    if missing:
        raise ValueError(f"{tarball}: not the emoji package: {', '.join(missing)} missing")
    return package


def _take_member(archive: tarfile.TarFile, member: tarfile.TarInfo, package: Package, pin: Pin) -> None:
    """Keep `member` in `package` when it is one of the files needed; refuse it when it is unsafe."""
    path = _member_path(member)
    if member.isdir() or len(path.parts) < 2 or path.parts[0] != PACKAGE_ROOT:
        return
    inner = PurePosixPath(*path.parts[1:])
    if str(inner) in PACKAGE_FILES:
        table, key, cap = package.files, str(inner), PACKAGE_FILES[str(inner)]
    elif str(inner.parent) == pin.pictures and PICTURE_NAME.fullmatch(inner.name):
        table, key, cap = package.pictures, inner.name, MAX_PICTURE_BYTES
    else:
        return
    if key in table:
        raise ValueError(f"tarball member {member.name!r} appears twice; refusing the tarball")
    if member.size > cap:
        raise ValueError(f"tarball member {member.name!r}: {member.size:,} bytes, more than the {cap:,} allowed")
    f = archive.extractfile(member)
    if f is None:
        raise ValueError(f"tarball member {member.name!r} cannot be read")
    table[key] = f.read()


def _member_path(member: tarfile.TarInfo) -> PurePosixPath:
    name = member.name
    if member.issym() or member.islnk():
        raise ValueError(f"tarball member {name!r} is a link; refusing the tarball")
    if not (member.isfile() or member.isdir()):
        raise ValueError(f"tarball member {name!r} is not a regular file; refusing the tarball")
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        raise ValueError(f"tarball member {name!r} has an absolute path; refusing the tarball")
    path = PurePosixPath(name)
    if ".." in path.parts or "\\" in name:
        raise ValueError(f"tarball member {name!r} reaches outside the package; refusing the tarball")
    return path


# ---- the records and pictures ------------------------------------------------------------------


def catalogue_records(package: Package, pin: Pin) -> list[dict]:
    """The package's records a data folder keeps: those with a picture in the set (present in the
    tarball), not the skin-tone modifiers ("Component"); skin-tone variants are not records of
    their own (they sit inside a record and repeat its name), so they are left out."""
    try:
        records = json.loads(package.files["emoji.json"])
    except ValueError as e:
        raise ValueError(f"{PACKAGE_ROOT}/emoji.json: not JSON ({e})") from None
    if not isinstance(records, list):
        raise ValueError(f"{PACKAGE_ROOT}/emoji.json: not a list of records")
    kept = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{PACKAGE_ROOT}/emoji.json: record {i} is not an object")
        image = record.get("image")
        if not record.get(f"has_img_{pin.set}") or record.get("category") == "Component":
            continue
        if not isinstance(image, str) or image not in package.pictures:
            continue
        kept.append(_catalogue_record(record, i, pin))
    if not kept:
        raise ValueError(f"{PACKAGE_ROOT}/emoji.json: no record has a picture in {pin.pictures}")
    return kept


def _catalogue_record(record: dict, i: int, pin: Pin) -> dict:
    fields = {k: record.get(k) for k in ("name", "category", "subcategory", "unified")}
    short_names = record.get("short_names")
    bad = [k for k, v in fields.items() if not isinstance(v, str) or not v]
    if not isinstance(short_names, list) or not all(isinstance(s, str) for s in short_names):
        bad.append("short_names")
    if bad:
        raise ValueError(f"{PACKAGE_ROOT}/emoji.json: record {i} has no proper {', '.join(bad)}")
    return {
        "name": fields["name"].lower(),
        "short_names": short_names,
        "category": fields["category"],
        "subcategory": fields["subcategory"],
        "unified": fields["unified"],
        "image": f"{pin.set}/{record['image']}",
        "set": pin.set,
    }


def check_picture(name: str, data: bytes) -> None:
    """A one-line error unless `data` is a PNG of PICTURE_SIZE x PICTURE_SIZE that decodes."""
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            # The header's size is checked before the pixels are decoded.
            if image.size != (PICTURE_SIZE, PICTURE_SIZE):
                raise ValueError(f"{name}: {image.size[0]}x{image.size[1]}, not {PICTURE_SIZE}x{PICTURE_SIZE}")
            image.load()
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"{name}: not a readable PNG ({e})") from None


# ---- writing -----------------------------------------------------------------------------------


def _write_folder(folder: Path, package: Package, pin: Pin, found: Found) -> int:
    """Write the catalogue, pictures and licences into `folder`, then SOURCES.json with their hashes."""
    records = catalogue_records(package, pin)
    written: dict[str, str] = {}

    # Not synced file by file (seconds for ~1,900 pictures): the folder appears only by its rename, and
    # one damaged by a power cut fails verify(), so the next run refuses it rather than keeping it.
    def write(relative: str, data: bytes) -> None:
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written[relative] = hashlib.sha256(data).hexdigest()

    for record in records:
        name = PurePosixPath(record["image"]).name
        check_picture(f"{PACKAGE_ROOT}/{pin.pictures}/{name}", package.pictures[name])
        write(record["image"], package.pictures[name])
    write(CATALOGUE_FILE, (json.dumps(records, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    write(LICENCES_FILE, licences_text(package, pin).encode("utf-8"))
    sources = {
        "format": SOURCES_FORMAT,
        "written": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "sources": [{**_pin_record(pin), "found_sha256": found.sha256}],
        "pictures": len(records),
        "files": dict(sorted(written.items())),
    }
    (folder / SOURCES_FILE).write_text(json.dumps(sources, indent=2) + "\n", encoding="utf-8")
    return len(records)


def _pin_record(pin: Pin) -> dict:
    record = asdict(pin)
    record["licences"] = [asdict(licence) for licence in pin.licences]
    return record


def licences_text(package: Package, pin: Pin) -> str:
    """LICENCES.md: the package's own licence text (the data) and its statement of the pictures' licence."""
    try:
        mit = package.files["LICENSE"].decode("utf-8").strip()
        readme = package.files["README.md"].decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{PACKAGE_ROOT}/LICENSE or README.md is not UTF-8 text") from None
    statement = PICTURE_LICENCE_LINE.search(readme)
    if statement is None:
        raise ValueError(f"{PACKAGE_ROOT}/README.md no longer states the pictures' licence; refusing the package")
    data, pictures = pin.licences
    quoted = "\n".join("    " + line if line else "" for line in mit.splitlines())
    return f"""# Licences of this data folder

Written by `diffuse data emoji` from the npm package {pin.package} {pin.version}
({pin.url}).
The files are used here as that package licenses them.

## {data.covers}: {data.name}

The names, short names and categories come from emoji-data by {data.holder}
(https://github.com/iamcal/emoji-data; licence: {data.url}).
The package's LICENSE:

{quoted}

## {pictures.covers}: {pictures.name}

The pictures are {pictures.holder}'s Noto Emoji (https://github.com/googlefonts/noto-emoji),
licensed under the Apache License, Version 2.0 (https://www.apache.org/licenses/LICENSE-2.0;
the project's copy: {pictures.url}).
The package's README says:

> {statement.group(0).strip()}
"""


# ---- checking a written folder -----------------------------------------------------------------


def verify(folder: str | os.PathLike) -> dict:
    """SOURCES.json of a data folder after hashing every file it lists again; a one-line
    ValueError on the first file missing or changed."""
    folder = Path(folder)
    path = folder / SOURCES_FILE
    if not path.is_file():
        raise ValueError(f"{path}: missing (not a folder written by `diffuse data emoji`)")
    try:
        sources = json.loads(path.read_text(encoding="utf-8"))
        files = sources["files"]
        if not isinstance(files, dict) or not isinstance(sources["pictures"], int):
            raise TypeError("files is not a table of hashes")
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: malformed ({e})") from None
    for relative, expected in files.items():
        parts = PurePosixPath(relative).parts
        if not parts or PurePosixPath(relative).is_absolute() or ".." in parts:
            raise ValueError(f"{path}: the file {relative!r} lies outside the folder")
        file = folder / relative
        if not file.is_file():
            raise ValueError(f"{file}: missing")
        found = hashlib.sha256(file.read_bytes()).hexdigest()
        if found != expected:
            raise ValueError(f"{file}: changed since it was written (sha256 expected {expected}, found {found})")
    return sources
