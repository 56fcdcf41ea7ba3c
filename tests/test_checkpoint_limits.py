"""Limits on everything a checkpoint or model folder declares, checked before it is used.

Hostile or damaged files (a safetensors header length of 2**40, offsets as strings, a
config.json asking for twenty thousand blocks per level, a zip record cut short, float32
weights that overflow float16) must each be refused with a CheckpointError that names the
file and the field, fast and without the memory the file asks for.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffuse
from diffuse.checkpoints.errors import CheckpointError
from diffuse.checkpoints.fill import build_and_fill
from diffuse.checkpoints.reader import read_state_dict
from diffuse.checkpoints.single_file import join_single_file
from diffuse.models.configs import SD1

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


def write_safetensors(path: Path, header: object, data: bytes = b"", raw: bytes | None = None) -> Path:
    """A file with `header` (or the `raw` header bytes) as written, however wrong."""
    body = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


# ---------------------------------------------------------------- safetensors headers: memory


PEAK_GROWTH = """
import sys
from diffuse.checkpoints.reader import read_state_dict

def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

before = peak_mb()
try:
    read_state_dict(sys.argv[1])
    print("loaded")
except Exception as e:
    print(type(e).__name__, str(e).replace(chr(10), " "))
print(peak_mb() - before)
"""


def read_in_subprocess(path: Path) -> tuple[str, float]:
    """What reading `path` raised, and how far it raised the process's peak resident memory (MB)."""
    done = subprocess.run(
        [sys.executable, "-c", PEAK_GROWTH, str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0 and len(lines) == 2, done.stdout + done.stderr
    return lines[0], float(lines[1])


@linux_only
@pytest.mark.parametrize(
    "declared, file_size",
    [
        (2**40, 2**40 + 8 + 64),  # a terabyte header, in a sparse file that really is that long
        (150_000_000, 150_000_000 + 8 + 64),  # over the cap, and the file is long enough to hold it
        (300_000_000, 4096),  # over the cap and longer than the file
    ],
)
def test_header_over_the_cap_is_refused_unread(tmp_path, declared, file_size):
    path = tmp_path / "huge-header.safetensors"
    path.write_bytes(struct.pack("<Q", declared) + b'{"w": {')
    with open(path, "r+b") as f:
        f.truncate(file_size)  # sparse: no disk, no memory
    error, growth_mb = read_in_subprocess(path)
    assert error.startswith("CheckpointError") and "huge-header.safetensors" in error
    assert f"header length {declared} is over the 100000000-byte limit" in error
    assert growth_mb < 50, growth_mb


@linux_only
def test_millions_of_values_are_refused_before_parsing(tmp_path):
    # Valid JSON of 3.3 million empty lists: json would build ~200 MB of Python objects from 10 MB.
    path = write_safetensors(tmp_path / "lists.safetensors", None, raw=b'{"w": [' + b"[]," * 3_300_000 + b"[]]}")
    error, growth_mb = read_in_subprocess(path)
    assert error.startswith("CheckpointError") and "lists.safetensors" in error
    assert "header holds over 1000000 JSON values" in error
    assert growth_mb < 50, growth_mb


def test_too_many_values_refused(tmp_path, monkeypatch):
    from diffuse.checkpoints import safetensors_header

    monkeypatch.setattr(safetensors_header, "MAX_HEADER_VALUES", 10)
    header = {f"t{i}": entry(offsets=(8 * i, 8 * i + 8)) for i in range(4)}
    path = write_safetensors(tmp_path / "wide.safetensors", header, bytes(32))
    with pytest.raises(CheckpointError, match=r"wide\.safetensors: safetensors header holds over 10 JSON values"):
        read_state_dict(path)


# ---------------------------------------------------------------- safetensors headers: each field


@pytest.mark.parametrize(
    "header, data, expected",
    [
        (
            {"w": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}},
            bytes(8),
            r"tensor 'w': data_offsets \['0', '8'\] is not a list of two integers",
        ),
        (
            {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}},
            bytes(8),
            r"tensor 'w': data_offsets \[0\] is not",
        ),
        ({"w": entry(dtype="F31")}, bytes(8), r"tensor 'w': dtype 'F31' is not one of"),
        ({"w": entry(dtype=4)}, bytes(8), r"tensor 'w': dtype 4 is not one of"),
        ({"w": entry(shape=(2, -1))}, bytes(8), r"tensor 'w': shape \[2, -1\] has a dimension that is not"),
        (
            {"w": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}},
            bytes(8),
            r"tensor 'w': shape \[True, 2\]",
        ),
        (
            {"w": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}},
            bytes(8),
            r"tensor 'w': shape '2' is not a list",
        ),
        ({"w": entry(shape=(1,) * 9, offsets=(0, 4))}, bytes(4), r"tensor 'w': shape .* is not a list of at most 8"),
        (
            {"w": entry(shape=(3,))},
            bytes(8),
            r"tensor 'w': shape \[3\] of F32 needs 12 bytes but data_offsets \[0, 8\] hold 8",
        ),
        ({"w": entry(offsets=(8, 0))}, bytes(8), r"tensor 'w': data_offsets \[8, 0\] are not in order"),
        (
            {"w": entry(offsets=(0, 8)), "v": entry(offsets=(4, 12))},
            bytes(12),
            r"tensor 'v'.s data 4\.\.12 overlaps tensor 'w'",
        ),
        ({"w": entry(offsets=(4, 12))}, bytes(12), r"bytes 0\.\.4 of the data area belong to no tensor"),
        ({"w": entry()}, bytes(12), r"its tensors cover 8 bytes of data but the file has 12"),
        (
            {"w": entry(offsets=(0, 8)), "v": entry(offsets=(8, 16))},
            bytes(12),
            r"truncated: header promises 16 bytes .* \(tensor 'v'\)",
        ),
        ({"w": [1, 2]}, bytes(8), r"tensor 'w': is a JSON list, not an object"),
        ({"w": "F32"}, bytes(8), r"tensor 'w': is a JSON str, not an object"),
        ({"w": {**entry(), "extra": 1}}, bytes(8), r"tensor 'w': unknown field\(s\) 'extra'"),
        ({"__metadata__": {"format": 1}, "w": entry()}, bytes(8), r"__metadata__ must be an object of strings"),
        ({"__metadata__": ["pt"], "w": entry()}, bytes(8), r"__metadata__ must be an object of strings"),
    ],
)
def test_malformed_header_field_named(tmp_path, header, data, expected):
    path = write_safetensors(tmp_path / "odd.safetensors", header, data)
    with pytest.raises(CheckpointError, match=rf"odd\.safetensors: .*{expected}"):
        read_state_dict(path)


