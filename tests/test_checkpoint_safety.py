"""diffuse.checkpoints.reader on hostile and broken files, built here in tmp_path.

Malicious pickles must be refused by name without running their payload (checked
with a marker file the payload would create), whatever the file is called and
whatever TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says. Broken files must fail with a
CheckpointError that names them. Good files must come back bit for bit.
"""

from __future__ import annotations

import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from diffuse.checkpoints.errors import CheckpointError, UnsafeCheckpointError
from diffuse.checkpoints.reader import check_finite, read_state_dict, sniff_format


def tiny_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.diffusion_model.conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "model.diffusion_model.conv.bias": torch.randn(4, generator=g),
        "first_stage_model.scale": torch.randn(2, 5, generator=g).to(torch.float16),
        "cond_stage_model.emb": torch.randn(3, 6, generator=g).to(torch.bfloat16),
    }


def assert_bitwise_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert type(got[key]) is torch.Tensor, key
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape, key
        assert torch.equal(got[key].contiguous().view(torch.uint8), tensor.contiguous().view(torch.uint8)), key


def save_torch(obj, path, fmt: str) -> None:
    torch.save(obj, path, _use_new_zipfile_serialization=(fmt == "torch-zip"))


# ---------------------------------------------------------------- malicious pickles


class RunsShell:
    """Unpickling this runs a shell command through os.system."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class RunsEval:
    """Unpickling this evaluates Python source through builtins.eval."""

    def __init__(self, source: str):
        self.source = source

    def __reduce__(self):
        return (eval, (self.source,))


class Harmless:
    """A plain object: allowed by ordinary pickle, not by a weights-only load."""


def shell_payload(marker) -> RunsShell:
    return RunsShell(f"touch '{marker}'")


def test_shell_payload_is_live_under_plain_pickle(tmp_path):
    # The malicious files below are real: an unrestricted load does run the payload.
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": tiny_state(), "x": shell_payload(marker)}, path)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("fmt", ["torch-zip", "torch-legacy"])
@pytest.mark.parametrize("force_unsafe_env", [False, True])
def test_os_system_refused_without_running(tmp_path, monkeypatch, fmt, force_unsafe_env):
    if force_unsafe_env:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    save_torch({"state_dict": tiny_state(), "callbacks": shell_payload(marker)}, path, fmt)
    assert sniff_format(path) == fmt
    with pytest.raises(UnsafeCheckpointError) as err:
        read_state_dict(path)
    message = str(err.value)
    assert "evil.ckpt" in message
    assert "posix.system" in message or "os.system" in message
    assert not marker.exists()


def test_force_no_weights_only_env_changes_only_torchs_default(tmp_path, monkeypatch):
    # The variable really turns off torch's safe default (a plain torch.load now accepts
    # a foreign class), and still the reader, which asks for weights_only explicitly, refuses.
    path = tmp_path / "foreign.ckpt"
    torch.save({"w": torch.ones(2), "obj": Harmless()}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.warns(UserWarning, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        assert isinstance(torch.load(path)["obj"], Harmless)
    with pytest.raises(UnsafeCheckpointError, match=r"foreign\.ckpt.*Harmless"):
        read_state_dict(path)


@pytest.mark.parametrize("fmt", ["torch-zip", "torch-legacy"])
def test_builtins_eval_refused_without_running(tmp_path, fmt):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = RunsEval(f"__import__('pathlib').Path({str(marker)!r}).touch()")
    save_torch({"w": torch.ones(2), "x": payload}, path, fmt)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pt.*builtins\.eval"):
        read_state_dict(path)
    assert not marker.exists()


def test_malicious_pickle_named_safetensors_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps({"w": shell_payload(marker)}, protocol=2))
    assert sniff_format(path) == "torch-legacy"
    with pytest.raises(UnsafeCheckpointError, match=r"model\.safetensors.*(posix|os)\.system"):
        read_state_dict(path)
    assert not marker.exists()


def test_newer_pickle_protocol_refused_without_running(tmp_path):
    # Protocol 4 frames its opcodes, which the weights-only unpickler does not read at all.
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps({"w": shell_payload(marker)}, protocol=4))
    with pytest.warns(UserWarning, match="pickle protocol"), pytest.raises(UnsafeCheckpointError, match=r"evil\.bin"):
        read_state_dict(path)
    assert not marker.exists()


def test_numpy_array_is_not_on_the_allow_list(tmp_path):
    # Only numpy scalars are stood in for; an array needs numpy's own reconstruction code.
    path = tmp_path / "arrays.ckpt"
    torch.save({"state_dict": tiny_state(), "stats": np.zeros(3)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"arrays\.ckpt.*numpy.*_reconstruct"):
        read_state_dict(path)


# ---------------------------------------------------------------- format from bytes, not names


def test_plain_pickle_named_safetensors_is_sniffed_as_pickle(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=2))
    assert sniff_format(path) == "torch-legacy"
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*not written by torch\.save"):
        read_state_dict(path)


@pytest.mark.parametrize("fmt", ["torch-zip", "torch-legacy"])
def test_torch_checkpoint_named_safetensors_loads(tmp_path, fmt):
    # torch.load alone would hand a *.safetensors path to safetensors by its name.
    path = tmp_path / "model.safetensors"
    save_torch(tiny_state(), path, fmt)
    assert sniff_format(path) == fmt
    assert_bitwise_equal(read_state_dict(path), tiny_state())


def test_safetensors_named_ckpt_loads(tmp_path):
    path = tmp_path / "model.ckpt"
    save_file(tiny_state(), path)
    assert sniff_format(path) == "safetensors"
    assert_bitwise_equal(read_state_dict(path), tiny_state())


@pytest.mark.parametrize("fmt", ["safetensors", "torch-zip", "torch-legacy"])
def test_half_precision_survives(tmp_path, fmt):
    g = torch.Generator().manual_seed(1)
    state = {
        "fp16": torch.randn(7, 5, generator=g).to(torch.float16),
        "bf16": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "fp16.extremes": torch.tensor([6.1e-5, -65504.0, 65504.0, 5.96e-8, -0.0], dtype=torch.float16),
        "bf16.extremes": torch.tensor([3.38e38, -1e-38, 9.2e-41, -0.0], dtype=torch.bfloat16),
    }
    path = tmp_path / "half.weights"
    save_file(state, path) if fmt == "safetensors" else save_torch(state, path, fmt)
    assert sniff_format(path) == fmt
    assert_bitwise_equal(read_state_dict(path), state)


# ---------------------------------------------------------------- real-world .ckpt layouts


def fake_lightning_checkpoint_class(monkeypatch) -> type:
    """A class pickled under Lightning's name, made findable only while this test runs."""
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": "pytorch_lightning.callbacks.model_checkpoint"})
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules[names[-1]].ModelCheckpoint = ModelCheckpoint
    return ModelCheckpoint


