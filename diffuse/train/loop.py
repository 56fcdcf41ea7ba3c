"""The training loop every part of the model shares: AdamW, warmup + cosine, resumable, data-parallel.

A component trainer (autoencoder, text encoder, UNet) supplies three things:

    config      a frozen dataclass that subclasses LoopConfig, adding its own fields
                (or one that holds a LoopConfig in a field named `loop`);
    make_batch  make_batch(start, count) -> batch: the samples with global indices
                start .. start+count-1, a pure function of the index (tensors, or dicts,
                lists or tuples of them; moved to the training device here);
    loss_fn     loss_fn(models, batch, random) -> (loss, logs): the mean loss over the batch
                as a scalar tensor, and a dict of extra floats to log. All randomness of a
                step (noise, timesteps, caption dropout) comes from `random`, a BatchRandom:
                per-sample draws through random.randn / rand / randint are the same whatever
                the number of processes; random.generator (checkpointed too) suits draws that
                do not belong to one sample, since every process holds it in the same state.

The data stream is one endless sequence of sample indices: step s trains on indices
[s*B, (s+1)*B), so the position in the stream is just a number, saved in each checkpoint,
and make_batch decides how an index maps to a sample (index % dataset size for epochs).

Every step appends one JSON line to out_dir/log.jsonl; checkpoints go to
out_dir/checkpoint-<step>.pt. A run started again in the same folder resumes from its
latest checkpoint and, because every RNG state is restored, logs the same losses bit for
bit as a run that was never interrupted.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from diffuse.train import distributed
from diffuse.train.distributed import DistInfo
from diffuse.train.ema import WeightAverage
from diffuse.train.log import LOG_NAME, logged_losses, truncate_log
from diffuse.train.prefetch import batch_stream
from diffuse.train.state import (
    capture_rng_state,
    checkpoint_path,
    input_fingerprints,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    resumable,
    save_checkpoint,
)

OPTIMIZER_NAME = "adamw"
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16}
GENERATOR_NAME = "batch"


@dataclass(frozen=True)
class LoopConfig:
    """How to optimise. Fields marked resumable may change when a run resumes; the rest may not."""

    steps: int = resumable(1000)  # total optimizer steps; raise it to train a finished run further
    batch_size: int = 32  # the global batch, over all processes
    lr: float = 1e-4  # peak learning rate, reached at the end of warmup
    final_lr_fraction: float = 0.1  # the cosine decays to lr * this at the last step
    warmup_steps: int = 100
    weight_decay: float = 0.01  # on weight matrices and kernels only, never on biases or norm scales
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    ema_decay: float = 0.0  # 0: off; else the finished models hold this moving average of their weights (ema.py)
    # "bfloat16": the forward pass's products in bf16 under torch.autocast (CPUs with AMX or
    # AVX512-BF16, GPUs with bf16 tensor cores); weights, gradients, optimizer and loss stay
    # float32. None: float32 throughout.
    autocast: str | None = None
    seed: int = 0
    log_every: int = resumable(10)  # progress-bar refresh and log flush, in steps
    checkpoint_every: int = resumable(500)
    keep_checkpoints: int = resumable(2)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, not {self.lr}")
        if not 0 <= self.final_lr_fraction <= 1:
            raise ValueError(f"final_lr_fraction must be between 0 and 1, not {self.final_lr_fraction}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) (0 turns the average off), not {self.ema_decay}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(
                "warmup_steps, weight_decay and grad_clip must not be negative: "
                f"{self.warmup_steps}, {self.weight_decay}, {self.grad_clip}"
            )
        if len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), not {self.betas}")
        if self.autocast is not None and self.autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast must be one of {', '.join(AUTOCAST_DTYPES)} or null, not {self.autocast!r}")


def learning_rate(config: LoopConfig, step: int) -> float:
    """The learning rate of the update that follows `step` completed steps.

    Linear warmup from lr/warmup to lr (a fresh AdamW's first updates are about lr in size
    whatever the gradient, so starting small keeps them from wrecking the initialisation),
    then a half cosine from lr down to lr * final_lr_fraction at the last step.
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    floor = config.lr * config.final_lr_fraction
    return floor + (config.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class BatchRandom:
    """A step's randomness for this process's rows of the global batch.

    Each draw is made for the whole global batch from one generator that every process
    holds in the same state, and each process keeps its own rows. So a sample's noise
    depends only on the step and its place in the batch, never on how many processes share
    the batch: 2 processes x B/2 draw exactly what 1 process x B draws. The generator's
    state is checkpointed, so a resumed run draws what an uninterrupted one would.
    """

    generator: torch.Generator  # the shared generator; direct draws must be the same on every process
    offset: int  # this process's first row of the global batch
    count: int  # how many rows it holds
    global_batch: int
    device: torch.device

    def randn(self, *sample_shape: int) -> Tensor:
        """Standard normal noise of shape [count, *sample_shape]."""
        return self._rows(torch.randn((self.global_batch, *sample_shape), generator=self.generator))

    def rand(self, *sample_shape: int) -> Tensor:
        """Uniform [0, 1) values of shape [count, *sample_shape]."""
        return self._rows(torch.rand((self.global_batch, *sample_shape), generator=self.generator))

    def randint(self, low: int, high: int, *sample_shape: int) -> Tensor:
        """Integers in [low, high) of shape [count, *sample_shape] (e.g. diffusion timesteps)."""
        return self._rows(torch.randint(low, high, (self.global_batch, *sample_shape), generator=self.generator))

    def _rows(self, values: Tensor) -> Tensor:
        return values[self.offset : self.offset + self.count].to(self.device)


LossFn = Callable[[dict[str, nn.Module], Any, BatchRandom], tuple[Tensor, dict[str, Any]]]
MakeBatch = Callable[[int, int], Any]


def train(
    config: Any,
    models: dict[str, nn.Module],
    loss_fn: LossFn,
    make_batch: MakeBatch,
    out_dir: str | Path,
    *,
    resume: bool = True,
    progress: bool = True,
    data_workers: int = 0,
    inputs: dict[str, str | Path] | None = None,
) -> list[float]:
    """Train `models` for config.steps steps in `out_dir`; returns the loss of every step so far.

    Models with parameters that require grad are trained: put in train mode, optimised by
    one AdamW, checkpointed, and (under torchrun) wrapped in DistributedDataParallel before
    loss_fn sees them; call each such model once per step, through its forward. The rest
    (a frozen autoencoder, say) are passed through untouched. Models are moved to the
    training device; the caller builds them, seeded, before calling. With ema_decay > 0
    the trained models return holding the moving average of their weights (ema.py), which
    is what the caller then saves; the raw weights stay in the checkpoints.

    With resume=True a folder holding checkpoints continues from the latest one (which must
    have been written with the same config, resumable fields aside); with resume=False such
    a folder is refused rather than overwritten.

    data_workers > 0 makes the batches ahead in that many processes (prefetch.py); the
    losses are the same whatever the number, so it is a run's setting, not the config's.

    `inputs` names the files the run depends on beyond its config (another stage's weights
    and final.json): their sha256 goes into every checkpoint, and resuming after one of them
    took other content, even at the same path, is refused (state.check_inputs).
    """
    loop = _loop_config(config)
    out_dir = Path(out_dir)
    started_group = not distributed.is_initialized()
    info = distributed.setup()
    try:
        return _train(
            config,
            loop,
            models,
            loss_fn,
            make_batch,
            out_dir,
            info,
            resume,
            progress,
            data_workers,
            input_fingerprints(inputs or {}),
        )
    finally:
        if started_group:
            distributed.teardown()


@dataclass
class _Run:
    """One run's settings and what its steps change; the checkpoint holds the changing part."""

    config: Any
    loop: LoopConfig
    out_dir: Path
    info: DistInfo
    inputs: dict[str, dict[str, str]]
    trainable: dict[str, nn.Module]
    params: list[nn.Parameter]  # the trainable parameters, in the models' order: the gradient norm's order
    generator: torch.Generator  # the stream BatchRandom draws from, in the same state on every process
    optimizer: torch.optim.AdamW
    average: WeightAverage | None
    step: int = 0
    data_position: int = 0

    def checkpointed(self) -> dict[str, dict]:
        """The models, optimizers and generators a checkpoint holds, by name."""
        averages = self.average.averages if self.average is not None else {}
        return {
            "models": {**self.trainable, **averages},
            "optimizers": {OPTIMIZER_NAME: self.optimizer},
            "generators": {GENERATOR_NAME: self.generator},
        }


@dataclass(frozen=True)
class _Shard:
    """This process's rows of each global batch, and the weight that makes its loss a share of the batch's."""

    offset: int
    count: int
    weight: float


def _train(
    config: Any,
    loop: LoopConfig,
    models: dict[str, nn.Module],
    loss_fn: LossFn,
    make_batch: MakeBatch,
    out_dir: Path,
    info: DistInfo,
    resume: bool,
    progress: bool,
    data_workers: int,
    inputs: dict[str, dict[str, str]],
) -> list[float]:
    run = _new_run(config, loop, models, out_dir, info, inputs)
    _resume(run, resume)
    losses = _open_log(run)
    wrapped = {name: distributed.wrap(m, info) if name in run.trainable else m for name, m in models.items()}
    offset, count = distributed.shard(loop.batch_size, info)
    shard = _Shard(offset, count, distributed.shard_weight(loop.batch_size, info))
    bar = tqdm(
        total=loop.steps,
        initial=min(run.step, loop.steps),
        unit="step",
        desc=out_dir.name,
        disable=not (progress and info.is_main),
    )
    log = open(out_dir / LOG_NAME, "a", encoding="utf-8") if info.is_main else None
    batches = batch_stream(
        make_batch, run.data_position + offset, loop.batch_size, count, max(0, loop.steps - run.step), data_workers
    )
    try:
        while run.step < loop.steps:
            record = _train_step(run, wrapped, loss_fn, next(batches), shard)
            losses.append(record["loss"])
            _show(record, log, bar, loop.log_every)
            if run.step % loop.checkpoint_every == 0 or run.step == loop.steps:
                _save(run, log)
    finally:
        batches.close()
        bar.close()
        if log is not None:
            log.close()
    if run.average is not None:
        run.average.copy_to_live()
    return losses


def _new_run(
    config: Any,
    loop: LoopConfig,
    models: dict[str, nn.Module],
    out_dir: Path,
    info: DistInfo,
    inputs: dict[str, dict[str, str]],
) -> _Run:
    """The models on the training device, the trainable ones in train mode, and a fresh optimizer,
    generator and weight average, all seeded from the config."""
    trainable = {name: m for name, m in models.items() if any(p.requires_grad for p in m.parameters())}
    if not trainable:
        raise ValueError(f"none of the models {sorted(models)} has parameters that require grad: nothing to train")
    for model in models.values():
        model.to(info.device)
    for model in trainable.values():
        model.train()
    _seed_process(loop.seed, info.rank)
    # One stream for all processes (same seed everywhere): see BatchRandom.
    generator = torch.Generator().manual_seed(loop.seed)
    optimizer = _make_optimizer(loop, trainable)
    average = WeightAverage(trainable, loop.ema_decay) if loop.ema_decay > 0 else None
    params = [p for m in trainable.values() for p in m.parameters() if p.requires_grad]
    return _Run(config, loop, out_dir, info, inputs, trainable, params, generator, optimizer, average)


def _resume(run: _Run, resume: bool) -> None:
    """Continue from the folder's latest checkpoint, if it has one (refused with resume=False)."""
    latest = latest_checkpoint(run.out_dir)
    if latest is None:
        return
    if not resume:
        raise ValueError(
            f"{run.out_dir} already holds checkpoints (latest {latest.name}); "
            "resume from them or train in another folder"
        )
    state = load_checkpoint(latest, config=run.config, **run.checkpointed(), rank=run.info.rank, inputs=run.inputs)
    run.step, run.data_position = state.step, state.data_position


def _open_log(run: _Run) -> list[float]:
    """The losses logged up to the run's step, the log cut back to them first (by the main process)."""
    log_path = run.out_dir / LOG_NAME
    if run.info.is_main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        truncate_log(log_path, run.step)
    distributed.barrier()  # the others read the log only once it is cut back to the checkpoint
    return logged_losses(log_path)


def _train_step(run: _Run, wrapped: dict[str, nn.Module], loss_fn: LossFn, batch: Any, shard: _Shard) -> dict:
    """One optimizer step on this process's rows of the next global batch; returns its log record."""
    loop, device = run.loop, run.info.device
    lr = learning_rate(loop, run.step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    batch_random = BatchRandom(run.generator, shard.offset, shard.count, loop.batch_size, device)
    with forward_precision(loop, device):
        loss, logs = loss_fn(wrapped, _to_device(batch, device), batch_random)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        what = f"a tensor of shape {list(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return the batch's mean loss as a scalar tensor, not {what}")

    run.optimizer.zero_grad(set_to_none=True)
    (loss * shard.weight).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, loop.grad_clip if loop.grad_clip > 0 else math.inf)
    means = _global_means(loss, logs, shard.count, loop.batch_size, device)
    if not math.isfinite(means["loss"]):
        raise ValueError(
            f"the loss became {means['loss']} at step {run.step + 1}; "
            f"not updating the models (latest checkpoint: {latest_checkpoint(run.out_dir)})"
        )
    run.optimizer.step()
    if run.average is not None:
        run.average.update(run.step)
    run.step += 1
    run.data_position += loop.batch_size
    return {"step": run.step, **means, "lr": lr, "grad_norm": float(grad_norm)}