@pytest.mark.parametrize(
    "raw, expected",
    [
        (b'{"w": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested deeper"),  # deep nesting: refused, not a RecursionError
        (b'{"w": {"dtype": {"a": {"b": 1}}, "shape": [], "data_offsets": [0, 0]}}', "nested deeper"),
        (b'{"w": {"dtype": "F32", "shape": [[2]], "data_offsets": [0, 8]}}', "nested deeper"),
        (
            b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
            "'w' appears twice",
        ),
        (b'{"w": "[{]"}', "tensor 'w': is a JSON str, not an object"),  # brackets inside strings are not structure
        (b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}} \xff', "corrupt safetensors header"),
    ],
)
def test_malformed_header_structure_named(tmp_path, raw, expected):
    path = write_safetensors(tmp_path / "odd.safetensors", None, bytes(8), raw=raw)
    with pytest.raises(CheckpointError, match=r"odd\.safetensors: ") as err:
        read_state_dict(path)
    assert expected in str(err.value)


def test_well_formed_header_with_metadata_and_empty_tensor_loads(tmp_path):
    state = {"w": torch.randn(3, 2), "empty": torch.zeros(0, 5), "h": torch.randn(4).half()}
    path = tmp_path / "fine.safetensors"
    save_file(state, path, metadata={"format": "pt", "note": 'brackets {"[" in a string'})
    got = read_state_dict(path)
    assert all(torch.equal(got[k], v) for k, v in state.items())


# ---------------------------------------------------------------- torch zip records


