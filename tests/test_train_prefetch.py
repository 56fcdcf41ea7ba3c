"""Batches made ahead by worker processes come in order and are the inline ones."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from diffuse.shapes.data import DataConfig, ShapesDataset
from diffuse.train.prefetch import batch_stream
from diffuse.train.stages.vae import make_batch


def test_workers_give_the_inline_batches_in_order():
    make = partial(make_batch, ShapesDataset(DataConfig(seed=5, image_size=16)))
    inline = list(batch_stream(make, first_start=7, stride=5, count=3, batches=6))
    ahead = list(batch_stream(make, first_start=7, stride=5, count=3, batches=6, workers=2))
    assert len(inline) == len(ahead) == 6
    assert all(torch.equal(a, b) for a, b in zip(inline, ahead))
    assert torch.equal(inline[1], make(12, 3))


def test_a_closed_stream_stops_its_workers():
    make = partial(make_batch, ShapesDataset(DataConfig(seed=5, image_size=16)))
    stream = batch_stream(make, first_start=0, stride=2, count=2, batches=100, workers=1)
    assert next(stream).shape == (2, 3, 16, 16)
    stream.close()  # terminates the pool; nothing is left waiting
    with pytest.raises(StopIteration):
        next(stream)


def test_negative_workers_are_refused_when_the_stream_is_made():
    with pytest.raises(ValueError, match="data workers"):
        batch_stream(lambda start, count: start, 0, 1, 1, batches=1, workers=-1)


def test_the_command_refuses_negative_workers_before_training(tmp_path, capsys):
    from diffuse.train.__main__ import main_train

    with pytest.raises(SystemExit) as stopped:
        main_train(["vae", "--out", str(tmp_path / "run"), "--data-workers", "-1"])
    assert stopped.value.code == 2 and "--data-workers must be 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
