"""A run records the sha256 of every file it reads from other stages in its checkpoints, and
refuses to resume once one of them holds other content, even at the same path; unchanged, it
resumes bit for bit. The model is tests/train_worker.py's MLP; the input is any file."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
import train_worker

from diffuse.train import state
from diffuse.train.loop import train
from diffuse.train.state import latest_checkpoint, read_checkpoint


def run(out: Path, steps: int, inputs: dict[str, Path] | None) -> list[float]:
    return train(
        train_worker.config(steps, checkpoint_every=2),
        {"net": train_worker.make_net(0.2)},
        train_worker.loss_fn,
        train_worker.make_batch,
        out,
        progress=False,
        inputs=inputs,
    )


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def logged_steps(folder: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (folder / "log.jsonl").read_text().splitlines()]


def test_unchanged_inputs_resume_exactly_and_are_recorded(tmp_path, one_thread):
    teacher = tmp_path / "teacher.safetensors"
    teacher.write_bytes(b"weights, first version")
    straight = run(tmp_path / "straight", 4, {"teacher weights": teacher})
    run(tmp_path / "resumed", 2, {"teacher weights": teacher})
    assert run(tmp_path / "resumed", 4, {"teacher weights": teacher}) == straight
    recorded = read_checkpoint(latest_checkpoint(tmp_path / "resumed"))["inputs"]
    assert recorded == {"teacher weights": {"path": str(teacher), "sha256": sha(b"weights, first version")}}


def test_an_input_with_other_content_at_the_same_path_is_refused(tmp_path, one_thread):
    teacher, out = tmp_path / "teacher.safetensors", tmp_path / "run"
    teacher.write_bytes(b"weights, first version")
    run(out, 2, {"teacher weights": teacher})
    teacher.write_bytes(b"weights, second version")  # replaced in place: same path, same config
    with pytest.raises(ValueError) as refused:
        run(out, 4, {"teacher weights": teacher})
    message = str(refused.value)
    assert "\n" not in message
    assert re.search(
        rf"input teacher weights {re.escape(str(teacher))} has other content than when the checkpoint "
        rf"was written \(sha256 {sha(b'weights, first version')[:12]} then, "
        rf"{sha(b'weights, second version')[:12]} now\)",
        message,
    ), message
    assert "checkpoint-00000002.pt" in message
    assert logged_steps(out) == [1, 2]  # refused before the folder was touched
    teacher.write_bytes(b"weights, first version")  # put back, the run goes on
    assert len(run(out, 4, {"teacher weights": teacher})) == 4


def test_inputs_added_or_dropped_since_the_checkpoint_are_refused(tmp_path, one_thread):
    teacher, other, out = tmp_path / "teacher.bin", tmp_path / "other.bin", tmp_path / "run"
    teacher.write_bytes(b"a")
    other.write_bytes(b"b")
    run(out, 2, {"teacher weights": teacher})
    with pytest.raises(ValueError, match=r"input other \(.*other.bin\) was not an input of the checkpoint's run"):
        run(out, 4, {"teacher weights": teacher, "other": other})
    with pytest.raises(ValueError, match=r"its input teacher weights \(.*teacher.bin\) is not an input of this run"):
        run(out, 4, None)
    with pytest.raises(ValueError, match=r"input teacher weights: .*missing.bin does not exist"):
        run(out, 4, {"teacher weights": tmp_path / "missing.bin"})


def test_a_checkpoint_from_before_inputs_were_recorded_still_resumes(tmp_path, one_thread):
    teacher, out = tmp_path / "teacher.bin", tmp_path / "run"
    teacher.write_bytes(b"a")
    straight = run(tmp_path / "straight", 4, {"teacher weights": teacher})
    run(out, 2, {"teacher weights": teacher})
    path = latest_checkpoint(out)
    payload = torch.load(path, weights_only=True)
    del payload["inputs"], payload["sha256"]  # as written before checkpoints recorded their inputs
    payload["sha256"] = state._content_digest(payload)
    torch.save(payload, path)
    assert run(out, 4, {"teacher weights": teacher}) == straight
    assert read_checkpoint(latest_checkpoint(out))["inputs"]["teacher weights"]["sha256"] == sha(b"a")