def cut_record(path: Path, name_end: str, cut: int) -> str:
    """Remove the last `cut` bytes of a record's data and move everything after it up, keeping the
    central directory and end records consistent: only the record itself is now short."""
    data = bytearray(path.read_bytes())
    infos = zipfile.ZipFile(path).infolist()
    record = max(
        (i for i in infos if "/data/" in i.filename and i.filename.endswith(name_end)), key=lambda i: i.header_offset
    )
    name_len, extra_len = struct.unpack_from("<HH", data, record.header_offset + 26)
    data_end = record.header_offset + 30 + name_len + extra_len + record.compress_size
    del data[data_end - cut : data_end]
    directory = data.rfind(b"PK\x06\x06")  # torch's writer always ends with zip64 records
    cd_offset = struct.unpack_from("<Q", data, directory + 48)[0] - cut
    struct.pack_into("<Q", data, directory + 48, cd_offset)
    locator = data.rfind(b"PK\x06\x07")
    struct.pack_into("<Q", data, locator + 8, directory)
    end = data.rfind(b"PK\x05\x06")
    struct.pack_into("<L", data, end + 16, cd_offset)
    at = cd_offset
    while data[at : at + 4] == b"PK\x01\x02":  # each directory entry: move the later records' offsets up
        offset = struct.unpack_from("<L", data, at + 42)[0]
        if offset > record.header_offset:
            struct.pack_into("<L", data, at + 42, offset - cut)
        lengths = struct.unpack_from("<HHH", data, at + 28)
        at += 46 + sum(lengths)
    path.write_bytes(bytes(data))
    return record.filename


@pytest.mark.parametrize("cut", [8, 40])  # inside the data descriptor's room, and past it
def test_short_zip_record_refused(tmp_path, cut):
    path = tmp_path / "short.ckpt"
    torch.save({"state_dict": {"a": torch.randn(16), "b": torch.randn(32)}}, path)
    name = cut_record(path, "", cut)
    assert zipfile.ZipFile(path).testzip() == name  # the directory reads well; only that record's bytes are wrong
    with pytest.raises(CheckpointError, match=rf"short\.ckpt: zip record '{name}': short"):
        read_state_dict(path)


def test_compressed_zip_record_refused(tmp_path):
    path = tmp_path / "deflated.ckpt"
    torch.save({"w": torch.zeros(64)}, path)
    with zipfile.ZipFile(path) as src:
        records = [(info.filename, src.read(info)) for info in src.infolist()]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as out:
        for name, payload in records:
            out.writestr(name, payload)
    with pytest.raises(CheckpointError, match=r"deflated\.ckpt: zip record '.*': compressed"):
        read_state_dict(path)


def test_zip_directory_in_the_wrong_place_refused(tmp_path):
    path = tmp_path / "moved.ckpt"
    torch.save({"w": torch.zeros(4)}, path)
    data = bytearray(path.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    struct.pack_into("<L", data, end + 12, struct.unpack_from("<L", data, end + 12)[0] + 1)  # directory size
    directory = data.rfind(b"PK\x06\x06")
    struct.pack_into("<Q", data, directory + 40, struct.unpack_from("<Q", data, directory + 40)[0] + 1)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"moved\.ckpt: corrupt torch zip archive: the central directory"):
        read_state_dict(path)


def test_intact_zip_loads(tmp_path):
    state = {"a": torch.randn(5, 3), "b": torch.randn(7).bfloat16()}
    path = tmp_path / "fine.ckpt"
    torch.save({"state_dict": state}, path)
    got = read_state_dict(path)
    assert all(torch.equal(got[k], v) for k, v in state.items())


# ---------------------------------------------------------------- configs in a model folder


@pytest.fixture
def folder(reference_folders, tmp_path) -> Path:
    return Path(shutil.copytree(reference_folders["sd1"], tmp_path / "model"))