def forward_precision(loop: LoopConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """What a step's forward pass runs under: torch.autocast to the config's dtype, or nothing."""
    if loop.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[loop.autocast])


def _show(record: dict, log: IO[str] | None, bar: tqdm, log_every: int) -> None:
    """Append the step's record to the log; refresh the bar and flush the log every log_every steps."""
    if log is not None:
        log.write(json.dumps(record) + "\n")
    bar.update(1)
    if record["step"] % log_every == 0:
        if log is not None:
            log.flush()
        bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{record['lr']:.3g}")


def _save(run: _Run, log: IO[str] | None) -> None:
    """Write a checkpoint at the run's step (the main process; the others hand it their RNG states)."""
    if log is not None:
        # The log must reach the checkpoint's step before the checkpoint exists.
        log.flush()
        os.fsync(log.fileno())
    rng_states = distributed.gather_objects(capture_rng_state(), run.info)
    if run.info.is_main:
        save_checkpoint(
            checkpoint_path(run.out_dir, run.step),
            config=run.config,
            **run.checkpointed(),
            step=run.step,
            data_position=run.data_position,
            rng_states=rng_states,
            extra={"world_size": run.info.world_size},
            inputs=run.inputs,
        )
        prune_checkpoints(run.out_dir, run.loop.keep_checkpoints)
    distributed.barrier()


