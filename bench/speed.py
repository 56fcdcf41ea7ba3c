"""How fast diffuse runs Stable Diffusion 1.5 on this CPU, against diffusers, measured in one run.

Both load the same cached random weights of the full SD1.5 architecture (bench/sd15.py).
Every figure is a median over repetitions, and the repetitions are interleaved (each
one times every contender once), so a change in the machine's load hits all of them
alike. Each implementation runs in a process of its own, as a user runs it: diffuse
sets process-wide options when it loads a model. Nothing here passes or fails: it
prints times, ratios and differences.

    .venv/bin/python bench/speed.py                  # everything (about 25 minutes on 2 cores)
    .venv/bin/python bench/speed.py --skip-whole     # components only
    .venv/bin/python bench/speed.py --speedups-only  # the optional speed-ups on a whole image
    .venv/bin/python bench/speed.py --sdxl           # SDXL's rows only (bench/sdxl.py; 1024x1024)

Printed:
  - the matmul peak of this machine (fp32 and bf16 GEMM, 4096^3), measured now;
  - a guided UNet step (batch 2) at 256x256 and 512x512 and a VAE decode at 512x512, fp32
    and bf16, with the share of the matmul peak each reaches (FLOPs counted by torch);
  - a whole 20-step 512x512 guided image (DPM++ 2M), each contender in a fresh process so
    its peak resident memory is its own, and how far its image is from the fp32 one;
  - the shipped default model's bf16 images against its fp32 images (same seeds);
  - with --sdxl instead: SDXL's 1024x1024 UNet step and VAE decode in bf16 (bench/sdxl.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd15 import CACHE, sd15_folder  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROMPT = "a photograph of an astronaut riding a horse on the moon"
WHOLE_STEPS, SEED = 20, 1234


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(contenders: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median seconds per contender. Each callable makes one call and returns its seconds;
    one warm-up call each, then `repeats` rounds of one call each."""
    for fn in contenders.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            times[name].append(fn())
    return {name: statistics.median(ts) for name, ts in times.items()}


def matmul_peak(dtype: torch.dtype, repeats: int = 5) -> float:
    """GFLOP/s of one large GEMM: the ceiling a dense network's layers can approach."""
    a, b = torch.randn(4096, 4096, dtype=dtype), torch.randn(4096, 4096, dtype=dtype)
    seconds = interleaved({"mm": lambda: timed(lambda: a @ b)}, repeats)["mm"]
    return 2 * 4096**3 / seconds / 1e9


@functools.cache
def count_fused_linears() -> None:
    """Teach torch's FLOP counter oneDNN's fused linear op (diffuse's bf16 linear layers and GEGLU),
    which it does not know: 2 x rows x in x out, the epilogue's few operations per output not counted."""
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.mkldnn._linear_pointwise)
    def linear_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * int(np.prod(x_shape)) * out_shape[-1]


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of one call. Attention runs on PyTorch's math backend here, whose matmuls the
    counter sees (the fused CPU kernel is invisible to it); the count is the same work."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    count_fused_linears()

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ---- UNet steps and VAE decodes, each implementation in a process of its own -------------------------
# diffuse sets process-wide options when it loads a model (diffuse.runtime.keep_freed_memory:
# malloc keeps freed memory); in a shared process they would speed diffusers up too.


