"""The emoji data step (diffuse/emoji/source.py, `diffuse data emoji`) on small fake package tarballs,
laid out as the pinned npm package is, with the pin's size and hashes set to them: no network."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from diffuse.cli import main
from diffuse.emoji import source
from diffuse.emoji.catalogue import load_catalogue, picture

MIT_TEXT = "The MIT License (MIT)\n\nCopyright (c) 2013 Cal Henderson\n\nPermission is hereby granted, free of charge"
README = (
    "# emoji-data\n\n## Image Sources\n\n* Apple images, Copyright © Apple Inc.\n"
    "* Android/Google/Noto images, are available under the "
    "[Apache License 2.0](https://github.com/googlei18n/noto-emoji/blob/master/LICENSE).\n"
)


def png(colour: tuple[int, int, int, int], size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def record(name: str, image: str, category: str, **extra) -> dict:
    unified = image.removesuffix(".png").upper()
    return {
        "name": name,
        "unified": unified,
        "image": image,
        "short_name": name.lower().split()[0],
        "short_names": [name.lower().split()[0]],
        "category": category,
        "subcategory": "sub-" + category.split()[0].lower(),
        "sort_order": 1,
        "has_img_google": True,
        **extra,
    }


RECORDS = [
    record("DOG FACE", "1f436.png", "Animals & Nature"),
    record("RED APPLE", "1f34e.png", "Food & Drink"),
    # Its skin-tone variant's picture is in the package, and is no record of its own.
    record("WAVING HAND SIGN", "1f44b.png", "People & Body", skin_variations={"1F3FB": {"image": "1f44b-1f3fb.png"}}),
    record("EMOJI MODIFIER FITZPATRICK TYPE-1-2", "1f3fb.png", "Component"),
    record("NO GOOGLE PICTURE", "1f600.png", "Smileys & Emotion", has_img_google=False),
    record("PICTURE MISSING", "1f680.png", "Travel & Places"),
]
KEPT = ["dog face", "red apple", "waving hand sign"]


def package_members() -> dict[str, bytes]:
    pictures = {
        name: png((40 * i, 200, 255 - 40 * i, 255))
        for i, name in enumerate(["1f436.png", "1f34e.png", "1f44b.png", "1f44b-1f3fb.png", "1f3fb.png", "1f600.png"])
    }
    members = {
        "package/package.json": b'{"name": "emoji-datasource-google", "version": "16.0.0"}',
        "package/LICENSE": MIT_TEXT.encode(),
        "package/README.md": README.encode(),
        "package/emoji.json": json.dumps(RECORDS).encode(),
        "package/categories.json": b"{}",
        "package/img/google/32/1f436.png": png((0, 0, 0, 255), 32),
    }
    members.update({f"package/img/google/64/{name}": data for name, data in pictures.items()})
    return members


def write_tarball(path: Path, members: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for info in extra:
            archive.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def pin_to(monkeypatch: pytest.MonkeyPatch, tarball: Path) -> source.Pin:
    data = tarball.read_bytes()
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
    pin = dataclasses.replace(source.PIN, size=len(data), sha256=hashlib.sha256(data).hexdigest(), integrity=integrity)
    monkeypatch.setattr(source, "PIN", pin)
    return pin


@pytest.fixture
def tarball(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = write_tarball(tmp_path / "google.tgz", package_members())
    pin_to(monkeypatch, path)
    return path


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_the_pin_is_the_checked_release():
    assert source.PIN.package == "emoji-datasource-google" and source.PIN.version == "16.0.0"
    assert source.PIN.url.endswith("/emoji-datasource-google-16.0.0.tgz") and source.PIN.url.startswith("https://")
    assert source.PIN.size == 74_344_091
    assert source.PIN.sha256 == "fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438"
    assert [licence.name for licence in source.PIN.licences] == ["MIT", "Apache-2.0"]


def test_writes_the_catalogue_and_the_kept_pictures(tmp_path, tarball):
    out = tmp_path / "data"
    folder = source.make_data_folder(out, tarball=tarball)
    assert (folder.path, folder.pictures, folder.already_there) == (out, 3, False)
    records = json.loads((out / "catalogue.json").read_text(encoding="utf-8"))
    assert [r["name"] for r in records] == KEPT
    assert records[0] == {
        "name": "dog face",
        "short_names": ["dog"],
        "category": "Animals & Nature",
        "subcategory": "sub-animals",
        "unified": "1F436",
        "image": "google/1f436.png",
        "set": "google",
    }
    assert sorted(p.name for p in (out / "google").iterdir()) == ["1f34e.png", "1f436.png", "1f44b.png"]
    assert sorted(p.name for p in out.iterdir()) == ["LICENCES.md", "SOURCES.json", "catalogue.json", "google"]
    # The pictures are the package's bytes, and the shared catalogue reads the folder.
    assert (out / "google/1f436.png").read_bytes() == package_members()["package/img/google/64/1f436.png"]
    emoji = load_catalogue(out)
    assert [e.name for e in emoji] == KEPT and emoji[1].image == "google/1f34e.png"
    image = picture(out, emoji[0])
    assert image.size == (64, 64) and image.mode == "RGBA" and image.getpixel((5, 5)) == (0, 200, 255, 255)
    assert leftovers(tmp_path) == []


def test_records_the_sources_hashes_and_licences(tmp_path, tarball):
    out = tmp_path / "data"
    source.make_data_folder(out, tarball=tarball)
    sources = json.loads((out / "SOURCES.json").read_text())
    (recorded,) = sources["sources"]
    assert recorded["package"] == "emoji-datasource-google" and recorded["version"] == "16.0.0"
    assert recorded["url"] == source.PIN.url and recorded["size"] == tarball.stat().st_size
    assert recorded["found_sha256"] == recorded["sha256"] == hashlib.sha256(tarball.read_bytes()).hexdigest()
    assert [(x["name"], x["url"]) for x in recorded["licences"]] == [(x.name, x.url) for x in source.PIN.licences]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", sources["written"])
    assert sources["pictures"] == 3
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "SOURCES.json")
    assert sorted(sources["files"]) == written
    for name, digest in sources["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    licences = (out / "LICENCES.md").read_text(encoding="utf-8")
    assert MIT_TEXT.splitlines()[2] in licences and "MIT" in licences
    assert "Apache License, Version 2.0" in licences and "https://www.apache.org/licenses/LICENSE-2.0" in licences
    assert "Android/Google/Noto images, are available under the [Apache License 2.0]" in licences
    assert source.verify(out) == sources


def test_a_changed_download_is_refused_and_nothing_is_written(tmp_path, tarball):
    pinned = source.PIN.sha256
    data = bytearray(tarball.read_bytes())
    data[len(data) // 2] ^= 0x01
    changed = tmp_path / "changed.tgz"
    changed.write_bytes(bytes(data))
    out = tmp_path / "data"
    with pytest.raises(ValueError) as refusal:
        source.make_data_folder(out, tarball=changed)
    message = str(refusal.value)
    assert "\n" not in message and source.PIN.url in message
    assert pinned in message and hashlib.sha256(bytes(data)).hexdigest() in message
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_download_past_the_pinned_size_is_refused(tmp_path, tarball):
    longer = tmp_path / "longer.tgz"
    longer.write_bytes(tarball.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="more than the pinned"):
        source.make_data_folder(tmp_path / "data", tarball=longer)
    assert not (tmp_path / "data").exists() and leftovers(tmp_path) == []


class FakeResponse(io.BytesIO):
    def __init__(self, data: bytes, length: int | None = None) -> None:
        super().__init__(data)
        self.headers = {} if length is None else {"Content-Length": str(length)}


def test_downloads_stream_under_the_size_cap(tmp_path, tarball, monkeypatch):
    data = tarball.read_bytes()
    opened = []

    def urlopen(request, timeout):
        opened.append(request.full_url)
        return FakeResponse(data + (b"x" * (3 << 20) if len(opened) > 1 else b""))

    monkeypatch.setattr(source.urllib.request, "urlopen", urlopen)
    folder = source.make_data_folder(tmp_path / "data", log=lambda _: None)
    assert folder.pictures == 3 and opened == [source.PIN.url]
    # A server sending more than the pin (and no length) is cut off while streaming.
    with pytest.raises(ValueError, match="more than the pinned"):
        source.make_data_folder(tmp_path / "data2")
    assert not (tmp_path / "data2").exists() and leftovers(tmp_path) == []
    monkeypatch.setattr(source.urllib.request, "urlopen", lambda r, timeout: FakeResponse(b"", length=10**12))
    with pytest.raises(ValueError, match="the server offers"):
        source.make_data_folder(tmp_path / "data3")
    assert not (tmp_path / "data3").exists()


def test_network_errors_are_one_line(tmp_path, monkeypatch):
    def urlopen(request, timeout):
        raise source.urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(source.urllib.request, "urlopen", urlopen)
    with pytest.raises(ValueError, match=r"^https://registry.npmjs.org/\S+: download failed \(Name or service"):
        source.make_data_folder(tmp_path / "data")
    assert not (tmp_path / "data").exists() and leftovers(tmp_path) == []


def link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize(
    "member, why",
    [
        (link("package/img/google/64/1f436.png", "/etc/passwd", tarfile.SYMTYPE), "is a link"),
        (link("package/extra", "package/LICENSE", tarfile.LNKTYPE), "is a link"),
        (tarfile.TarInfo("package/../../escape.png"), "reaches outside"),
        (tarfile.TarInfo("/etc/cron.d/x"), "absolute path"),
        (link("package/fifo", "", tarfile.FIFOTYPE), "not a regular file"),
    ],
)
def test_unsafe_members_are_refused(tmp_path, monkeypatch, member, why):
    tarball = write_tarball(tmp_path / "bad.tgz", package_members(), extra=[member])
    pin_to(monkeypatch, tarball)
    with pytest.raises(ValueError, match=why):
        source.make_data_folder(tmp_path / "data", tarball=tarball)
    assert not (tmp_path / "data").exists() and leftovers(tmp_path) == []
    assert not (tmp_path.parent / "escape.png").exists()


@pytest.mark.parametrize(
    "picture_bytes, why",
    [(png((1, 2, 3, 255), size=32), "32x32, not 64x64"), (b"\x89PNG\r\n\x1a\nnot really", "not a readable PNG")],
)
def test_pictures_are_checked_before_they_are_written(tmp_path, monkeypatch, picture_bytes, why):
    members = package_members()
    members["package/img/google/64/1f34e.png"] = picture_bytes
    tarball = write_tarball(tmp_path / "bad.tgz", members)
    pin_to(monkeypatch, tarball)
    with pytest.raises(ValueError, match=f"1f34e.png: .*{why}"):
        source.make_data_folder(tmp_path / "data", tarball=tarball)
    assert not (tmp_path / "data").exists()


def test_a_malformed_record_is_a_one_line_error(tmp_path, monkeypatch):
    members = package_members()
    members["package/emoji.json"] = json.dumps([*RECORDS[:1], {**RECORDS[1], "name": 7}]).encode()
    tarball = write_tarball(tmp_path / "bad.tgz", members)
    pin_to(monkeypatch, tarball)
    with pytest.raises(ValueError, match=r"emoji.json: record 1 has no proper name$"):
        source.make_data_folder(tmp_path / "data", tarball=tarball)


def test_an_existing_folder_is_kept_or_replaced_only_when_asked(tmp_path, tarball):
    out = tmp_path / "data"
    source.make_data_folder(out, tarball=tarball)
    stamp = (out / "SOURCES.json").read_bytes()
    again = source.make_data_folder(out, tarball=tmp_path / "absent.tgz")  # not even read: already there
    assert again.already_there and again.pictures == 3 and (out / "SOURCES.json").read_bytes() == stamp
    # A data folder of another version is refused, then replaced with --overwrite.
    sources = json.loads(stamp)
    sources["sources"][0]["version"] = "15.0.1"
    (out / "SOURCES.json").write_text(json.dumps(sources))
    with pytest.raises(ValueError, match="it holds another download.*--overwrite"):
        source.make_data_folder(out, tarball=tarball)
    replaced = source.make_data_folder(out, tarball=tarball, overwrite=True)
    assert not replaced.already_there and json.loads((out / "SOURCES.json").read_text())["sources"][0]["version"] == (
        "16.0.0"
    )
    assert leftovers(tmp_path) == []
    # A folder that is no data folder at all is never deleted.
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="not an emoji data folder"):
            source.make_data_folder(other, tarball=tarball, overwrite=overwrite)
    assert (other / "notes.txt").read_text() == "keep me"
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        source.make_data_folder(tmp_path / "a-file", tarball=tarball)


def test_verify_catches_a_changed_or_missing_file(tmp_path, tarball):
    out = tmp_path / "data"
    source.make_data_folder(out, tarball=tarball)
    changed = out / "google/1f34e.png"
    data = bytearray(changed.read_bytes())
    data[-5] ^= 0xFF
    changed.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"google/1f34e.png: changed since it was written \(sha256 expected"):
        source.verify(out)
    # A damaged folder is not "already there": it is refused, and --overwrite writes it again.
    with pytest.raises(ValueError, match="1f34e.png: changed.*--overwrite"):
        source.make_data_folder(out, tarball=tarball)
    source.make_data_folder(out, tarball=tarball, overwrite=True)
    source.verify(out)
    (out / "google/1f436.png").unlink()
    with pytest.raises(ValueError, match=r"1f436.png: missing$"):
        source.verify(out)
    sources = json.loads((out / "SOURCES.json").read_text())
    sources["files"] = {"../outside": "0" * 64}
    (out / "SOURCES.json").write_text(json.dumps(sources))
    with pytest.raises(ValueError, match="lies outside the folder"):
        source.verify(out)
    with pytest.raises(ValueError, match="SOURCES.json: missing"):
        source.verify(tmp_path)


def test_the_data_command_end_to_end(tmp_path, tarball, capsys):
    out = tmp_path / "data"
    assert main(["data", "emoji", "--out", str(out), "--tarball", str(tarball)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {out}: 3 pictures (emoji-datasource-google 16.0.0)")
    assert [e.name for e in load_catalogue(out)] == KEPT
    assert main(["data", "emoji", "--out", str(out), "--tarball", str(tarball)]) == 0
    assert capsys.readouterr().out == f"{out}: already there (3 pictures, emoji-datasource-google 16.0.0)\n"
    changed = tmp_path / "changed.tgz"
    data = tarball.read_bytes()
    changed.write_bytes(data[:-1] + bytes([data[-1] ^ 0x01]))
    assert main(["data", "emoji", "--out", str(tmp_path / "other"), "--tarball", str(changed)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("diffuse: error: ") and error.count("\n") == 1 and "expected sha256" in error
    assert not (tmp_path / "other").exists()
    assert main(["data", "emoji", "--out", str(tmp_path / "other"), "--tarball", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"diffuse: error: {tmp_path}: not a file\n"
    assert not (tmp_path / "other").exists()
    with pytest.raises(SystemExit):
        main(["data", "emoji"])  # --out is required
