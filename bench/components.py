"""bench/speed.py's component rows: guided UNet steps (batch 2) and a VAE decode (512x512), each
contender (an implementation in one precision) in a process of its own.

A process per contender makes each one's peak resident memory its own, as a user runs it, and
keeps diffuse's process-wide settings (diffuse.runtime.keep_freed_memory: malloc keeps freed
memory) out of the others. The contenders run in two groups, so that fewer models are held at
once: the float32 ones, then the bf16 and int8 ones (the int8 rows' ratios are to the bf16 rows
beside them). Within a group the repetitions are interleaved, each round timing every contender
once, and the medians are reported. Each output is compared with diffusers' float32 on the same
inputs, so a broken conversion or quantization shows as a large difference.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import torch
from sd15 import sd15_folder
from speed import count_flops, interleaved, peak_resident_mb, timed

GROUPS = {
    "fp32": ["diffusers fp32", "diffuse fp32", "openvino fp32"],
    "bf16 and int8": ["diffusers bf16", "diffuse bf16", "openvino bf16", "diffuse int8", "openvino int8"],
}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.bfloat16}
REFERENCE = "diffusers fp32"


def inputs(what: str, size: int) -> list[torch.Tensor]:
    """The same float32 inputs in every process: a latent to decode, or a guided step's x, t, context."""
    generator = torch.Generator().manual_seed(size)
    if what == "vae decode":
        return [torch.randn(1, 4, size // 8, size // 8, generator=generator)]
    x = torch.randn(2, 4, size // 8, size // 8, generator=generator)
    return [x, torch.tensor([500, 500]), torch.randn(2, 77, 768, generator=generator)]


class TorchContender:
    """diffusers' or diffuse's UNet and VAE in one precision (int8: diffuse's quantize="int8" on bf16)."""

    def __init__(self, impl: str, dtype_name: str) -> None:
        folder, self.impl, self.dtype = sd15_folder(), impl, TORCH_DTYPES[dtype_name]
        if impl == "diffusers":  # each process imports only its own implementation
            from diffusers import AutoencoderKL, UNet2DConditionModel
            from diffusers.utils import logging

            logging.set_verbosity_error()
            self.unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=self.dtype).eval()
            self.vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=self.dtype).eval()
        else:
            import diffuse

            quantize = "int8" if dtype_name == "int8" else None
            ours = diffuse.load_pipeline(folder, dtype=self.dtype, quantize=quantize)
            self.unet, self.vae = ours.unet, ours.vae

    def settings(self) -> str:
        from diffuse import kernels

        return kernels.status() if self.impl == "diffuse" else "none"

    def call(self, what: str, size: int, tensors: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
        dtype, diffusers = self.dtype, self.impl == "diffusers"
        if what == "vae decode":
            vae, z = self.vae, tensors[0].to(dtype)
            if diffusers:
                return lambda: vae.decode(z).sample
            from diffuse.runtime import vae_tiles

            return lambda: vae_tiles.decode(vae, z)  # the pipeline's decode (whole at this size)
        unet, (x, t, c) = self.unet, tensors
        x, c = x.to(dtype), c.to(dtype)
        return (lambda: unet(x, t, encoder_hidden_states=c).sample) if diffusers else (lambda: unet(x, t, c))


def component_worker(name: str, connection, keep_freed: bool, calibration: int) -> None:
    """Loads one contender, then answers requests: ("time" | "output" | "flops", what, size), "memory"."""
    import warnings

    from diffuse.runtime import keep_freed_memory

    warnings.filterwarnings("ignore")
    impl, dtype_name = name.split()
    if keep_freed:
        keep_freed_memory()
    if impl == "openvino":
        import openvino_contender

        contender = openvino_contender.Contender(dtype_name, calibration)
    else:
        contender = TorchContender(impl, dtype_name)
    kept = (keep_freed or impl == "diffuse") and keep_freed_memory()
    connection.send({"freed_memory_kept": kept, "settings": contender.settings(), "threads": torch.get_num_threads()})
    key, fn = None, None
    with torch.no_grad():
        while (request := connection.recv()) is not None:
            kind, *asked = request
            if kind == "memory":
                connection.send(peak_resident_mb())
                continue
            if key != tuple(asked):  # one call's inputs and function held at a time
                key, fn = tuple(asked), None
                fn = contender.call(*asked, inputs(*asked))
            if kind == "flops":
                connection.send(count_flops(fn))
            elif kind == "output":
                connection.send(fn().float())
            else:
                connection.send(timed(fn))


def components(
    repeats: int,
    sizes: list[int],
    names: list[str],
    diffusers_keeps_freed: bool = False,
    calibration: int = 8,
    decode_size: int = 512,
) -> dict:
    """Times, outputs' differences from diffusers fp32, FLOPs (each implementation's own count, from its
    fp32 process, or its bf16 one where no fp32 one runs) and peak memory of the contenders in
    `names`, group by group."""
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    keys = [("unet step", size) for size in sizes] + [("vae decode", decode_size)]
    results: dict = {"rows": {}, "settings": {}, "memory_mb": {}, "tflop": {}}
    references: dict = {}  # diffusers fp32's outputs, from the first group
    for group, members in GROUPS.items():
        members = [name for name in members if name in names]
        if not members:
            continue
        workers = {}
        try:
            for name in members:  # one at a time, so two loads never peak together
                parent_end, child_end = spawn.Pipe()
                keep_freed = name.startswith("diffusers") and diffusers_keeps_freed
                process = spawn.Process(
                    target=component_worker, args=(name, child_end, keep_freed, calibration), daemon=True
                )
                process.start()
                workers[name] = (process, parent_end)
                results["settings"][name] = parent_end.recv()  # sent once loaded
            _time_group(workers, keys, repeats, results, references)
        finally:
            for process, connection in workers.values():
                connection.send(None)
                process.join()
        print(f"  components: the {group} group done", file=sys.stderr)
    return results


def _ask(workers: dict, name: str, *request):
    workers[name][1].send(request)
    return workers[name][1].recv()


def _time_group(workers: dict, keys: list[tuple[str, int]], repeats: int, results: dict, references: dict) -> None:
    ask = functools.partial(_ask, workers)
    for what, size in keys:
        calls = {name: functools.partial(ask, name, "time", what, size) for name in workers}
        seconds = interleaved(calls, repeats)
        reference = references.get((what, size))
        for name in workers:
            output = ask(name, "output", what, size)
            if name == REFERENCE:
                reference = references[(what, size)] = output
            difference = float((output - reference).abs().max()) if reference is not None else float("nan")
            scale = float(reference.abs().max()) if reference is not None else float("nan")
            results["rows"].setdefault(f"{what} {size}", {})[name] = {
                "seconds": seconds[name],
                "max_abs_difference": difference,
                "reference_max_abs": scale,
            }
        done = ", ".join(f"{name} {seconds[name]:.2f} s" for name in workers)
        print(f"  {what} {size}: {done}", file=sys.stderr)
    for name in workers:  # read before counting FLOPs, whose math attention would raise the peak
        results["memory_mb"][name] = ask(name, "memory")
    for name in workers:  # each implementation's count once: from its fp32 process, else its bf16 one
        impl, dtype_name = name.split()
        counted = any(impl in row for row in results["tflop"].values())
        if dtype_name in ("fp32", "bf16") and impl != "openvino" and not counted:
            for what, size in keys:
                results["tflop"].setdefault(f"{what} {size}", {})[impl] = ask(name, "flops", what, size) / 1e12
