"""Two revisions of diffuse compared on one host in one run: speed, and whether the images are exactly the same.

Each revision runs in a persistent worker process of its own whose PYTHONPATH points at that
revision's tree, so each imports its own `diffuse` (a revision given as a git rev is checked
out into a temporary `git worktree`; the default new side is this working tree, uncommitted
changes included). The workers take one request at a time, alternately, and never compute at
once: every timing is a median over interleaved rounds (who goes first alternates), so a
change in the machine's load hits both sides alike. Only the API both sides share is used:
`diffuse.load_pipeline(path, dtype=...)`, `pipe.unet(latents, timesteps, context)` and
`pipe.vae.decode(z)` under torch.no_grad(), and `pipe.txt2img/img2img/inpaint(...)` with
`speedups=diffuse.Speedups(...)`.

    .venv/bin/python bench/revisions.py --old ea267c4                 # against the working tree
    .venv/bin/python bench/revisions.py --old ea267c4 --new HEAD      # two revisions (or a folder)
    .venv/bin/python bench/revisions.py --old ea267c4 --quick         # every path at tiny sizes, 1 round

Printed: the host (CPU model, cores, fp32 and bf16 GEMM peak); old and new seconds and the
ratio new/old for a guided SD1.5 UNet step (batch 2, 64x64 latents), a 512x512 VAE decode and
a whole 20-step 512x512 guided DPM++ 2M Karras image; and exactness, bit for bit, of the raw
UNet and VAE outputs, of SD1.5 images in bf16 and float32 and of the shipped model's images
(two samplers, the speed-ups, img2img, inpaint, batch 2), with the largest difference where
they differ. Nothing passes or fails on a time; the exit status is 1 only when a worker raised
or died (its traceback is printed and the other measurements go on).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Only the standard library, numpy and torch at the top: the workers run this file too and
# must import nothing from a tree but their own revision's diffuse.
ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SD15_PROMPT = "a photograph of an astronaut riding a horse on the moon"
SHIPPED_PROMPT = "a red circle above a blue square"
SEED = 1234
MAX_RESTARTS = 3  # a worker that dies more often than this is not started again


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much each measurement does; --quick shrinks every one to seconds."""

    rounds: int = 5  # timed rounds per UNet step and VAE decode
    whole_rounds: int = 3  # timed rounds of the whole bf16 image
    unet_latent: int = 64  # latent side of the UNet step (64: a 512x512 image)
    vae_latent: int = 64
    whole_size: int = 512
    whole_steps: int = 20
    fp32_image_size: int = 256  # the float32 SD1.5 image is smaller: it is for exactness only
    fp32_image_steps: int = 8
    shipped_steps: int = 20
    peak_repeats: int = 5


QUICK = Sizes(
    rounds=1,
    whole_rounds=1,
    unet_latent=8,
    vae_latent=8,
    whole_size=64,
    whole_steps=2,
    fp32_image_size=64,
    fp32_image_steps=2,
    shipped_steps=4,
    peak_repeats=1,
)


# ---- the worker: one revision's diffuse, answering one request at a time ------------------------------


class Runner:
    """Holds one loaded pipeline at a time (a worker never needs two), and the inputs of the timed calls."""

    def __init__(self) -> None:
        self.key: tuple[str, str] | None = None
        self.pipe: Any = None
        self.calls: dict[tuple, Callable[[], Any]] = {}

    def pipeline(self, model: str, dtype: str) -> Any:
        if self.key != (model, dtype):
            self.pipe, self.key, self.calls = None, None, {}
            release_freed_memory()  # both workers' SD1.5 weights must fit side by side
            import diffuse

            self.pipe, self.key = diffuse.load_pipeline(model, dtype=DTYPES[dtype]), (model, dtype)
        return self.pipe

    def answer(self, request: dict) -> dict:
        pipe = self.pipeline(request["model"], request["dtype"])
        # A timed network call keeps its input tensors between rounds; a generation is cheap to set up.
        key = (request["op"], request.get("latent"), request.get("context_dim"))
        if request["op"] not in ("unet", "vae"):
            call = make_call(pipe, request)
        elif key in self.calls:
            call = self.calls[key]
        else:
            call = self.calls[key] = make_call(pipe, request)
        with torch.no_grad():
            start = time.perf_counter()
            output = call()
            seconds = time.perf_counter() - start
        return {"seconds": seconds, "output": to_numpy(output) if request.get("output") else None}