def edit_json(path: Path, **fields) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize(
    "file, fields, expected",
    [
        ("unet/config.json", {"layers_per_block": 20000}, "layers_per_block=20000: must be an integer from 1 to 16"),
        ("unet/config.json", {"attention_head_dim": 0}, "attention_head_dim=0: must be an integer from 1"),
        (
            "unet/config.json",
            {"block_out_channels": [32, -64, 64]},
            "block_out_channels=[32, -64, 64]: entry 1 must be",
        ),
        ("unet/config.json", {"block_out_channels": [0, 0, 0]}, "block_out_channels=[0, 0, 0]: entry 0 must be"),
        ("unet/config.json", {"in_channels": "4"}, "in_channels='4': must be an integer"),
        ("unet/config.json", {"norm_num_groups": 5}, "norm_groups=5 does not divide"),
        ("unet/config.json", {"attention_head_dim": [2, 3, 4]}, "heads[1]=3 does not split level 1's 64 channels"),
        ("unet/config.json", {"transformer_layers_per_block": [[1, 1], 10**6, 1]}, "transformer_layers_per_block="),
        ("unet/config.json", {"sample_size": 10**9}, "sample_size=1000000000"),
        ("unet/config.json", {"norm_eps": 0}, "norm_eps=0: must be a finite number above 0"),
        (
            "text_encoder/config.json",
            {"vocab_size": 10**12},
            "vocab_size=1000000000000: must be an integer from 1 to 1048576",
        ),
        ("text_encoder/config.json", {"hidden_size": "32"}, "hidden_size='32': must be an integer"),
        ("text_encoder/config.json", {"num_attention_heads": 0}, "num_attention_heads=0"),
        ("text_encoder/config.json", {"num_attention_heads": 5}, "width=32 does not split into heads=5"),
        ("text_encoder/config.json", {"max_position_embeddings": True}, "max_position_embeddings=True"),
        ("vae/config.json", {"latent_channels": 0}, "latent_channels=0"),
        ("vae/config.json", {"layers_per_block": 20000}, "layers_per_block=20000"),
        ("vae/config.json", {"scaling_factor": "0.18"}, "scaling_factor='0.18'"),
        ("vae/config.json", {"block_out_channels": 64}, "block_out_channels=64: must be a list"),
        ("scheduler/scheduler_config.json", {"num_train_timesteps": 10**9}, "num_train_timesteps=1000000000"),
        ("scheduler/scheduler_config.json", {"beta_end": -1}, "beta_end=-1"),
        ("scheduler/scheduler_config.json", {"prediction_type": "sample"}, "prediction_type='sample': must be one of"),
    ],
)
def test_hostile_config_refused_fast_by_file_and_field(folder, file, fields, expected):
    edit_json(folder / file, **fields)
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as err:
        diffuse.load_pipeline(folder, dtype="float32")
    assert time.perf_counter() - start < 1.0
    assert str(err.value).startswith(f"{folder / file}: ")
    assert expected in str(err.value)


@pytest.mark.parametrize(
    "content, expected",
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("[1, 2]", "holds a JSON list, not an object"),
        ('{"a": ', "not valid JSON"),
    ],
)
def test_unreadable_config_json_named(folder, content, expected):
    (folder / "unet" / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match=rf"unet/config\.json: .*{expected}"):
        diffuse.load_pipeline(folder, dtype="float32")


def test_oversized_config_json_refused_unread(folder):
    with open(folder / "vae" / "config.json", "r+b") as f:
        f.truncate(20_000_000)
    with pytest.raises(CheckpointError, match=r"vae/config\.json: is 20000000 bytes, over the 16000000-byte limit"):
        diffuse.load_pipeline(folder, dtype="float32")


def test_broken_tokenizer_named(folder):
    for name in ("vocab.json", "tokenizer.json"):
        if (folder / "tokenizer" / name).is_file():
            (folder / "tokenizer" / name).write_text('{"model": 5, "the": "wrong shape"}')
    with pytest.raises(CheckpointError, match=r"model/tokenizer: unreadable tokenizer files"):
        diffuse.load_pipeline(folder, dtype="float32")


def test_bad_shard_index_named(folder):
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(folder / "unet" / "part1.safetensors")
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": ["x"]}))
    with pytest.raises(CheckpointError, match=r"index\.json: weight_map must be an object"):
        diffuse.load_pipeline(folder, dtype="float32")


def test_an_unforeseen_fault_is_still_a_checkpoint_error(folder, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("something no check foresaw")

    monkeypatch.setattr(diffuse.loader, "build_and_fill", broken)
    with pytest.raises(CheckpointError, match=r"model: could not be loaded: RuntimeError: something no check foresaw"):
        diffuse.load_pipeline(folder, dtype="float32")


# ---------------------------------------------------------------- shapes read off a single file


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((0, 4, 3, 3), "tensor input_blocks.0.0.weight has shape (0, 4, 3, 3), not 4 non-empty dimensions"),
        ((2**40, 0, 3, 3), "tensor input_blocks.0.0.weight has shape (1099511627776, 0, 3, 3)"),
        ((32, 4, 3), "tensor input_blocks.0.0.weight has shape (32, 4, 3), not 4 non-empty dimensions"),
    ],
)
def test_shapes_read_off_a_single_file_bounded(tmp_path, reference_folders, shape, expected):
    # An empty tensor costs nothing in the file, whatever its shape declares.
    pipe = diffuse.load_pipeline(reference_folders["sd1"], dtype="float32")
    state = join_single_file("sd1", pipe.unet.state_dict(), pipe.vae.state_dict(), pipe.text_encoder.state_dict())
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(shape)
    path = tmp_path / "odd.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    with pytest.raises(CheckpointError, match=r"odd\.safetensors: unrecognized SD1 architecture: ") as err:
        diffuse.load_pipeline(path, dtype="float32")
    assert expected in str(err.value)