@pytest.mark.parametrize("fmt", ["torch-zip", "torch-legacy"])
def test_lightning_ckpt_with_metadata_loads_only_tensors(tmp_path, monkeypatch, fmt):
    ModelCheckpoint = fake_lightning_checkpoint_class(monkeypatch)
    callback = ModelCheckpoint()
    callback.__dict__.update(monitor=None, best_model_path="logs/last.ckpt", best_model_score=None)
    path = tmp_path / "sd-v1.ckpt"
    save_torch(
        {
            "epoch": 6,
            "global_step": np.int64(470000),
            "pytorch-lightning_version": "1.4.2",
            "callbacks": {ModelCheckpoint: {"best_model_path": "logs/last.ckpt"}, "instance": callback},
            "lr": np.float32(1e-4),
            "state_dict": tiny_state(),
        },
        path,
        fmt,
    )
    monkeypatch.undo()  # Lightning's name no longer resolves: loading must not need it
    assert "pytorch_lightning" not in sys.modules
    assert_bitwise_equal(read_state_dict(path), tiny_state())
    assert "pytorch_lightning" not in sys.modules


@pytest.mark.parametrize("wrapper", ["model", "module"])
def test_model_and_module_nesting_unwrapped(tmp_path, wrapper):
    path = tmp_path / "wrapped.pt"
    torch.save({wrapper: tiny_state(), "epoch": 3}, path)
    assert_bitwise_equal(read_state_dict(path), tiny_state())


def test_non_tensors_dropped_and_parameters_become_tensors(tmp_path):
    path = tmp_path / "mixed.pt"
    weight = torch.nn.Parameter(torch.randn(3, 2))
    torch.save({"w": weight, "step": 12, "names": ["a", "b"], "nested": {"x": torch.ones(1)}}, path)
    got = read_state_dict(path)
    assert_bitwise_equal(got, {"w": weight.detach()})
    assert not got["w"].requires_grad


