"""Training checkpoints: one file holding everything a run needs to go on exactly where it stopped.

A checkpoint holds the trained models' and optimizers' state, the step, the position in the
data stream, the run's config and the state of every random number generator (torch's CPU
and CUDA generators, Python's `random`, numpy's global one and the explicit torch.Generators
the loop draws noise from). A run killed at any moment and resumed from its latest
checkpoint therefore computes the same losses, bit for bit, as one that never stopped.

The file is written by torch.save into a temporary file that is renamed into place
(metadata.atomic_write), so a checkpoint path only ever holds a complete file. It is read
back with torch.load(weights_only=True), which builds nothing but tensors and plain
containers and never runs code from the file; that is why everything stored here is
converted to tensors, numbers, strings, lists, tuples and dicts first. A sha256 over the
content, stored inside, catches the damage torch's zip reader lets through (a flipped byte
in tensor data loads silently).

A run that builds on files of other stages (the UNet stage's frozen VAE and text encoder, a
fine-tune's init_from) records each one's path and sha256 in its checkpoints, and refuses to
resume when one of them holds other content now, even at the same path: the rest of the run
would train against something else than its first steps did.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffuse.metadata import atomic_write, sha256_file
from diffuse.train.worlds import config_fields, world_change

FORMAT = "diffuse-train-checkpoint"
VERSION = 1
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")
_PLAIN_TYPES = (type(None), bool, int, float, str)
_ABSENT = object()  # a config field one side has and the other has not


def resumable(default: Any) -> Any:
    """A config field that may differ when a run resumes: how long to train, how often to log or save.

    Every other field must match the checkpoint's value, because changing it mid-run (the
    learning rate, the batch size, the seed, a model's width) would silently make a
    different run than the one the checkpoint belongs to.
    """
    return field(default=default, metadata={"resumable": True})


@dataclass(frozen=True)
class ResumeState:
    """Where a loaded checkpoint left off: optimizer steps done, samples consumed, the caller's extras."""

    step: int
    data_position: int
    extra: dict


# ---- random number generators ----------------------------------------------------------------


def capture_rng_state() -> dict:
    """This process's global RNG states as tensors and plain values (what weights_only can read back)."""
    py_version, py_internal, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
    }


def restore_rng_state(state: dict) -> None:
    """Put back the global RNG states `capture_rng_state` took.

    CUDA states are restored only where the same number of CUDA devices is present: a run
    moved to another machine has no way to continue those streams exactly.
    """
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"].tolist()), python["gauss"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )


# ---- saving and loading ------------------------------------------------------------------------


def save_checkpoint(
    path: str | Path,
    *,
    config: Any,
    models: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    step: int,
    data_position: int,
    generators: dict[str, torch.Generator] | None = None,
    rng_states: list[dict] | None = None,
    extra: dict | None = None,
    inputs: dict[str, dict[str, str]] | None = None,
) -> Path:
    """Write one checkpoint file atomically: `path` holds the old file or the complete new one.

    config: the run's frozen dataclass, stored as a plain dict with its class name.
    generators: the explicit torch.Generators the run draws from, restored by name.
    rng_states: one `capture_rng_state()` per process of a data-parallel run, by rank (each
        process has its own dropout stream); by default this process's own.
    extra: anything else to hand back on resume (tensors and plain values only).
    inputs: input_fingerprints() of the files the run reads from other stages.
    """
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise ValueError(f"config must be a dataclass instance, not {type(config).__name__}")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(step),
        "data_position": int(data_position),
        "config": {"class": type(config).__qualname__, "fields": config_fields(config)},
        "models": {name: model.state_dict() for name, model in models.items()},
        "optimizers": {name: optimizer.state_dict() for name, optimizer in optimizers.items()},
        "generators": {name: generator.get_state() for name, generator in (generators or {}).items()},
        "rng": rng_states if rng_states is not None else [capture_rng_state()],
        "extra": dict(extra or {}),
        "inputs": dict(inputs or {}),
    }
    # Hashing walks every value, so it also refuses (before anything is written) whatever
    # torch.load(weights_only=True) could not read back.
    payload["sha256"] = _content_digest(payload)
    return atomic_write(path, lambda f: torch.save(payload, f))


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint's content, checked to be complete and undamaged (tensors on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a cut zip is a RuntimeError, a cut pickle EOFError or UnpicklingError, ...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"checkpoint {path} is truncated, corrupt or not a checkpoint: {reason}") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a diffuse training checkpoint")
    if payload.get("version") != VERSION:
        raise ValueError(f"checkpoint {path} has format version {payload.get('version')}; this diffuse reads {VERSION}")
    stored = payload.pop("sha256", None)
    if stored != _content_digest(payload):
        raise ValueError(f"checkpoint {path} is corrupt: its content does not match the sha256 stored in it")
    return payload