def _loop_config(config: Any) -> LoopConfig:
    if isinstance(config, LoopConfig):
        return config
    if isinstance(getattr(config, "loop", None), LoopConfig):
        return config.loop
    raise ValueError(
        f"config must be a LoopConfig, a subclass of it, or hold one in a field named 'loop'; "
        f"got {type(config).__name__}"
    )


def _seed_process(seed: int, rank: int) -> None:
    """Seed this process's global RNGs (dropout and anything else drawing implicitly).

    Each process gets its own stream, so two processes' dropout masks differ as two halves
    of one batch's would.
    """
    process_seed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
    random.seed(process_seed)
    np.random.seed(process_seed)
    torch.manual_seed(process_seed)


def _make_optimizer(config: LoopConfig, models: dict[str, nn.Module]) -> torch.optim.AdamW:
    # Weight decay shrinks weights toward zero to regularise them; on biases and norm scales
    # (the 1-d parameters) it only fights the values the layer needs, so they are exempt.
    decay, no_decay = [], []
    for model in models.values():
        for p in model.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=config.betas)


def _global_means(
    loss: Tensor, logs: dict[str, Any], count: int, global_batch: int, device: torch.device
) -> dict[str, float]:
    """The loss and logs averaged over the whole global batch, as one process would compute them."""
    # A loss_fn may log its own "loss"; the loop's (averaged over all processes) replaces it.
    logs = {name: value for name, value in logs.items() if name != "loss"}
    reserved = {"step", "lr", "grad_norm"} & set(logs)
    if reserved:
        raise ValueError(f"loss_fn logs {sorted(reserved)}, names the loop writes itself")
    names = ["loss", *logs]
    values = [loss.detach()] + [torch.as_tensor(v).detach() for v in logs.values()]
    if not distributed.is_initialized():
        return {name: float(v) for name, v in zip(names, values)}
    # Weighted by each process's share of the batch, summed in float64 over the processes.
    stacked = torch.stack([v.to(device=device, dtype=torch.float64) for v in values]) * count
    totals = distributed.all_sum(stacked) / global_batch
    return {name: float(v) for name, v in zip(names, totals.tolist())}


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(_to_device(value, device) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(value, device) for value in batch)
    return batch
