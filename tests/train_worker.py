"""A tiny training run for tests/test_train_loop.py, started as a subprocess: plainly, or
under `python -m torch.distributed.run` for the data-parallel tests.

    python tests/train_worker.py OUT_DIR --steps 40 --checkpoint-every 8 [--batch-size 8 [7 ...]]
        [--dropout 0.2] [--sleep 0.02]

The model is a two-layer MLP with dropout (the process-global RNG) fed inputs with noise
drawn from the loop's BatchRandom (the checkpointed generator), so a resumed run matches an
uninterrupted one only if both random streams are restored. The tests also import `run`
to train the same model in their own process.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from diffuse.train import distributed
from diffuse.train.loop import BatchRandom, LoopConfig, train

FEATURES, HIDDEN, OUTPUTS, DATASET_SIZE = 6, 32, 3, 50


def make_batch(start: int, count: int) -> dict[str, torch.Tensor]:
    """Samples start..start+count-1: a pure function of the index, cycling through a small dataset."""
    index = (torch.arange(start, start + count, dtype=torch.float64) % DATASET_SIZE)[:, None]
    x = torch.sin(0.37 * index * torch.arange(1, FEATURES + 1, dtype=torch.float64) + 0.5)
    mixing = torch.cos(torch.arange(FEATURES * OUTPUTS, dtype=torch.float64)).reshape(FEATURES, OUTPUTS)
    return {"x": x.float(), "y": torch.tanh(x @ mixing).float()}


def loss_fn(models: dict[str, nn.Module], batch: dict, random: BatchRandom) -> tuple[torch.Tensor, dict]:
    noisy = batch["x"] + 0.1 * random.randn(FEATURES)
    prediction = models["net"](noisy)
    loss = F.mse_loss(prediction, batch["y"])
    return loss, {"abs_error": (prediction - batch["y"]).abs().mean()}


def config(steps: int, checkpoint_every: int, batch_size: int = 8) -> LoopConfig:
    return LoopConfig(
        steps=steps,
        batch_size=batch_size,
        lr=3e-2,
        warmup_steps=3,
        checkpoint_every=checkpoint_every,
        log_every=1,
        keep_checkpoints=2,
        seed=7,
    )


def make_net(dropout: float) -> nn.Module:
    torch.manual_seed(1234)  # the same starting weights in every run
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.GELU(), nn.Dropout(dropout), nn.Linear(HIDDEN, OUTPUTS))


def run(
    out_dir: str, steps: int, checkpoint_every: int, *, batch_size: int = 8, dropout: float = 0.2, sleep: float = 0.0
) -> list[float]:
    def slow_batch(start: int, count: int) -> dict:
        time.sleep(sleep)
        return make_batch(start, count)

    return train(
        config(steps, checkpoint_every, batch_size),
        {"net": make_net(dropout)},
        loss_fn,
        slow_batch if sleep else make_batch,
        out_dir,
        progress=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--checkpoint-every", type=int, required=True)
    parser.add_argument(
        "--batch-size", type=int, nargs="+", default=[8], help="several: one run per size, each in OUT_DIR/batch-<size>"
    )
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds per batch, to leave time for a kill")
    args = parser.parse_args()
    # One thread: the same arithmetic as the tests' in-process runs, and two processes do not
    # fight over two cores.
    torch.set_num_threads(1)
    if len(args.batch_size) == 1:
        run(
            args.out_dir,
            args.steps,
            args.checkpoint_every,
            batch_size=args.batch_size[0],
            dropout=args.dropout,
            sleep=args.sleep,
        )
        return
    # Several runs share one process group, joined once here: train() then leaves it alone.
    distributed.setup()
    try:
        for batch_size in args.batch_size:
            run(
                f"{args.out_dir}/batch-{batch_size}",
                args.steps,
                args.checkpoint_every,
                batch_size=batch_size,
                dropout=args.dropout,
                sleep=args.sleep,
            )
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main()