def load_checkpoint(
    path: str | Path,
    *,
    config: Any,
    models: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    generators: dict[str, torch.Generator] | None = None,
    rank: int = 0,
    inputs: dict[str, dict[str, str]] | None = None,
) -> ResumeState:
    """Restore models, optimizers, generators and this process's RNG states in place from `path`.

    Refuses (ValueError) a checkpoint written with a different config, except for fields
    declared `resumable`, and one whose models, optimizers or generators do not match by name.
    `rank` picks this process's RNG states in a data-parallel run; a run resumed with more
    processes than wrote the checkpoint reuses the states round-robin. With `inputs`
    (input_fingerprints of the run's input files) it also refuses one whose inputs changed
    content since it was written; a checkpoint from before inputs were recorded is not checked.
    """
    path = Path(path)
    payload = read_checkpoint(path)
    changed_world = world_change(payload["config"]["fields"], config)
    if changed_world is not None:
        raise ValueError(f"checkpoint {path}: refusing to resume: {changed_world}; train it in another folder")
    differences = config_differences(payload["config"], config)
    if differences:
        listed = "\n  ".join(differences)
        raise ValueError(
            f"checkpoint {path} was written with a different config; refusing to resume with:\n"
            f"  {listed}\nStart a new run in another folder, or change only resumable fields."
        )
    if inputs is not None and "inputs" in payload:
        check_inputs(path, payload["inputs"], inputs)
    generators = generators or {}
    _check_names(path, "models", payload["models"], models)
    _check_names(path, "optimizers", payload["optimizers"], optimizers)
    _check_names(path, "generators", payload["generators"], generators)

    for name, model in models.items():
        try:
            model.load_state_dict(payload["models"][name])
        except RuntimeError as error:
            raise ValueError(f"checkpoint {path}: model {name!r} does not fit its saved weights: {error}") from None
    for name, optimizer in optimizers.items():
        try:
            optimizer.load_state_dict(payload["optimizers"][name])
        except (ValueError, KeyError) as error:
            raise ValueError(f"checkpoint {path}: optimizer {name!r} does not fit its saved state: {error}") from None
    for name, generator in generators.items():
        generator.set_state(payload["generators"][name])
    states = payload["rng"]
    restore_rng_state(states[rank % len(states)])
    return ResumeState(step=payload["step"], data_position=payload["data_position"], extra=payload["extra"])


def _check_names(path: Path, what: str, saved: dict, given: dict) -> None:
    if set(saved) != set(given):
        raise ValueError(f"checkpoint {path} holds {what} {sorted(saved)}, but this run has {sorted(given)}")


# ---- input files -------------------------------------------------------------------------------


def input_fingerprints(inputs: dict[str, str | Path]) -> dict[str, dict[str, str]]:
    """{name: {"path", "sha256"}} of each file a run reads from another stage (streamed, any size)."""
    fingerprints = {}
    for name, file in inputs.items():
        if not Path(file).is_file():
            raise ValueError(f"input {name}: {file} does not exist or is not a file")
        fingerprints[name] = {"path": str(file), "sha256": sha256_file(file)}
    return fingerprints


def check_inputs(path: str | Path, recorded: dict, current: dict[str, dict[str, str]]) -> None:
    """Refuse (one-line ValueError) to resume checkpoint `path` when an input it recorded holds other
    content now, or the run's inputs are not the ones it recorded. Only content counts: the paths
    are config fields, which config_differences compares."""
    problems = []
    for name in sorted(set(recorded) | set(current)):
        before, now = recorded.get(name), current.get(name)
        if before is None:
            problems.append(f"input {name} ({now['path']}) was not an input of the checkpoint's run")
        elif now is None:
            problems.append(f"its input {name} ({before['path']}) is not an input of this run")
        elif before["sha256"] != now["sha256"]:
            problems.append(
                f"input {name} {now['path']} has other content than when the checkpoint was written "
                f"(sha256 {before['sha256'][:12]} then, {now['sha256'][:12]} now)"
            )
    if problems:
        raise ValueError(
            f"checkpoint {path}: refusing to resume: {'; '.join(problems)}; put back the files "
            f"it was trained on, or train in another folder"
        )


