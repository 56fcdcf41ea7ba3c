"""How fast diffuse runs Stable Diffusion 1.5 on this CPU, against diffusers and OpenVINO, measured in one run.

All load the same cached random weights of the full SD1.5 architecture (bench/sd15.py;
OpenVINO converts diffusers' modules, bench/openvino_contender.py). Every figure is a median
over repetitions, and the repetitions are interleaved (each one times every contender once),
so a change in the machine's load hits all of them alike. Each contender runs in a process of
its own, as a user runs it: diffuse sets process-wide options when it loads a model, and each
process's peak memory is its own. Nothing here passes or fails: it prints times, ratios and
differences.

    .venv/bin/python bench/speed.py                  # everything (about 25 minutes on 2 cores, more with OpenVINO)
    .venv/bin/python bench/speed.py --skip-whole     # components only
    .venv/bin/python bench/speed.py --skip-whole --sizes 256 --repeats 1   # a quick look
    .venv/bin/python bench/speed.py --no-openvino --no-int8               # the rows before int8
    .venv/bin/python bench/speed.py --speedups-only  # the optional speed-ups on a whole image
    .venv/bin/python bench/speed.py --sdxl           # SDXL's rows only (bench/sdxl.py; 1024x1024)

OpenVINO's rows need the bench extra (`.venv/bin/pip install -e '.[bench]'`); without it a
line says they are skipped. Its networks are converted (and the int8 UNet quantized by NNCF)
once into bench/cache/openvino-sd15 before anything is timed.

Printed:
  - the CPU's model and the GEMM peaks of this machine (fp32, bf16 and int8, 4096^3), measured now;
  - a guided UNet step (batch 2) at 256x256 and 512x512 and a VAE decode at 512x512 (bench/components.py):
    diffusers, diffuse and OpenVINO in fp32 and bf16, diffuse (quantize="int8") and OpenVINO (NNCF) in
    int8, with the share of its dtype's GEMM peak each reaches (FLOPs counted by torch), its ratio to
    diffusers and OpenVINO in the same group, its output's largest difference from diffusers fp32,
    and each contender's peak resident memory;
  - a whole 20-step 512x512 guided image (DPM++ 2M), each contender in a fresh process so
    its peak resident memory is its own, and how far its image is from the fp32 one;
  - the shipped default model's bf16 images against its fp32 images (same seeds);
  - with --sdxl instead: SDXL's 1024x1024 UNet step and VAE decode in bf16, and with int8 unless
    --no-int8 (bench/sdxl.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
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
import openvino_contender  # noqa: E402
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


def int8_matmul_peak(repeats: int = 5) -> float:
    """GOP/s of one large int8 GEMM by oneDNN (PyTorch's x86 quantized linear) as diffuse's int8 path
    runs it: unsigned 8-bit activations with one scale and a zero point, signed weights packed once
    with a scale per output channel, bf16 out. Signed activations would be unfair to CPUs without
    AMX: oneDNN has no VNNI kernel for them and falls to its reference loop."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4096, 4096), dtype=torch.uint8, generator=generator)
    w = torch.randint(-127, 128, (4096, 4096), dtype=torch.int8, generator=generator)
    packed = torch.ops.onednn.qlinear_prepack(w, [4096, 4096])
    scales, zeros = torch.full((4096,), 0.01), torch.zeros(4096, dtype=torch.long)

    def gemm() -> torch.Tensor:
        return torch.ops.onednn.qlinear_pointwise(
            x, 0.02, 128, packed, scales, zeros, None, 1.0, 0, torch.bfloat16, "none", [], ""
        )

    seconds = interleaved({"mm": lambda: timed(gemm)}, repeats)["mm"]
    return 2 * 4096**3 / seconds / 1e9


def dense_peaks(repeats: int = 5) -> dict[str, float]:
    """The host's fp32 and bf16 GEMM peaks, measured now (the floors of float work)."""
    return {name: matmul_peak(dtype, repeats) for name, dtype in DTYPES.items()}


def peaks() -> dict[str, float]:
    """The host's dense floors: fp32, bf16 and int8 GEMM peaks, measured now."""
    return {**dense_peaks(), "int8": int8_matmul_peak()}


@functools.cache
def count_onednn_ops() -> None:
    """Teach torch's FLOP counter the oneDNN ops diffuse calls, which it does not know: the fused
    linear op (bf16 linear layers and GEGLU), 2 x rows x in x out, and the convolution with a
    packed weight (the folded upsampling), 2 x outputs x the weight's inputs per output; their
    epilogues' few operations per output not counted."""
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.mkldnn._linear_pointwise)
    def linear_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * int(np.prod(x_shape)) * out_shape[-1]

    @register_flop_formula(torch.ops.mkldnn._convolution_pointwise)
    def convolution_flops(x_shape, second_shape, *args, out_shape=None, **kwargs) -> int:
        # (x, weight, bias, ...), or with a binary epilogue (x, other, weight, bias, ...)
        binary = bool(args) and args[0] is not None and len(args[0]) == 4
        w_shape = args[0] if binary else second_shape
        return 2 * int(np.prod(out_shape)) * int(np.prod(w_shape[1:]))


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of one call. Attention runs on PyTorch's math backend here, whose matmuls the
    counter sees (the fused CPU kernel and diffuse's attention kernels are invisible to it, and
    the explicit form pads some heads' values); the count is the same work."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from diffuse.kernels import attention as attention_kernel
    from diffuse.runtime import attention as runtime_attention

    count_onednn_ops()
    takes, has_amx = attention_kernel.takes, runtime_attention.cpu_has_amx
    # every attention to PyTorch's, for the count only
    attention_kernel.takes, runtime_attention.cpu_has_amx = (lambda *qkv: False), (lambda: True)
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            fn()
    finally:
        attention_kernel.takes, runtime_attention.cpu_has_amx = takes, has_amx
    return counter.get_total_flops()


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

        # "int8" runs the bf16 networks with quantize="int8"; the other names are diffuse.Speedups.
        pipe = diffuse.load_pipeline(folder, dtype=dtype, quantize="int8" if speedup == "int8" else None)
        speedups = diffuse.Speedups(**SPEEDUPS[speedup]) if speedup in SPEEDUPS else None

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


def whole_images(speedups_only: bool = False, int8_rounds: int = 0) -> dict:
    """One process per image. With int8_rounds, only diffuse bf16 and diffuse bf16 int8, alternating
    for that many rounds, each entry holding the median seconds and the seconds of every round."""
    if int8_rounds:
        runs = [("diffuse", "bf16", speedup) for _ in range(int8_rounds) for speedup in (None, "int8")]
    elif speedups_only:
        runs = [("diffuse", "bf16", None)] + [("diffuse", "bf16", speedup) for speedup in [*SPEEDUPS, "int8"]]
    else:
        runs = [(impl, dtype, None) for impl in ("diffusers", "diffuse") for dtype in DTYPES]
        runs += [("diffuse", "bf16", speedup) for speedup in [*SPEEDUPS, "int8"]]
    results = {}
    for impl, dtype_name, speedup in runs:
        name = f"{impl} {dtype_name}" + (f" {speedup}" if speedup else "")
        png = CACHE / f"whole-{name.replace(' ', '-')}.png"
        command = [sys.executable, __file__, "--whole", impl, dtype_name, str(png)] + ([speedup] if speedup else [])
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        entry = json.loads(done.stdout.strip().splitlines()[-1])
        rounds = results.get(name, {}).get("rounds", []) + [entry["seconds"]]
        results[name] = {**entry, "seconds": statistics.median(rounds), "rounds": rounds, "png": str(png)}
        print(f"  whole image {name} done: {entry['seconds']:.1f} s", file=sys.stderr)
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


def report_components(peaks: dict, parts: dict) -> None:
    """Each row's median, its share of its dtype's GEMM floor, its ratio to the bf16 (or fp32) rows of
    diffusers and OpenVINO, its output's difference from diffusers fp32; each contender's peak memory."""
    print("\neach contender in its own process (threads; malloc keeps freed memory; settings):")
    for name, setting in parts["settings"].items():
        print(f"  {name:15s} {setting['threads']}; {setting['freed_memory_kept']}; {setting['settings']}")
    for what, rows in parts["rows"].items():
        work = parts["tflop"].get(what, {})
        counted = ", ".join(f"{impl} {tflop:.2f} TFLOP" for impl, tflop in work.items())
        print(f"\n{what} ({counted}; OpenVINO's FLOPs counted as diffusers')")
        for name, row in rows.items():
            impl, dtype = name.split()
            tflop = work.get("diffusers" if impl == "openvino" else impl, float("nan"))
            share = tflop * 1e3 / row["seconds"] / peaks[dtype]
            against = ["diffusers fp32", "openvino fp32"] if dtype == "fp32" else ["diffusers bf16", "openvino bf16"]
            ratios = ", ".join(
                f"{rows[other]['seconds'] / row['seconds']:.2f}x {other}"
                for other in against
                if other in rows and other != name
            )
            # Without a diffusers fp32 row there is no reference output (nan), and the column is left out.
            difference, reference = row["max_abs_difference"], row["reference_max_abs"]
            compared = f"vs diffusers fp32: max |diff| {difference:.3g} of max |y| {reference:.3g}   "
            compared = "" if math.isnan(difference) else compared
            print(f"  {name:15s} {row['seconds']:7.2f} s   {share:4.0%} of the {dtype} GEMM peak   {compared}{ratios}")
    print("\npeak resident memory of each contender's process (all its calls, both networks held)")
    for name, megabytes in parts["memory_mb"].items():
        print(f"  {name:15s} {megabytes:6.0f} MB")


def report(peaks: dict, parts: dict | None, whole: dict | None, default: dict | None) -> None:
    print(
        f"machine: {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {cpu_model()}"
    )
    if peaks:
        print(
            f"GEMM peak (4096^3): fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s, "
            f"int8 {peaks['int8']:.0f} GOP/s"
        )
    if parts:
        report_components(peaks, parts)
    if whole and "diffusers fp32" not in whole:  # --speedups-only
        print(f"\nwhole {WHOLE_STEPS}-step 512x512 guided image (DPM++ 2M), one process each, diffuse bf16")
        plain = whole["diffuse bf16"]
        for name, entry in whole.items():
            diff = np.abs(pixels(entry["png"]) - pixels(plain["png"]))
            print(
                f"  {name:34s} {entry['seconds']:6.1f} s   {plain['seconds'] / entry['seconds']:4.2f}x plain   "
                f"(rounds: {', '.join(f'{t:.1f}' for t in entry['rounds'])} s)   "
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


def contender_names(asked: list[str], openvino: bool, int8: bool) -> list[str]:
    """The component rows asked for, less OpenVINO's where it is not installed (a line says so)."""
    names = [name for name in asked if (int8 or "int8" not in name) and (openvino or "openvino" not in name)]
    if any(name.startswith("openvino") for name in names) and not openvino_contender.version():
        print("OpenVINO rows skipped: openvino does not import (pip install -e '.[bench]')", file=sys.stderr)
        names = [name for name in names if not name.startswith("openvino")]
    if "openvino int8" in names and not openvino_contender.nncf_version():
        print("OpenVINO int8 row skipped: nncf does not import (pip install -e '.[bench]')", file=sys.stderr)
        names.remove("openvino int8")
    return names


def cpu_fields() -> dict[str, str]:
    """lscpu's model name, CPU family and model (the first CPU's), read from /proc/cpuinfo."""
    cpuinfo = Path("/proc/cpuinfo")
    fields = {}
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return {
        "name": fields.get("model name", "?"),
        "family": fields.get("cpu family", "?"),
        "model": fields.get("model", "?"),
    }


def cpu_model() -> str:
    cpu = cpu_fields()
    return f"{cpu['name']} (family {cpu['family']}, model {cpu['model']})"


def main() -> None:
    from components import GROUPS, components

    every = [name for members in GROUPS.values() for name in members]
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
    parser.add_argument(
        "--openvino",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="OpenVINO's rows (the bench extra; on where openvino imports)",
    )
    parser.add_argument(
        "--int8", action=argparse.BooleanOptionalAction, default=True, help="the int8 rows (diffuse's and OpenVINO's)"
    )
    parser.add_argument("--decode-size", type=int, default=512, help="the VAE decode's image size (default 512)")
    parser.add_argument(
        "--contenders",
        nargs="+",
        choices=every,
        metavar="NAME",
        help=f"only these component rows, of: {', '.join(every)} (diffusers fp32 is the outputs' reference)",
    )
    parser.add_argument(
        "--calibration", type=int, default=8, help="guided steps NNCF calibrates OpenVINO's int8 UNet on (default 8)"
    )
    parser.add_argument(
        "--whole-int8",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="only the whole 512x512 image in diffuse bf16 and with quantize=int8, alternating for ROUNDS rounds",
    )
    parser.add_argument("--whole", nargs="+", metavar="IMPL DTYPE PNG [SPEEDUP]", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sdxl:
        import sdxl

        sdxl.run(args.sdxl, calls=2, int8=args.int8)
        return
    if args.whole:  # the child process of whole_images
        impl, dtype_name, png, *speedup = args.whole
        print(json.dumps(whole_image(impl, dtype_name, Path(png), *speedup)))
        return
    import warnings

    warnings.filterwarnings("ignore")
    if args.default_model_only:
        report({}, None, None, default_model_precision())
        return
    if args.speedups_only or args.whole_int8:
        report({}, None, whole_images(speedups_only=True, int8_rounds=args.whole_int8), None)
        return
    names = contender_names(args.contenders or every, args.openvino, args.int8)
    folder = sd15_folder()  # built once, before the processes that read it
    if any(name.startswith("openvino") for name in names):
        openvino_contender.export(folder, args.calibration if "openvino int8" in names else 0)
    measured = peaks()
    whole = None if args.skip_whole else whole_images()  # first: this process is still small while they run
    parts = components(
        args.repeats, args.sizes, names, args.diffusers_keeps_freed_memory, args.calibration, args.decode_size
    )
    default = default_model_precision()
    report(measured, parts, whole, default)
    results = {"peaks_gflops": measured, "components": parts, "whole": whole, "default_model_bf16": default}
    (CACHE / "speed-results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