@pytest.mark.parametrize(
    "part, fields, expected",
    [
        ("unet", {"num_res_blocks": 20000}, "unet: num_res_blocks=20000: must be an integer from 1 to 16"),
        ("unet", {"model_channels": 100_000}, "unet: model_channels=100000: must be an integer from 1 to 16384"),
        ("unet", {"heads": (8, 0, 8, 8)}, "unet: heads[1]=0"),
        (
            "unet",
            {"num_res_blocks": 16, "transformer_depth": 11},
            "unet: transformer_depth=11 over 100 attention blocks makes 1100",
        ),
        ("text_encoder", {"vocab_size": 10**9}, "text_encoder: vocab_size=1000000000"),
        ("text_encoder", {"heads": 0}, "text_encoder: heads=0"),
        ("vae", {"norm_groups": 0}, "vae: norm_groups=0"),
        ("vae", {"scaling_factor": float("nan")}, "vae: scaling_factor=nan"),
    ],
)
def test_a_given_config_is_checked_before_building(tmp_path, part, fields, expected):
    # A config passed in meets the same limits as one read from a config.json or off a file's shapes.
    config = replace(SD1, **{part: replace(getattr(SD1, part), **fields)})
    path = tmp_path / "given.safetensors"
    save_file({"model.diffusion_model.x": torch.zeros(1), "cond_stage_model.transformer.x": torch.zeros(1)}, path)
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as err:
        diffuse.load_pipeline(path, dtype="float32", config=config)
    assert time.perf_counter() - start < 1.0
    assert str(err.value).startswith(f"{path}: unusable architecture: {expected}")


# ---------------------------------------------------------------- weights that overflow the run's dtype


def test_float32_weight_overflowing_float16_refused(folder):
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    assert state["conv_in.weight"].dtype == torch.float32
    state["conv_in.weight"][0, 0, 0, 0] = 1e6  # finite in float32, Inf in float16
    save_file(state, weights)
    with pytest.raises(CheckpointError) as err:
        diffuse.load_pipeline(folder, dtype="float16")
    message = str(err.value)
    assert message.startswith(f"{weights}: tensor unet.input_blocks.0.0.weight overflows float16: 1 of its")
    assert "largest 1e+06" in message
    loaded = diffuse.load_pipeline(folder, dtype="float32")
    assert loaded.unet.input_blocks[0][0].weight.max().item() == 1e6


@pytest.mark.parametrize(
    "source, dtype, value",
    [
        (torch.float32, torch.float16, 7e4),
        (torch.bfloat16, torch.float16, 1e5),
        (torch.float64, torch.bfloat16, 1e300),
        (torch.float64, torch.float32, 1e300),
    ],
)
def test_every_narrowing_cast_is_checked(tmp_path, source, dtype, value):
    weight = torch.zeros(2, 3, dtype=source)
    weight[1, 2] = -value
    with pytest.raises(CheckpointError, match=rf"w\.pt: tensor lin\.weight overflows {str(dtype)[6:]}: 1 of its 6"):
        build_and_fill(
            lambda: torch.nn.Linear(3, 2, bias=False), {"weight": weight}, tmp_path / "w.pt", "lin", dtype=dtype
        )
    module = build_and_fill(
        lambda: torch.nn.Linear(3, 2, bias=False), {"weight": weight.clone()}, tmp_path / "w.pt", "lin", dtype=source
    )
    assert module.weight.dtype == source


def test_nan_in_the_file_is_named_as_such_after_a_cast(tmp_path):
    weight = torch.zeros(2, 3)
    weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"tensor lin\.weight has 1 non-finite value\(s\) of 6 \(1 NaN, 0 Inf\)"):
        build_and_fill(
            lambda: torch.nn.Linear(3, 2, bias=False),
            {"weight": weight},
            tmp_path / "w.pt",
            "lin",
            dtype=torch.bfloat16,
        )