def component_worker(impl: str, connection, keep_freed: bool) -> None:
    """Loads one implementation's UNet and VAE in fp32 and bf16, then times the calls asked for.
    `keep_freed` applies diffuse's malloc setting in this process even for diffusers."""
    import warnings

    from diffuse import kernels
    from diffuse.runtime import keep_freed_memory

    warnings.filterwarnings("ignore")
    if keep_freed:
        keep_freed_memory()
    folder = sd15_folder()
    unets, vaes = {}, {}
    if impl == "diffusers":  # each process imports only its own implementation
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from diffusers.utils import logging

        logging.set_verbosity_error()
        for name, dtype in DTYPES.items():
            unets[name] = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype).eval()
            vaes[name] = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype).eval()
    else:
        import diffuse

        for name, dtype in DTYPES.items():
            ours = diffuse.load_pipeline(folder, dtype=dtype)
            unets[name], vaes[name] = ours.unet, ours.vae
    connection.send(
        {
            "freed_memory_kept": (keep_freed or impl == "diffuse") and keep_freed_memory(),
            "kernels": kernels.status() if impl == "diffuse" else "none",
        }
    )
    calls: dict[tuple, Callable[[], object]] = {}

    def call(what: str, dtype_name: str, size: int) -> Callable[[], object]:
        generator, dtype = torch.Generator().manual_seed(size), DTYPES[dtype_name]
        if what == "vae decode":
            vae, z = vaes[dtype_name], torch.randn(1, 4, size // 8, size // 8, generator=generator).to(dtype)
            return (lambda: vae.decode(z).sample) if impl == "diffusers" else (lambda: vae.decode(z))
        unet, t = unets[dtype_name], torch.tensor([500, 500])
        x = torch.randn(2, 4, size // 8, size // 8, generator=generator).to(dtype)
        c = torch.randn(2, 77, 768, generator=generator).to(dtype)
        return (lambda: unet(x, t, encoder_hidden_states=c).sample) if impl == "diffusers" else (lambda: unet(x, t, c))

    with torch.no_grad():
        while (request := connection.recv()) is not None:
            kind, *key = request
            if tuple(key) not in calls:
                calls[tuple(key)] = call(*key)
            fn = calls[tuple(key)]
            connection.send(count_flops(fn) if kind == "flops" else timed(fn))


def components(repeats: int, sizes: list[int], diffusers_keeps_freed: bool = False) -> tuple[dict, dict]:
    """Guided UNet steps (batch 2) and a VAE decode at 512, four contenders each, interleaved
    across the two processes; and what each process reported of its settings."""
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    workers, settings = {}, {}
    for impl in ("diffusers", "diffuse"):
        parent_end, child_end = spawn.Pipe()
        keep_freed = impl == "diffusers" and diffusers_keeps_freed
        process = spawn.Process(target=component_worker, args=(impl, child_end, keep_freed), daemon=True)
        process.start()
        workers[impl] = (process, parent_end)
        settings[impl] = parent_end.recv()  # sent once loaded

    def ask(impl: str, *request) -> float:
        workers[impl][1].send(request)
        return workers[impl][1].recv()

    results = {}
    try:
        for what, size in [("unet step", size) for size in sizes] + [("vae decode", 512)]:
            calls = {
                f"{impl} {dtype}": functools.partial(ask, impl, "time", what, dtype, size)
                for impl in workers
                for dtype in DTYPES
            }
            # Each implementation's own count: diffuse computes the upsampling convolutions with fewer FLOPs.
            work = {impl: ask(impl, "flops", what, "fp32", size) / 1e12 for impl in workers}
            results[f"{what} {size}"] = {"seconds": interleaved(calls, repeats), "tflop": work}
            print(f"  {what} {size} done", file=sys.stderr)
    finally:
        for process, connection in workers.values():
            connection.send(None)
            process.join()
    return results, settings


# ---- a whole image, one contender per process ---------------------------------------------------------

# diffuse's optional speed-ups (diffuse.speedups), timed on top of bf16.
SPEEDUPS = {
    "deep-cache-3": dict(deep_cache_interval=3),
    "guidance-cutoff-0.5": dict(guidance_cutoff=0.5),
    "token-merging-0.5": dict(token_merging=0.5),
}


def whole_image(impl: str, dtype_name: str, out: Path, speedup: str | None = None) -> dict:
    """Runs in its own process: load, generate one 20-step 512x512 image, report time and peak memory."""
    dtype = DTYPES[dtype_name]
    folder = sd15_folder()
    if impl == "diffusers":
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
        from diffusers.utils import logging

        logging.set_verbosity_error()
        pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)

        def generate():
            generator = torch.Generator("cpu").manual_seed(SEED)
            return pipe(PROMPT, num_inference_steps=WHOLE_STEPS, guidance_scale=7.5, generator=generator).images[0]
    else:
        import diffuse

        pipe = diffuse.load_pipeline(folder, dtype=dtype)
        speedups = diffuse.Speedups(**SPEEDUPS[speedup]) if speedup else None

        def generate():
            return pipe.txt2img(
                PROMPT, steps=WHOLE_STEPS, guidance_scale=7.5, sampler="DPM++ 2M", seed=SEED, speedups=speedups
            ).images[0]

    start = time.perf_counter()
    image = generate()
    seconds = time.perf_counter() - start
    image.save(out)
    return {"seconds": seconds, "peak_rss_mb": peak_resident_mb()}


def peak_resident_mb() -> float:
    """This process's peak resident memory. Read from /proc (VmHWM), which starts afresh at exec;
    getrusage's ru_maxrss would also count the parent's memory from before the fork."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # elsewhere: kB on Linux, bytes on macOS


def whole_images(speedups_only: bool = False) -> dict:
    runs = (
        [("diffuse", "bf16", None)]
        if speedups_only
        else [(impl, dtype, None) for impl in ("diffusers", "diffuse") for dtype in DTYPES]
    )
    runs += [("diffuse", "bf16", speedup) for speedup in SPEEDUPS]
    results = {}
    for impl, dtype_name, speedup in runs:
        name = f"{impl} {dtype_name}" + (f" {speedup}" if speedup else "")
        png = CACHE / f"whole-{name.replace(' ', '-')}.png"
        command = [sys.executable, __file__, "--whole", impl, dtype_name, str(png)] + ([speedup] if speedup else [])
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results[name] = {**json.loads(done.stdout.strip().splitlines()[-1]), "png": str(png)}
        print(f"  whole image {name} done", file=sys.stderr)
    return results


def pixels(path: str | Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def default_model_precision(count: int = 8) -> dict:
    """The shipped model's bf16 images against its fp32 images at the same seeds."""
    import diffuse
    from diffuse.cli import DEFAULT_MODEL

    prompts = [
        f"a {size} {colour} {shape} in the {where} on a {bg} background"
        for size, colour, shape, where, bg in zip(
            ["small", "large"] * 4,
            ["red", "green", "blue", "yellow"] * 2,
            ["circle", "square", "triangle", "star"] * 2,
            ["center", "top left", "bottom right", "top right"] * 2,
            ["white", "black", "gray", "beige"] * 2,
        )
    ][:count]
    images = {}
    for name, dtype in DTYPES.items():
        pipe = diffuse.load_pipeline(DEFAULT_MODEL, dtype=dtype)
        result = pipe.txt2img(prompts, width=64, height=64, steps=20, guidance_scale=3.0, seed=SEED)
        images[name] = np.stack([np.asarray(im, dtype=np.float64) for im in result.images])
    diff = np.abs(images["bf16"] - images["fp32"])
    changes = {}
    for name, settings in DEFAULT_MODEL_SPEEDUPS.items():  # in the default dtype, against its own plain images
        result = pipe.txt2img(
            prompts, width=64, height=64, steps=20, guidance_scale=3.0, seed=SEED, speedups=diffuse.Speedups(**settings)
        )
        faster = np.stack([np.asarray(im, dtype=np.float64) for im in result.images])
        changes[name] = float(np.abs(faster - images["bf16"]).mean())
    return {"images": count, "mean_abs": float(diff.mean()), "max_abs": float(diff.max()), "speedups_mean_abs": changes}


DEFAULT_MODEL_SPEEDUPS = {**SPEEDUPS, "deep-cache-2": dict(deep_cache_interval=2)}


# ---- report -----------------------------------------------------------------------------------------


def report(peaks: dict, parts: dict, whole: dict | None, default: dict | None, settings: dict | None = None) -> None:
    print(
        f"machine: {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    if peaks:
        print(f"matmul peak (4096^3 GEMM): fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")
    if settings:
        kept = settings["diffuse"]["freed_memory_kept"]
        print(
            f"each implementation in its own process; malloc keeps freed memory in diffuse's: {kept}, "
            f"in diffusers': {settings['diffusers']['freed_memory_kept']}"
        )
        print(f"diffuse's {settings['diffuse']['kernels']}")
    for what, entry in parts.items():
        s = entry["seconds"]
        work = entry["tflop"]
        print(f"\n{what} (diffusers {work['diffusers']:.2f} TFLOP, diffuse {work['diffuse']:.2f} TFLOP)")
        for name, seconds in s.items():
            impl, dtype = name.split()
            share = work[impl] * 1e3 / seconds / peaks[dtype]
            print(f"  {name:15s} {seconds:7.2f} s   {share:4.0%} of the {dtype} matmul peak")
        for dtype in DTYPES:
            print(f"  diffuse {dtype} is {s[f'diffusers {dtype}'] / s[f'diffuse {dtype}']:.2f}x diffusers {dtype}")
        print(f"  diffuse bf16 is {s['diffusers fp32'] / s['diffuse bf16']:.2f}x diffusers fp32")
    if whole and "diffusers fp32" not in whole:  # --speedups-only
        print(f"\nwhole {WHOLE_STEPS}-step 512x512 guided image (DPM++ 2M), one process each, diffuse bf16")
        plain = whole["diffuse bf16"]
        for name, entry in whole.items():
            diff = np.abs(pixels(entry["png"]) - pixels(plain["png"]))
            print(
                f"  {name:34s} {entry['seconds']:6.1f} s   {plain['seconds'] / entry['seconds']:4.2f}x plain   "
                f"peak RSS {entry['peak_rss_mb']:6.0f} MB   image vs plain bf16: mean {diff.mean():5.2f}/255"
            )
    elif whole:
        print(f"\nwhole {WHOLE_STEPS}-step 512x512 guided image (DPM++ 2M), one process each")
        reference = pixels(whole["diffusers fp32"]["png"])
        ours_fp32 = pixels(whole["diffuse fp32"]["png"])
        for name, entry in whole.items():
            diff = np.abs(pixels(entry["png"]) - reference)
            line = (
                f"  {name:34s} {entry['seconds']:6.1f} s   peak RSS {entry['peak_rss_mb']:6.0f} MB   "
                f"image vs diffusers fp32: mean {diff.mean():5.2f}/255, max {diff.max():3.0f}/255"
            )
            if name.startswith("diffuse bf16"):
                diff = np.abs(pixels(entry["png"]) - ours_fp32)
                line += f"; vs diffuse fp32: mean {diff.mean():.2f}/255"
            print(line)
        for dtype in DTYPES:
            ratio = whole[f"diffusers {dtype}"]["seconds"] / whole[f"diffuse {dtype}"]["seconds"]
            print(f"  diffuse {dtype} is {ratio:.2f}x diffusers {dtype}")
    if default:
        print(
            f"\nshipped default model, bf16 vs fp32, {default['images']} images at 64x64, same seeds: "
            f"mean abs difference {default['mean_abs']:.2f}/255, max {default['max_abs']:.0f}/255"
        )
        for name, change in default["speedups_mean_abs"].items():
            print(f"  bf16 with {name}: mean abs difference {change:.2f}/255 from plain bf16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per component (default 3)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="UNet step image sizes")
    parser.add_argument("--skip-whole", action="store_true", help="skip the whole-image runs")
    parser.add_argument(
        "--speedups-only",
        action="store_true",
        help="only the whole 512x512 bf16 image, plain and with each optional speed-up (~8 minutes)",
    )
    parser.add_argument(
        "--default-model-only",
        action="store_true",
        help="only the shipped model's bf16 and speed-up image differences (seconds)",
    )
    parser.add_argument(
        "--diffusers-keeps-freed-memory",
        action="store_true",
        help="give diffusers' component process diffuse's malloc setting too: what the setting alone is worth",
    )
    parser.add_argument(
        "--sdxl", type=int, metavar="ROUNDS", nargs="?", const=3, help="only SDXL's rows, ROUNDS processes each (3)"
    )
    parser.add_argument("--whole", nargs="+", metavar="IMPL DTYPE PNG [SPEEDUP]", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sdxl:
        import sdxl

        sdxl.run(args.sdxl, calls=2)
        return
    if args.whole:  # the child process of whole_images
        impl, dtype_name, png, *speedup = args.whole
        print(json.dumps(whole_image(impl, dtype_name, Path(png), *speedup)))
        return
    import warnings

    warnings.filterwarnings("ignore")
    if args.default_model_only:
        report({}, {}, None, default_model_precision())
        return
    if args.speedups_only:
        report({}, {}, whole_images(speedups_only=True), None)
        return
    sd15_folder()  # built once, before the processes that read it
    peaks = {name: matmul_peak(dtype) for name, dtype in DTYPES.items()}
    whole = None if args.skip_whole else whole_images()  # first: this process is still small while they run
    parts, settings = components(args.repeats, args.sizes, args.diffusers_keeps_freed_memory)
    default = default_model_precision()
    report(peaks, parts, whole, default, settings)
    results = {"peaks_gflops": peaks, "components": parts, "whole": whole, "default_model_bf16": default}
    (CACHE / "speed-results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
