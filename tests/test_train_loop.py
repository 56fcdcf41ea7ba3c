"""The shared training machinery (diffuse.train.state, .loop, .distributed).

Checkpoints restore a run exactly (models, optimizer, every RNG), refuse a different config
with a message naming each field, and report missing, truncated or damaged files; a run
killed with SIGKILL and resumed logs bit-for-bit the losses of an uninterrupted run, and
re-seeding either random stream instead of restoring it breaks that; two DDP processes
(torchrun, gloo) with global batch B end with the parameters of one process with batch B.

The model is tests/train_worker.py's two-layer MLP with dropout and input noise. The
subprocess runs and the in-process runs use one thread each, so their arithmetic is the same.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import train_worker
from torch import nn

from diffuse.train import loop, state
from diffuse.train.distributed import DistInfo, shard, shard_weight
from diffuse.train.ema import WeightAverage
from diffuse.train.loop import BatchRandom, LoopConfig, learning_rate, train
from diffuse.train.state import (
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_checkpoint,
    resumable,
    save_checkpoint,
)

WORKER = Path(__file__).with_name("train_worker.py")


def logged(folder: Path) -> list[dict]:
    with open(folder / "log.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def worker_command(out_dir: Path, *args: str) -> list[str]:
    return [sys.executable, str(WORKER), str(out_dir), *args]


def worker_env() -> dict[str, str]:
    # The package is importable from the repository root whether or not it is installed.
    paths = [str(Path(__file__).resolve().parents[1]), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(paths)}


def tiny_model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).square().mean().backward()
    optimizer.step()  # so the optimizer has moments to save
    return model, optimizer


# ---- checkpoint files ----------------------------------------------------------------------------


def draws(generator: torch.Generator) -> list:
    return [
        torch.rand(3),
        torch.randn(3, generator=generator),
        random.random(),
        random.gauss(0, 1),
        np.random.rand(2),
        np.random.randn(),
    ]


def test_checkpoint_restores_models_optimizer_and_every_rng(tmp_path, one_thread):
    model, optimizer = tiny_model_and_optimizer()
    generator = torch.Generator().manual_seed(5)
    torch.randn(4, generator=generator)
    random.gauss(0, 1)
    np.random.randn()  # both gauss caches now hold a value, which must survive too
    path = save_checkpoint(
        tmp_path / "c.pt",
        config=LoopConfig(),
        models={"net": model},
        optimizers={"adamw": optimizer},
        step=3,
        data_position=24,
        generators={"noise": generator},
        extra={"note": "hi", "ema": torch.ones(2)},
    )
    saved_params = {k: v.clone() for k, v in model.state_dict().items()}
    saved_moment = optimizer.state[optimizer.param_groups[0]["params"][0]]["exp_avg"].clone()
    expected = draws(generator)

    model(torch.randn(5, 3)).sum().backward()  # move everything on
    optimizer.step()
    assert not torch.equal(model[0].weight, saved_params["0.weight"])

    resumed = load_checkpoint(
        path,
        config=LoopConfig(),
        models={"net": model},
        optimizers={"adamw": optimizer},
        generators={"noise": generator},
    )
    assert (resumed.step, resumed.data_position, resumed.extra["note"]) == (3, 24, "hi")
    assert torch.equal(resumed.extra["ema"], torch.ones(2))
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved_params[name]), name
    assert torch.equal(optimizer.state[optimizer.param_groups[0]["params"][0]]["exp_avg"], saved_moment)
    for got, want in zip(draws(generator), expected):
        assert np.array_equal(np.asarray(got), np.asarray(want))


@dataclasses.dataclass(frozen=True)
class ToyShape:
    channels: tuple[int, ...] = (1, 2)


@dataclasses.dataclass(frozen=True)
class ToyTrainConfig(LoopConfig):
    """How a component trainer extends LoopConfig: its own fields, resumable or not, and nested configs."""

    width: int = 4
    sample_every: int = resumable(100)
    shape: ToyShape = ToyShape()


def test_config_mismatch_is_refused_field_by_field(tmp_path, one_thread):
    model, optimizer = tiny_model_and_optimizer()
    models, optimizers = {"net": model}, {"adamw": optimizer}
    path = save_checkpoint(
        tmp_path / "run.pt",
        config=LoopConfig(lr=0.001, batch_size=8, steps=10),
        models=models,
        optimizers=optimizers,
        step=1,
        data_position=8,
    )

    with pytest.raises(ValueError) as refused:
        load_checkpoint(
            path, config=LoopConfig(lr=0.002, batch_size=16, steps=99), models=models, optimizers=optimizers
        )
    message = str(refused.value)
    assert str(path) in message
    assert "lr: checkpoint 0.001, now 0.002" in message
    assert "batch_size: checkpoint 8, now 16" in message
    assert "steps" not in message  # resumable

    more = LoopConfig(lr=0.001, batch_size=8, steps=50, log_every=3, checkpoint_every=5, keep_checkpoints=4)
    assert load_checkpoint(path, config=more, models=models, optimizers=optimizers).step == 1

    toy = tmp_path / "toy.pt"
    save_checkpoint(toy, config=ToyTrainConfig(), models=models, optimizers=optimizers, step=2, data_position=64)
    changed = ToyTrainConfig(width=5, sample_every=7, steps=3000, shape=ToyShape((1, 3)))
    with pytest.raises(ValueError) as refused:
        load_checkpoint(toy, config=changed, models=models, optimizers=optimizers)
    message = str(refused.value)
    assert "width: checkpoint 4, now 5" in message
    assert "shape.channels: checkpoint (1, 2), now (1, 3)" in message
    assert "sample_every" not in message and "steps" not in message
    assert load_checkpoint(toy, config=ToyTrainConfig(sample_every=7), models=models, optimizers=optimizers).step == 2

    with pytest.raises(ValueError, match="config class: checkpoint ToyTrainConfig, now LoopConfig") as refused:
        load_checkpoint(toy, config=LoopConfig(), models=models, optimizers=optimizers)
    assert "width: checkpoint 4, now (absent)" in str(refused.value)

    with pytest.raises(ValueError, match=r"holds models \['net'\], but this run has \['other'\]"):
        load_checkpoint(path, config=more, models={"other": model}, optimizers=optimizers)


class RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (print, ("unpickling ran code",))


def test_damaged_or_foreign_files_are_reported(tmp_path, capsys, one_thread):
    model, optimizer = tiny_model_and_optimizer()
    kwargs = {"config": LoopConfig(), "models": {"net": model}, "optimizers": {"adamw": optimizer}}
    good = save_checkpoint(tmp_path / "good.pt", step=1, data_position=8, **kwargs)
    data = good.read_bytes()

    with pytest.raises(ValueError, match=r"checkpoint .*missing\.pt does not exist"):
        load_checkpoint(tmp_path / "missing.pt", **kwargs)

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"checkpoint .*truncated\.pt is truncated, corrupt or not a checkpoint"):
        load_checkpoint(truncated, **kwargs)

    # torch's zip reader loads a flipped byte inside tensor data without complaint; the stored sha256 does not.
    weight_bytes = model[0].weight.detach().numpy().tobytes()
    where = data.find(weight_bytes)
    assert where > 0
    flipped = bytearray(data)
    flipped[where + 5] ^= 0x40
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"corrupt\.pt is corrupt: its content does not match the sha256"):
        load_checkpoint(corrupt, **kwargs)

    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": model.state_dict()}, foreign)
    with pytest.raises(ValueError, match=r"foreign\.pt is not a diffuse training checkpoint"):
        load_checkpoint(foreign, **kwargs)

    hostile = tmp_path / "hostile.pt"
    torch.save({"format": "diffuse-train-checkpoint", "payload": RunsCodeWhenUnpickled()}, hostile)
    with pytest.raises(ValueError, match=r"hostile\.pt is truncated, corrupt or not a checkpoint"):
        load_checkpoint(hostile, **kwargs)
    assert "unpickling ran code" not in capsys.readouterr().out


def test_saving_is_atomic_and_leaves_no_temporary_files(tmp_path, monkeypatch, one_thread):
    model, optimizer = tiny_model_and_optimizer()
    kwargs = {"config": LoopConfig(), "models": {"net": model}, "optimizers": {"adamw": optimizer}}
    first = save_checkpoint(checkpoint_path(tmp_path, 1), step=1, data_position=8, **kwargs)
    save_checkpoint(checkpoint_path(tmp_path, 1), step=1, data_position=8, **kwargs)  # overwrites in place
    save_checkpoint(checkpoint_path(tmp_path, 2), step=2, data_position=16, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000001.pt", "checkpoint-00000002.pt"]
    before = first.read_bytes()

    # What weights_only could not read back is refused before anything is written.
    with pytest.raises(ValueError, match=r"checkpoint\['extra'\]\['when'\] is a float64"):
        save_checkpoint(first, step=3, data_position=24, extra={"when": np.float64(1.0)}, **kwargs)

    # A write that dies half way leaves the old file whole and no temporary file behind.
    real_save = torch.save

    def dies_half_way(payload, f):
        real_save(payload, f)
        f.truncate(100)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(first, step=3, data_position=24, **kwargs)
    monkeypatch.undo()
    assert first.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000001.pt", "checkpoint-00000002.pt"]


# ---- the loop ------------------------------------------------------------------------------------


def test_checkpoint_folder_keeps_the_newest_and_resumes_further(tmp_path, one_thread):
    assert latest_checkpoint(tmp_path / "nowhere") is None
    out = tmp_path / "run"
    losses = train_worker.run(str(out), steps=7, checkpoint_every=2)
    assert len(losses) == 7 and all(np.isfinite(losses))
    # Saved after steps 2, 4, 6 and at the end (7); keep_checkpoints=2 leaves the last two.
    (out / ".checkpoint-00000099.pt.1a2b3c4d.tmp").write_bytes(b"half a file")
    (out / "checkpoint-notastep.pt").write_bytes(b"")
    assert [step for step, _ in list_checkpoints(out)] == [6, 7]
    assert latest_checkpoint(out) == out / "checkpoint-00000007.pt"

    assert train_worker.run(str(out), steps=7, checkpoint_every=2) == losses  # already done: nothing to train
    longer = train_worker.run(str(out), steps=9, checkpoint_every=2)  # steps may grow on resume
    assert longer[:7] == losses and len(longer) == 9
    assert [record["step"] for record in logged(out)] == list(range(1, 10))
    assert read_checkpoint(latest_checkpoint(out))["data_position"] == 9 * 8

    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(
            train_worker.config(9, 2),
            {"net": train_worker.make_net(0.2)},
            train_worker.loss_fn,
            train_worker.make_batch,
            out,
            resume=False,
            progress=False,
        )


def test_weight_average_follows_the_formula():
    live = nn.Linear(2, 1)
    average = WeightAverage({"net": live}, decay=0.5)
    start = live.weight.detach().clone()
    with torch.no_grad():
        live.weight.fill_(1.0)
    average.update(step=0)  # decay min(0.5, 1/10) = 0.1: 90% of the way to the live weights
    assert torch.allclose(average.averages["net.ema"].weight, 0.1 * start + 0.9)
    with torch.no_grad():
        live.weight.fill_(3.0)
    average.update(step=20)  # decay min(0.5, 21/30) = 0.5
    assert torch.allclose(average.averages["net.ema"].weight, 0.5 * (0.1 * start + 0.9) + 1.5)
    assert not any(p.requires_grad for p in average.averages["net.ema"].parameters())
    average.copy_to_live()
    assert torch.equal(live.weight, average.averages["net.ema"].weight)
    with pytest.raises(ValueError, match="between 0 and 1"):
        WeightAverage({"net": live}, decay=1.0)


def test_ema_run_ends_with_the_average_and_resumes_it_exactly(tmp_path, one_thread):
    config = dataclasses.replace(train_worker.config(steps=8, checkpoint_every=4), ema_decay=0.8)

    def run(folder: Path) -> tuple[list[float], nn.Module]:
        net = train_worker.make_net(0.2)
        return train(config, {"net": net}, train_worker.loss_fn, train_worker.make_batch, folder, progress=False), net

    losses, net = run(tmp_path / "whole")
    final = read_checkpoint(tmp_path / "whole" / "checkpoint-00000008.pt")["models"]
    assert sorted(final) == ["net", "net.ema"]
    for name, tensor in net.state_dict().items():  # the model handed back is the average, not the last step
        assert torch.equal(tensor, final["net.ema"][name]), name
    assert any(not torch.equal(final["net"][k], final["net.ema"][k]) for k in final["net"])

    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    (tmp_path / "cut" / "checkpoint-00000008.pt").unlink()  # as if killed after step 4's checkpoint
    resumed, resumed_net = run(tmp_path / "cut")
    assert resumed == losses
    for name, tensor in net.state_dict().items():
        assert torch.equal(resumed_net.state_dict()[name], tensor), name


def test_bf16_autocast_runs_the_products_in_bf16_keeps_float32_weights_and_resumes_exactly(tmp_path, one_thread):
    outputs = []

    def run(folder: Path, autocast: str | None) -> tuple[list[float], nn.Module]:
        config = dataclasses.replace(train_worker.config(steps=8, checkpoint_every=4), autocast=autocast)
        net = train_worker.make_net(0.0)
        net[-1].register_forward_hook(lambda module, args, out: outputs.append(out.dtype))
        return train(config, {"net": net}, train_worker.loss_fn, train_worker.make_batch, folder, progress=False), net

    plain, _ = run(tmp_path / "plain", None)
    assert set(outputs) == {torch.float32}
    outputs.clear()
    mixed, net = run(tmp_path / "mixed", "bfloat16")
    assert set(outputs) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert all(
        p.dtype == torch.float32
        for p in read_checkpoint(tmp_path / "mixed" / "checkpoint-00000008.pt")["models"]["net"].values()
    )
    assert mixed != plain and max(abs(a - b) for a, b in zip(mixed, plain)) < 0.05 * max(plain)
    shutil.copytree(tmp_path / "mixed", tmp_path / "cut")
    (tmp_path / "cut" / "checkpoint-00000008.pt").unlink()
    resumed, resumed_net = run(tmp_path / "cut", "bfloat16")
    assert resumed == mixed
    for name, tensor in net.state_dict().items():
        assert torch.equal(resumed_net.state_dict()[name], tensor), name
    with pytest.raises(ValueError, match=r"autocast: checkpoint 'bfloat16', now None"):
        run(tmp_path / "mixed", None)
    with pytest.raises(ValueError, match="autocast must be one of bfloat16 or null, not 'float16'"):
        LoopConfig(autocast="float16")


def test_a_field_added_since_the_checkpoint_is_accepted_at_its_default(tmp_path, one_thread):
    model, optimizer = tiny_model_and_optimizer()
    models, optimizers = {"net": model}, {"adamw": optimizer}
    path = save_checkpoint(
        tmp_path / "old.pt", config=LoopConfig(), models=models, optimizers=optimizers, step=1, data_position=8
    )
    payload = torch.load(path, weights_only=True)
    del payload["config"]["fields"]["ema_decay"], payload["sha256"]  # written before the field existed
    payload["sha256"] = state._content_digest(payload)
    torch.save(payload, path)
    assert load_checkpoint(path, config=LoopConfig(), models=models, optimizers=optimizers).step == 1
    with pytest.raises(ValueError, match=r"ema_decay: checkpoint \(absent\), now 0.9"):
        load_checkpoint(path, config=LoopConfig(ema_decay=0.9), models=models, optimizers=optimizers)


def test_frozen_models_pass_through_and_bad_losses_stop_the_run(tmp_path, one_thread):
    frozen = nn.Linear(train_worker.FEATURES, train_worker.FEATURES).requires_grad_(False)
    frozen_before = {k: v.clone() for k, v in frozen.state_dict().items()}

    def loss_through_frozen(models, batch, random):
        return train_worker.loss_fn({"net": lambda x: models["net"](models["frozen"](x))}, batch, random)

    config = train_worker.config(steps=3, checkpoint_every=3)
    net = train_worker.make_net(0.2)
    train(
        config,
        {"net": net, "frozen": frozen},
        loss_through_frozen,
        train_worker.make_batch,
        tmp_path / "a",
        progress=False,
    )
    assert all(torch.equal(v, frozen_before[k]) for k, v in frozen.state_dict().items())
    assert list(read_checkpoint(tmp_path / "a" / "checkpoint-00000003.pt")["models"]) == ["net"]

    calls = []

    def nan_at_step_2(models, batch, random):
        loss, logs = train_worker.loss_fn(models, batch, random)
        calls.append(len(calls) + 1)
        return (loss * float("nan") if len(calls) == 2 else loss), logs

    with pytest.raises(ValueError, match="the loss became nan at step 2; not updating the models"):
        train(
            config,
            {"net": train_worker.make_net(0.2)},
            nan_at_step_2,
            train_worker.make_batch,
            tmp_path / "b",
            progress=False,
        )
    assert len(logged(tmp_path / "b")) == 1

    def per_sample_loss(models, batch, random):
        return (models["net"](batch["x"]) - batch["y"]).square().mean(dim=1), {}

    with pytest.raises(ValueError, match=r"scalar tensor, not a tensor of shape \[8\]"):
        train(
            config,
            {"net": train_worker.make_net(0.2)},
            per_sample_loss,
            train_worker.make_batch,
            tmp_path / "c",
            progress=False,
        )


def test_learning_rate_warms_up_then_follows_a_cosine():
    config = LoopConfig(steps=110, warmup_steps=10, lr=1.0, final_lr_fraction=0.1)
    assert learning_rate(config, 0) == pytest.approx(0.1)
    assert learning_rate(config, 9) == pytest.approx(1.0)
    assert learning_rate(config, 10) == pytest.approx(1.0)
    assert learning_rate(config, 60) == pytest.approx(0.55)
    assert learning_rate(config, 109) == pytest.approx(0.1, abs=1e-3)
    after_warmup = [learning_rate(config, step) for step in range(10, 110)]
    assert after_warmup == sorted(after_warmup, reverse=True)
    with pytest.raises(ValueError, match="lr must be positive"):
        LoopConfig(lr=0.0)


def test_shards_tile_the_global_batch_and_weight_to_its_mean():
    for world_size in range(1, 5):
        for global_batch in range(world_size, 10):
            infos = [DistInfo(rank, world_size, rank, torch.device("cpu")) for rank in range(world_size)]
            slices = [shard(global_batch, info) for info in infos]
            indices = [i for offset, count in slices for i in range(offset, offset + count)]
            assert indices == list(range(global_batch))
            # DDP averages rank gradients; the weights make that the global mean's gradient.
            losses = torch.arange(global_batch, dtype=torch.float64) ** 2
            ddp = sum(
                shard_weight(global_batch, info) * losses[o : o + c].mean() for info, (o, c) in zip(infos, slices)
            )
            assert float(ddp / world_size) == pytest.approx(float(losses.mean()), rel=1e-12)
    with pytest.raises(ValueError, match="smaller than the 4 training processes"):
        shard(3, DistInfo(0, 4, 0, torch.device("cpu")))


def test_batch_random_rows_do_not_depend_on_the_process_count():
    def draw(offset: int, count: int) -> list[torch.Tensor]:
        rows = BatchRandom(torch.Generator().manual_seed(3), offset, count, 8, torch.device("cpu"))
        return [rows.randn(2, 2), rows.rand(3), rows.randint(0, 1000)]

    whole = draw(0, 8)
    halves = zip(draw(0, 4), draw(4, 4))
    for full, (first, second) in zip(whole, halves):
        assert torch.equal(full, torch.cat([first, second]))


def wait_for_checkpoint_and_more_log(process: subprocess.Popen, out: Path, timeout: float = 60.0) -> int:
    """The step of the first checkpoint, once the log has gone at least 3 steps past it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        latest = latest_checkpoint(out)
        if latest is not None and (out / "log.jsonl").exists():
            step = int(latest.stem.split("-")[1])
            if len((out / "log.jsonl").read_bytes().splitlines()) >= step + 3:
                return step
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint in {out} after {timeout} s")


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, monkeypatch, one_thread):
    steps, every = 40, 8
    killed = tmp_path / "killed"
    errors = open(tmp_path / "worker.err", "wb")
    process = subprocess.Popen(
        worker_command(killed, "--steps", str(steps), "--checkpoint-every", str(every), "--sleep", "0.03"),
        stdout=subprocess.DEVNULL,
        stderr=errors,
        env=worker_env(),
    )
    try:
        # The uninterrupted run, in this process, while the other one starts up.
        uninterrupted = train_worker.run(str(tmp_path / "whole"), steps, every)
        checkpoint_step = wait_for_checkpoint_and_more_log(process, killed)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    logged_at_kill = len(logged(killed))
    assert every <= checkpoint_step < steps and logged_at_kill > checkpoint_step
    for copy in ("forget-rng", "forget-generator"):
        shutil.copytree(killed, tmp_path / copy)

    resumed = train_worker.run(str(killed), steps, every)
    # Bitwise: the same float32 arithmetic on the same numbers, so == and not a tolerance.
    assert resumed == uninterrupted
    assert [record["step"] for record in logged(killed)] == list(range(1, steps + 1))  # no duplicates
    final, reference = (read_checkpoint(folder / "checkpoint-00000040.pt") for folder in (killed, tmp_path / "whole"))
    for name, tensor in reference["models"]["net"].items():
        assert torch.equal(final["models"]["net"][name], tensor), name

    # Re-seeding instead of restoring either random stream changes the losses after the checkpoint.
    restore = loop.load_checkpoint

    def load_and_forget(what):
        def load(path, **kwargs):
            state = restore(path, **kwargs)
            if what == "rng":  # the process-global RNGs: dropout
                loop._seed_process(train_worker.config(steps, every).seed, 0)
            else:  # the checkpointed generator: input noise
                kwargs["generators"][loop.GENERATOR_NAME].manual_seed(train_worker.config(steps, every).seed)
            return state

        return load

    for what in ("rng", "generator"):
        monkeypatch.setattr(loop, "load_checkpoint", load_and_forget(what))
        forgetful = train_worker.run(str(tmp_path / f"forget-{what}"), steps, every)
        assert forgetful[:checkpoint_step] == uninterrupted[:checkpoint_step]
        assert forgetful[checkpoint_step] != uninterrupted[checkpoint_step], what