def release_freed_memory() -> None:
    """Give the freed weights back to the system: diffuse has malloc keep freed memory otherwise."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)


def make_call(pipe: Any, request: dict) -> Callable[[], Any]:
    """The call a request names, its inputs drawn once from fixed seeds (the same tensors on both sides)."""
    op, dtype = request["op"], DTYPES[request["dtype"]]
    generator = torch.Generator().manual_seed(SEED)
    side = request.get("latent")
    if op == "unet":  # a guided step: the unconditional and the conditional half in one batch of 2
        latents = torch.randn(2, 4, side, side, generator=generator).to(dtype)
        context = torch.randn(2, 77, request["context_dim"], generator=generator).to(dtype)
        timesteps = torch.tensor([500, 500])
        return lambda: pipe.unet(latents, timesteps, context)
    if op == "vae":
        z = torch.randn(1, 4, side, side, generator=generator).to(dtype)
        return lambda: pipe.vae.decode(z)
    kwargs = dict(request["kwargs"])
    if kwargs.get("speedups"):
        import diffuse

        kwargs["speedups"] = diffuse.Speedups(**kwargs["speedups"])
    pictures = [to_picture(kwargs.pop(name)) for name in ("image", "mask") if name in kwargs]
    method = getattr(pipe, op)  # txt2img, img2img or inpaint
    return lambda: method(*pictures, **kwargs)


def to_picture(pixels: np.ndarray) -> Any:
    from PIL import Image

    return Image.fromarray(pixels)


def to_numpy(output: Any) -> Any:
    """A tensor as float32 (exact for bf16) or a generation's images as uint8 [B, H, W, 3], with its texts."""
    if isinstance(output, torch.Tensor):
        return np.ascontiguousarray(output.detach().float().cpu().numpy())
    images = np.stack([np.asarray(image.convert("RGB")) for image in output.images])
    return {"images": images, "infotexts": list(output.infotexts)}


def worker_main(fd: int) -> None:
    """Serve requests from the parent until it sends None or goes away; an error is answered, not fatal."""
    connection = Connection(fd)
    try:
        import diffuse

        connection.send({"diffuse": diffuse.__file__, "threads": torch.get_num_threads()})
    except Exception:
        connection.send({"error": traceback.format_exc()})
        return
    runner = Runner()
    while True:
        try:
            request = connection.recv()
        except EOFError:
            return
        if request is None:
            return
        try:
            answer = runner.answer(request)
        except Exception:
            answer = {"error": traceback.format_exc()}
        connection.send(answer)


# ---- the parent: revisions, workers, interleaved requests ----------------------------------------------


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()


@contextlib.contextmanager
def revision_tree(spec: str, scratch: Path, name: str) -> Iterator[tuple[Path, str]]:
    """A folder holding the revision: an existing folder as it is, else a temporary worktree of the rev."""
    if Path(spec).is_dir():
        folder = Path(spec).resolve()
        yield folder, "working tree" if folder == ROOT else str(folder)
        return
    sha = git("rev-parse", "--verify", f"{spec}^{{commit}}")
    folder = scratch / name
    git("worktree", "add", "--detach", "--quiet", str(folder), sha)
    try:
        yield folder, f"{spec} ({sha[:9]})" if not sha.startswith(spec) else sha[:9]
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(folder)], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], capture_output=True)


