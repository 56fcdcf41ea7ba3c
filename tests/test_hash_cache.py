"""Large files' sha256 kept in the user's cache folder, under their stat stamps (diffuse.hashes)."""

import hashlib
import json
import os
import time

import pytest

from diffuse import hashes


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache folder of the test's own; files from 1 KiB count as large, and settle at once."""
    monkeypatch.setenv("DIFFUSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DIFFUSE_HASH_CACHE", raising=False)
    monkeypatch.setattr(hashes, "HASH_CACHE_MIN_BYTES", 1024)
    monkeypatch.setattr(hashes, "SETTLED_SECONDS", 0.0)
    reads = []
    real = hashes._read_sha256
    monkeypatch.setattr(hashes, "_read_sha256", lambda path, chunk_size=1 << 20: reads.append(path) or real(path))
    return reads


def big_file(path, fill=b"a"):
    path.write_bytes(fill * 4096)
    return hashlib.sha256(fill * 4096).hexdigest()


def test_a_second_hash_of_an_unchanged_file_reads_the_cache(tmp_path, cache):
    expected = big_file(tmp_path / "model.safetensors")
    assert hashes.sha256_file(tmp_path / "model.safetensors") == expected
    assert hashes.sha256_file(tmp_path / "model.safetensors") == expected
    assert len(cache) == 1
    kept = json.loads((tmp_path / "cache" / hashes.HASH_CACHE_FILE).read_text())
    assert [entry["sha256"] for entry in kept.values()] == [expected]


def test_a_changed_file_is_read_again(tmp_path, cache):
    path = tmp_path / "model.safetensors"
    big_file(path)
    hashes.sha256_file(path)
    stat = os.stat(path)
    time.sleep(0.05)  # past the clock tick the first write's times fell in (the settle time's job in use)
    changed = big_file(path, b"b")  # same size; its change time moves on
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the modification time put back
    assert hashes.sha256_file(path) == changed and len(cache) == 2


def test_a_file_written_just_now_is_not_kept(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(hashes, "SETTLED_SECONDS", 60.0)
    big_file(tmp_path / "model.safetensors")
    hashes.sha256_file(tmp_path / "model.safetensors")
    hashes.sha256_file(tmp_path / "model.safetensors")
    assert len(cache) == 2 and not (tmp_path / "cache" / hashes.HASH_CACHE_FILE).exists()


def test_small_files_and_a_switched_off_cache_are_always_read(tmp_path, cache, monkeypatch):
    (tmp_path / "small.bin").write_bytes(b"x" * 100)
    hashes.sha256_file(tmp_path / "small.bin")
    hashes.sha256_file(tmp_path / "small.bin")
    monkeypatch.setenv("DIFFUSE_HASH_CACHE", "0")
    big_file(tmp_path / "model.safetensors")
    hashes.sha256_file(tmp_path / "model.safetensors")
    hashes.sha256_file(tmp_path / "model.safetensors")
    assert len(cache) == 4 and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"x": 1}'])
def test_a_damaged_cache_is_made_again(tmp_path, cache, content):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / hashes.HASH_CACHE_FILE).write_text(content)
    expected = big_file(tmp_path / "model.safetensors")
    assert hashes.sha256_file(tmp_path / "model.safetensors") == expected
    assert hashes.sha256_file(tmp_path / "model.safetensors") == expected and len(cache) == 1


def test_the_cache_keeps_the_newest_entries(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(hashes, "HASH_CACHE_ENTRIES", 2)
    for name in "abc":
        big_file(tmp_path / name, name.encode())
        hashes.sha256_file(tmp_path / name)
    kept = json.loads((tmp_path / "cache" / hashes.HASH_CACHE_FILE).read_text())
    assert [os.path.basename(key) for key in kept] == ["b", "c"]


def test_an_unwritable_cache_folder_still_hashes(tmp_path, cache, monkeypatch):
    (tmp_path / "file").write_text("in the way")
    monkeypatch.setenv("DIFFUSE_CACHE", str(tmp_path / "file" / "cache"))
    expected = big_file(tmp_path / "model.safetensors")
    assert hashes.sha256_file(tmp_path / "model.safetensors") == expected