# ---- config comparison -------------------------------------------------------------------------


def config_differences(saved: dict, config: Any) -> list[str]:
    """One line per non-resumable field whose value differs: "lr: checkpoint 0.001, now 0.002".

    `saved` is a checkpoint's {"class", "fields"} record. Nested dataclasses are compared
    field by field under dotted names ("unet.model_channels"). A field the checkpoint lacks
    counts as unchanged while it holds its default: fields are added with the default that
    keeps the old behaviour.
    """
    lines = []
    class_now = type(config).__qualname__
    if saved["class"] != class_now:
        lines.append(f"config class: checkpoint {saved['class']}, now {class_now}")
    old = _flatten(saved["fields"])
    new = _flatten(config_fields(config))
    defaults = _default_fields(config) if saved["class"] == class_now else {}
    may_change = _resumable_names(config)
    for name in list(new) + [name for name in old if name not in new]:
        if any(name == allowed or name.startswith(allowed + ".") for allowed in may_change):
            continue
        before, after = old.get(name, _ABSENT), new.get(name, _ABSENT)
        if before is _ABSENT and name in defaults and _as_plain(after) == _as_plain(defaults[name]):
            continue  # a field added since the checkpoint, left at its default: the behaviour it was trained with
        if _as_plain(before) != _as_plain(after):
            lines.append(f"{name}: checkpoint {_show(before)}, now {_show(after)}")
    return lines


def _default_fields(config: Any) -> dict[str, Any]:
    try:
        return _flatten(config_fields(type(config)()))
    except TypeError:  # a config class with required fields has no defaults to fall back on
        return {}


def _flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _resumable_names(config: Any, prefix: str = "") -> set[str]:
    names = set()
    for f in dataclasses.fields(config):
        name = prefix + f.name
        if f.metadata.get("resumable"):
            names.add(name)
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            names |= _resumable_names(value, name + ".")
    return names


def _as_plain(value: Any) -> Any:
    # A tuple field may come back as a list from elsewhere; equal contents are the same config.
    if isinstance(value, (list, tuple)):
        return [_as_plain(item) for item in value]
    return value


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else repr(value)


# ---- integrity -----------------------------------------------------------------------------------


def _content_digest(payload: dict) -> str:
    digest = hashlib.sha256()
    _feed(digest, payload, "checkpoint")
    return digest.hexdigest()


def _feed(digest: Any, value: Any, where: str) -> None:
    """Hash `value` with its type and shape, so equal digests mean equal content."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"tensor {flat.dtype} {tuple(value.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)}|".encode())
        for key, item in value.items():
            _feed(digest, key, where)
            _feed(digest, item, f"{where}[{key!r}]")
    elif type(value) in (list, tuple):
        digest.update(f"{type(value).__name__} {len(value)}|".encode())
        for index, item in enumerate(value):
            _feed(digest, item, f"{where}[{index}]")
    elif type(value) in _PLAIN_TYPES:
        digest.update(f"{type(value).__name__} {value!r}|".encode())
    else:
        raise ValueError(
            f"{where} is a {type(value).__name__}; a checkpoint holds only tensors, numbers, "
            f"strings, None, lists, tuples and dicts (all torch.load(weights_only=True) reads)"
        )


# ---- checkpoint folders --------------------------------------------------------------------------


def checkpoint_path(folder: str | Path, step: int) -> Path:
    """Where the checkpoint after `step` optimizer steps lives; zero-padded so names sort by step."""
    return Path(folder) / f"checkpoint-{step:08d}.pt"


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint in `folder`, oldest first. Temporary files never match."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = _CHECKPOINT_NAME.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint with the most steps in `folder`, or None when there is none."""
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def prune_checkpoints(folder: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints. Call only once the newest is safely written."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1 (the checkpoint a run resumes from), not {keep}")
    for _, path in list_checkpoints(folder)[:-keep]:
        path.unlink(missing_ok=True)