def test_no_tensors_is_an_error(tmp_path):
    path = tmp_path / "counters.ckpt"
    torch.save({"global_step": 10, "epoch": 1}, path)
    with pytest.raises(CheckpointError, match=r"counters\.ckpt.*contains no tensors"):
        read_state_dict(path)


def test_not_a_dict_is_an_error(tmp_path):
    path = tmp_path / "bare.pt"
    torch.save(torch.ones(3), path)
    with pytest.raises(CheckpointError, match=r"bare\.pt.*holds a Tensor"):
        read_state_dict(path)


# ---------------------------------------------------------------- broken files


def test_truncated_safetensors_data(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file(tiny_state(), path)
    whole = path.read_bytes()
    path.write_bytes(whole[:-10])
    promised = r"truncated: header promises \d+ bytes of tensor data but the file has \d+"
    with pytest.raises(CheckpointError, match=rf"cut\.safetensors.*{promised}"):
        read_state_dict(path)


def test_truncated_safetensors_header(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file(tiny_state(), path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*truncated"):
        read_state_dict(path)


def test_corrupt_safetensors_header(tmp_path):
    path = tmp_path / "bad.safetensors"
    body = b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]'  # JSON cut short
    path.write_bytes(len(body).to_bytes(8, "little") + body + bytes(8))
    with pytest.raises(CheckpointError, match=r"bad\.safetensors.*corrupt safetensors header"):
        read_state_dict(path)


@pytest.mark.parametrize("fmt", ["torch-zip", "torch-legacy"])
def test_truncated_ckpt(tmp_path, fmt):
    path = tmp_path / "cut.ckpt"
    save_torch({"state_dict": tiny_state()}, path, fmt)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt.*truncated or corrupt"):
        read_state_dict(path)


LFS_POINTER_TEXT = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:cc6cb27103417325ff94f52b7a5d2dde45a7515b25c255d8e396c90014281516\n"
    "size 4265380512\n"
)


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("v1-5.safetensors", LFS_POINTER_TEXT.encode(), r"Git LFS pointer.*git lfs pull"),
        ("model.ckpt", b"\n<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>", r"HTML page"),
        ("model.ckpt", b"<html><body>404</body></html>", r"HTML page"),
        ("empty.safetensors", b"", r"empty file"),
        ("short.ckpt", b"PK\x03", r"too short"),
        ("noise.bin", bytes(range(7, 64)), r"unrecognized format, first bytes"),
        ("notes.ckpt", b"these are not the weights you are looking for", r"unrecognized format"),
    ],
)
def test_not_a_checkpoint(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    for read in (sniff_format, read_state_dict):
        with pytest.raises(CheckpointError, match=expected) as err:
            read(path)
        assert name in str(err.value) and err.value.path == path


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"absent\.ckpt.*no such file"):
        read_state_dict(tmp_path / "absent.ckpt")
    folder = tmp_path / "weights.safetensors"
    folder.mkdir()
    with pytest.raises(CheckpointError, match=r"weights\.safetensors.*directory"):
        read_state_dict(folder)


# ---------------------------------------------------------------- non-finite weights


@pytest.mark.parametrize("bad_value, kind", [(float("nan"), "1 NaN, 0 Inf"), (float("inf"), "0 NaN, 1 Inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_check_finite_names_file_and_tensor(tmp_path, bad_value, kind, dtype):
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tiny_state().items()}
    state["steps"] = torch.arange(4)  # integer tensors are skipped, not an error
    check_finite(state, tmp_path / "fine.safetensors")
    state["model.diffusion_model.conv.bias"][2] = bad_value
    expected = (
        rf"broken\.safetensors: tensor model\.diffusion_model\.conv\.bias has 1 non-finite value\(s\) of 4 \({kind}\)"
    )
    with pytest.raises(CheckpointError, match=expected):
        check_finite(state, tmp_path / "broken.safetensors")


def test_check_finite_after_reading(tmp_path):
    state = tiny_state()
    state["first_stage_model.scale"][1, 3] = float("-inf")
    path = tmp_path / "overflowed.ckpt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError, match=r"overflowed\.ckpt.*first_stage_model\.scale.*1 Inf"):
        check_finite(read_state_dict(path), path)