class Worker:
    """One revision's worker process, started on first use and again (up to MAX_RESTARTS) after it dies."""

    def __init__(self, name: str, tree: Path, label: str, scratch: Path) -> None:
        self.name, self.tree, self.label, self.log = name, tree, label, scratch / f"{name}-worker.log"
        self.process: subprocess.Popen | None = None
        self.connection: Connection | None = None
        self.deaths = 0
        self.peak_mb = 0.0  # the largest resident memory any of its processes reached
        self.broken: str | None = None  # why it will not be started again

    def start(self) -> None:
        ours, theirs = socket.socketpair()
        environment = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(self.tree), os.environ.get("PYTHONPATH")])),
        }
        with open(self.log, "ab") as log:  # the worker's own prints and warnings; its tail is shown if it dies
            # A session of its own: Ctrl-C reaches only the parent, which then stops the workers in order.
            self.process = subprocess.Popen(
                [sys.executable, __file__, "--worker", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                env=environment,
                cwd=self.tree,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        theirs.close()
        self.connection = Connection(ours.detach())
        hello = self.connection.recv()
        if "error" in hello:
            self.broken = f"importing diffuse failed:\n{hello['error']}"
        elif not Path(hello["diffuse"]).resolve().is_relative_to(self.tree):
            self.broken = f"imported diffuse from {hello['diffuse']}, not from {self.tree}"

    def ask(self, request: dict) -> dict:
        try:
            if self.process is None and not self.broken:
                self.start()
            if self.broken:
                self.stop()
                return {"error": f"worker not available: {self.broken}"}
            self.connection.send(request)
            return self.connection.recv()
        except (EOFError, OSError):
            return self.died()

    def died(self) -> dict:
        code = self.process.wait() if self.process else None
        self.deaths += 1
        self.stop()
        if self.deaths > MAX_RESTARTS:
            self.broken = f"died {self.deaths} times"
        lines = self.log.read_text(errors="replace").splitlines()[-30:] if self.log.exists() else []
        tail = "\n".join(["the last lines of its log:", *lines] if lines else ["its log is empty"])
        return {"error": f"{tail}\nworker died (exit status {code})"}

    def stop(self, graceful: bool = True) -> None:
        """Ask the worker to finish (or, interrupted, end it at once) and wait until it has."""
        if self.process is not None:
            self.peak_mb = max(self.peak_mb, peak_resident_mb(self.process.pid))
        if self.connection is not None:
            with contextlib.suppress(OSError):
                self.connection.send(None)
            self.connection.close()
        if self.process is not None:
            try:
                self.process.wait(timeout=10 if graceful else 0.1)
            except subprocess.TimeoutExpired:
                self.process.terminate()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        self.process, self.connection = None, None


# ---- measurements: timings of interleaved rounds, and outputs compared bit for bit --------------------


@dataclasses.dataclass
class Report:
    old: str
    new: str
    host: dict
    timings: list[dict] = dataclasses.field(default_factory=list)
    exactness: list[dict] = dataclasses.field(default_factory=list)
    errors: list[dict] = dataclasses.field(default_factory=list)
    peak_resident_mb: dict[str, float] = dataclasses.field(default_factory=dict)


class Bench:
    """Sends each request to both workers, one at a time, and records what came back."""

    def __init__(self, workers: dict[str, Worker], report: Report) -> None:
        self.workers, self.report = workers, report

    def ask(self, name: str, what: str, request: dict) -> dict | None:
        answer = self.workers[name].ask(request)
        if "error" not in answer:
            return answer
        repeated = any(error["revision"] == name and error["error"] == answer["error"] for error in self.report.errors)
        self.report.errors.append({"revision": name, "what": what, "error": answer["error"]})
        if repeated:  # a worker that cannot start answers every request alike: its traceback once is enough
            log(f"{name} failed on {what}: the same error as above")
        else:
            bar = "!" * 100
            print(
                f"\n{bar}\n{name} ({self.workers[name].label}) failed on: {what}\n{answer['error'].rstrip()}\n{bar}\n",
                file=sys.stderr,
                flush=True,
            )
        return None

    def measure(self, what: str, request: dict, rounds: int, warm_up: bool = True, timed: bool = True) -> dict:
        """The first answer of each side (its output is what gets compared; untimed when `warm_up`),
        then the rest of `rounds` interleaved rounds, the side that goes first alternating."""
        first = {name: self.ask(name, what, {**request, "output": True}) for name in self.workers}
        if None in first.values() or not timed:
            return first
        seconds = {name: [] if warm_up else [answer["seconds"]] for name, answer in first.items()}
        for round_number in range(rounds - (0 if warm_up else 1)):
            order = list(self.workers)[::-1] if round_number % 2 == 0 else list(self.workers)
            for name in order:
                answer = self.ask(name, what, request)
                if answer is None:
                    return first
                seconds[name].append(answer["seconds"])
        old, new = (statistics.median(seconds[name]) for name in ("old", "new"))
        self.report.timings.append(
            {
                "what": what,
                "old_s": old,
                "new_s": new,
                "ratio": new / old,
                "rounds": len(seconds["old"]),
                "all_old_s": seconds["old"],
                "all_new_s": seconds["new"],
            }
        )
        log(f"{what}: old {old:.3f} s, new {new:.3f} s, new/old {new / old:.3f}")
        return first

    def compare(self, what: str, first: dict) -> None:
        """Record whether old and new gave the same output; the images' parameters texts too."""
        if None in first.values():
            failed = " and ".join(name for name, answer in first.items() if answer is None)
            self.record(what, "not compared", f"{failed} failed")
            return
        old, new = first["old"]["output"], first["new"]["output"]
        if isinstance(old, dict):
            self.record(what, *difference(old["images"], new["images"]))
            self.record(f"{what}: parameters text", *text_difference(old["infotexts"], new["infotexts"]))
        else:
            self.record(what, *difference(old, new))

    def record(self, what: str, verdict: str, detail: str = "") -> None:
        self.report.exactness.append({"what": what, "verdict": verdict, "detail": detail})
        log(f"{what}: {verdict}{'  ' + detail if detail else ''}")


def difference(old: np.ndarray, new: np.ndarray) -> tuple[str, str]:
    """'identical' when every bit agrees, else how far apart (in /255 for images)."""
    if old.shape != new.shape:
        return "DIFFERS", f"shapes {old.shape} and {new.shape}"
    if old.dtype == new.dtype and old.tobytes() == new.tobytes():  # stricter than array_equal: NaNs, -0.0
        return "identical", ""
    gap = np.abs(old.astype(np.float64) - new.astype(np.float64))
    unit = "/255" if old.dtype == np.uint8 else ""
    detail = (
        f"max abs diff {np.nanmax(gap):.4g}{unit}, mean {np.nanmean(gap):.3g}{unit}, "
        f"{np.mean(gap != 0):.2%} of values differ"
    )
    if old.dtype.kind == "f" and (np.isnan(old).any() or np.isnan(new).any()):
        detail += f"; NaNs: old {int(np.isnan(old).sum())}, new {int(np.isnan(new).sum())}"
    return "DIFFERS", detail


def text_difference(old: list[str], new: list[str]) -> tuple[str, str]:
    """The fields of the A1111 parameters texts that only one side wrote."""
    if old == new:
        return "identical", ""
    fields = [
        set(field.strip() for text in texts for field in text.replace("\n", ", ").split(", ")) for texts in (old, new)
    ]
    return "DIFFERS", f"old only: {sorted(fields[0] - fields[1])}; new only: {sorted(fields[1] - fields[0])}"


def peak_resident_mb(pid: int) -> float:
    """A process's peak resident memory so far (VmHWM), 0 where /proc cannot tell."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def sd15_checks(bench: Bench, folder: Path, sizes: Sizes) -> None:
    """The random-weight SD1.5: UNet step and VAE decode timed and compared in both dtypes, then an image."""
    for dtype in DTYPES:
        base = {"model": str(folder), "dtype": dtype}
        side = sizes.unet_latent
        what = f"SD1.5 {dtype} guided UNet step (batch 2, {side}x{side} latents)"
        first = bench.measure(what, {**base, "op": "unet", "latent": side, "context_dim": 768}, sizes.rounds)
        bench.compare(f"{what}: output", first)
        side = sizes.vae_latent
        what = f"SD1.5 {dtype} VAE decode {side * 8}x{side * 8}"
        bench.compare(f"{what}: output", bench.measure(what, {**base, "op": "vae", "latent": side}, sizes.rounds))
        whole = dtype == "bf16"  # the float32 image is smaller and shorter: it is there for exactness
        size = sizes.whole_size if whole else sizes.fp32_image_size
        steps = sizes.whole_steps if whole else sizes.fp32_image_steps
        what = f"SD1.5 {dtype} {steps}-step {size}x{size} guided DPM++ 2M Karras image"
        kwargs = dict(
            prompt=SD15_PROMPT,
            width=size,
            height=size,
            steps=steps,
            guidance_scale=7.5,
            sampler="DPM++ 2M Karras",
            seed=SEED,
        )
        first = bench.measure(
            what, {**base, "op": "txt2img", "kwargs": kwargs}, sizes.whole_rounds if whole else 1, warm_up=False
        )
        bench.compare(what, first)


SHIPPED_SPEEDUPS = {
    "deep cache 3/1": dict(deep_cache_interval=3, deep_cache_depth=1),
    "token merging 0.5": dict(token_merging=0.5),
    "guidance cut-off 0.5": dict(guidance_cutoff=0.5),
    "all three speed-ups": dict(deep_cache_interval=3, deep_cache_depth=1, token_merging=0.5, guidance_cutoff=0.5),
}


def shipped_checks(bench: Bench, model: Path, sizes: Sizes) -> None:
    """The shipped model in both dtypes, batch 2: two samplers, the speed-ups, img2img and inpaint."""
    for dtype in DTYPES:
        base = {"model": str(model), "dtype": dtype}
        common = dict(prompt=SHIPPED_PROMPT, steps=sizes.shipped_steps, guidance_scale=3.0, seed=SEED, batch_size=2)
        runs = [("txt2img Euler a", "txt2img", dict(sampler="Euler a"))]
        runs += [
            (f"txt2img DPM++ 2M Karras, {name}", "txt2img", dict(sampler="DPM++ 2M Karras", speedups=speedups))
            for name, speedups in SHIPPED_SPEEDUPS.items()
        ]
        plain = shipped_image(
            bench, f"shipped {dtype} txt2img DPM++ 2M Karras", base, "txt2img", {**common, "sampler": "DPM++ 2M Karras"}
        )
        picture = starting_picture(plain)
        mask = np.zeros(picture.shape[:2], dtype=np.uint8)
        mask[picture.shape[0] // 4 : picture.shape[0] * 3 // 4, picture.shape[1] // 4 : picture.shape[1] * 3 // 4] = 255
        runs += [
            ("img2img strength 0.6", "img2img", dict(image=picture, strength=0.6)),
            ("inpaint, a rectangle", "inpaint", dict(image=picture, mask=mask)),
        ]
        for name, op, extra in runs:
            shipped_image(bench, f"shipped {dtype} {name}", base, op, {**common, "sampler": "DPM++ 2M Karras", **extra})


def shipped_image(bench: Bench, what: str, base: dict, op: str, kwargs: dict) -> dict:
    first = bench.measure(what, {**base, "op": op, "kwargs": kwargs}, rounds=1, warm_up=False, timed=False)
    bench.compare(what, first)
    return first


def starting_picture(first: dict) -> np.ndarray:
    """The same picture for both sides' img2img and inpaint: the old side's first image, else the new
    side's, else a gradient when neither could generate one."""
    for name in ("old", "new"):
        if first.get(name) is not None:
            return first[name]["output"]["images"][0]
    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    return np.stack([np.tile(ramp, (64, 1)), np.tile(ramp[:, None], (1, 64)), np.full((64, 64), 128, np.uint8)], -1)


# ---- host, summary, command line ----------------------------------------------------------------------


def host(peak_repeats: int) -> dict:
    """The CPU (lscpu), cores, torch's threads and the fp32 and bf16 GEMM peak measured now."""
    from speed import cpu_fields, dense_peaks  # here, not at the top: the workers never import the bench helpers

    cpu = cpu_fields()
    return {
        "cpu": cpu["name"],
        "family": cpu["family"],
        "model": cpu["model"],
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "gemm_gflops": dense_peaks(peak_repeats),
    }


def host_line(info: dict) -> str:
    peaks = info["gemm_gflops"]
    return (
        f"host: {info['cpu']} (family {info['family']}, model {info['model']}), {info['cores']} cores, "
        f"torch {info['torch']} on {info['threads']} threads; 4096^3 GEMM peak fp32 {peaks['fp32']:.0f} GFLOP/s, "
        f"bf16 {peaks['bf16']:.0f} GFLOP/s"
    )


def print_summary(report: Report) -> None:
    print(f"\n{host_line(report.host)}\nold: {report.old}\nnew: {report.new}")
    width = max([len(row["what"]) for row in report.timings + report.exactness] + [40])
    print(f"\n{'timings (median of interleaved rounds)':{width}s}  {'old s':>8s}  {'new s':>8s}  new/old  rounds")
    for row in report.timings:
        print(
            f"{row['what']:{width}s}  {row['old_s']:8.3f}  {row['new_s']:8.3f}  {row['ratio']:7.3f}  {row['rounds']:6d}"
        )
    print(f"\n{'exactness (old against new, bit for bit)':{width}s}  verdict")
    for row in report.exactness:
        print(f"{row['what']:{width}s}  {row['verdict']}{'  ' + row['detail'] if row['detail'] else ''}")
    differ = sum(row["verdict"] != "identical" for row in report.exactness)
    if report.peak_resident_mb:
        print(
            "\npeak resident memory of a worker: "
            + ", ".join(f"{name} {mb:.0f} MB" for name, mb in report.peak_resident_mb.items())
        )
    print(
        f"\n{len(report.exactness) - differ} of {len(report.exactness)} outputs identical; "
        f"{len(report.errors)} worker errors"
    )
    failures: dict[tuple[str, str], list[str]] = {}
    for error in report.errors:
        last = error["error"].rstrip().splitlines()[-1] if error["error"].strip() else "(no message)"
        failures.setdefault((error["revision"], last), []).append(error["what"])
    for (name, last), whats in failures.items():
        more = f" and {len(whats) - 1} more" if len(whats) > 1 else ""
        print(f"  {name} failed on {whats[0]}{more}: {last}")


def compare_revisions(args: argparse.Namespace, sizes: Sizes, folder: Path) -> Report:
    """Check out the revisions, start their workers, run every measurement; clean up whatever happens."""
    scratch = Path(tempfile.mkdtemp(prefix="diffuse-revisions-"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, scratch, ignore_errors=True)
        old_tree, old_label = stack.enter_context(revision_tree(args.old, scratch, "old"))
        new_tree, new_label = stack.enter_context(revision_tree(args.new, scratch, "new"))
        log(f"old: {old_label} in {old_tree}; new: {new_label} in {new_tree}; measuring the GEMM peak")
        report = Report(old=old_label, new=new_label, host=host(sizes.peak_repeats))
        log(host_line(report.host))
        workers = {
            "old": Worker("old", old_tree, old_label, scratch),
            "new": Worker("new", new_tree, new_label, scratch),
        }
        for worker in workers.values():
            stack.push(lambda kind, *_, worker=worker: worker.stop(graceful=kind is None))
        bench = Bench(workers, report)
        sd15_checks(bench, folder, sizes)
        shipped_checks(bench, Path(args.default_model).resolve(), sizes)
    report.peak_resident_mb = {name: worker.peak_mb for name, worker in workers.items()}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", help="the old revision: a git rev (checked out into a temporary worktree) or a folder")
    parser.add_argument(
        "--new",
        default=str(ROOT),
        help="the new revision, a folder or a git rev (default: this working tree, uncommitted changes included)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="every path at tiny sizes, one round (a test of the bench itself)"
    )
    parser.add_argument("--rounds", type=int, default=Sizes.rounds, help="timed rounds per UNet step and VAE decode")
    parser.add_argument("--whole-rounds", type=int, default=Sizes.whole_rounds, help="timed rounds of the whole image")
    parser.add_argument("--default-model", default=str(ROOT / "models" / "default"), help="the shipped model's folder")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # the socket of a worker process
    args = parser.parse_args()
    if args.worker is not None:
        worker_main(args.worker)
        return
    if not args.old:
        parser.error("--old is required")
    # Ctrl-C and a plain kill both end the run through the clean-up (SIGINT too when a shell started us ignoring it).
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.default_int_handler)
    sizes = QUICK if args.quick else Sizes(rounds=args.rounds, whole_rounds=args.whole_rounds)
    from sd15 import sd15_folder

    try:
        report = compare_revisions(args, sizes, sd15_folder())
    except KeyboardInterrupt:
        print("\ninterrupted: workers stopped, worktrees removed", file=sys.stderr)
        sys.exit(130)
    print_summary(report)
    if args.json:
        args.json.write_text(json.dumps(dataclasses.asdict(report), indent=1))
    sys.exit(1 if report.errors else 0)


if __name__ == "__main__":
    main()