def test_two_ddp_processes_match_one_process(tmp_path, one_thread):
    """torchrun, 2 CPU processes over gloo, global batches 8 (4 + 4) and 7 (4 + 3), against one process."""
    steps = 6
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(WORKER),
        str(tmp_path / "ddp"),
        "--steps",
        str(steps),
        "--checkpoint-every",
        str(steps),
        "--batch-size",
        "8",
        "7",
        "--dropout",
        "0",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=worker_env())
    try:
        # The one-process runs, in this process, while torchrun starts its two.
        single = {
            batch: train_worker.run(str(tmp_path / f"single-{batch}"), steps, steps, batch_size=batch, dropout=0.0)
            for batch in (8, 7)
        }
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.terminate()  # torchrun passes it on to its workers
            process.wait(timeout=30)
    assert process.returncode == 0, output.decode(errors="replace")[-3000:]

    for batch, losses in single.items():
        ddp_dir = tmp_path / "ddp" / f"batch-{batch}"
        ddp = read_checkpoint(ddp_dir / f"checkpoint-{steps:08d}.pt")
        one = read_checkpoint(tmp_path / f"single-{batch}" / f"checkpoint-{steps:08d}.pt")
        assert ddp["extra"]["world_size"] == 2 and len(ddp["rng"]) == 2  # each process's RNG states
        assert ddp["data_position"] == one["data_position"] == steps * batch
        # float32 gradients summed in another order by the all-reduce: equal to ~1 ulp, not bitwise.
        difference = max((ddp["models"]["net"][k] - v).abs().max().item() for k, v in one["models"]["net"].items())
        assert difference < 1e-6, (batch, difference)
        ddp_losses = [record["loss"] for record in logged(ddp_dir)]
        assert ddp_losses == pytest.approx(losses, rel=1e-6, abs=1e-7)
