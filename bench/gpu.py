"""How fast diffuse runs Stable Diffusion 1.5 on a CUDA GPU, against diffusers, measured in one run.

The GPU counterpart of bench/speed.py, on the same random weights of the full SD1.5
architecture (bench/sd15.py). Printed, for fp32, fp16 and bf16:
  - a guided UNet step (batch 2) and a VAE decode at 512x512, interleaved, medians, with
    the share of the GPU's measured matmul peak each reaches;
  - a whole 20-step 512x512 guided image (DPM++ 2M): median seconds, the GPU memory held
    while generating (weights included), and its difference to diffusers' fp32 image;
  - the shipped default model on the GPU against the same model on the CPU in fp32, same
    seeds: the noise is drawn on the CPU, so a seed should give the same image on either.
Nothing here passes or fails.

    python bench/gpu.py        # needs a CUDA GPU; a few minutes on an H100
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd15 import sd15_folder  # noqa: E402
from speed import PROMPT, SEED, WHOLE_STEPS, count_flops, interleaved  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CUDA = torch.device("cuda")


def synced(fn: Callable[[], object]) -> float:
    """Seconds of one call. The GPU runs asynchronously: timed up to the end of its last kernel."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def seconds_per_call(contenders: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per contender: two warm-up calls each (one here, one in bench/speed.py's
    interleaved), then `repeats` interleaved rounds."""
    for fn in contenders.values():
        synced(fn)
    return interleaved({name: functools.partial(synced, fn) for name, fn in contenders.items()}, repeats)


def matmul_peak(dtype: torch.dtype) -> float:
    """TFLOP/s of one large GEMM (8192^3) in `dtype`, fp32 without TF32 (torch's default)."""
    a, b = (torch.randn(8192, 8192, device=CUDA, dtype=dtype) for _ in range(2))
    return 2 * 8192**3 / seconds_per_call({"mm": lambda: a @ b}, 10)["mm"] / 1e12


def components(folder: Path, repeats: int) -> dict:
    """A guided UNet step and a VAE decode at 512x512, six contenders each, interleaved."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    import diffuse

    unets, vaes = {}, {}
    for name, dtype in DTYPES.items():
        ours = diffuse.load_pipeline(folder, dtype=dtype, device=CUDA)
        unets[f"diffuse {name}"], vaes[f"diffuse {name}"] = ours.unet, ours.vae
        unets[f"diffusers {name}"] = (
            UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype).to(CUDA).eval()
        )
        vaes[f"diffusers {name}"] = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype).to(CUDA).eval()
    generator = torch.Generator().manual_seed(0)
    latents, context = torch.randn(2, 4, 64, 64, generator=generator), torch.randn(2, 77, 768, generator=generator)
    t = torch.tensor([500, 500], device=CUDA)

    def unet_call(name: str) -> Callable[[], object]:
        unet, dtype = unets[name], DTYPES[name.split()[1]]
        x, c = latents.to(CUDA, dtype), context.to(CUDA, dtype)
        if name.startswith("diffusers"):
            return lambda: unet(x, t, encoder_hidden_states=c).sample
        return lambda: unet(x, t, c)

    def vae_call(name: str) -> Callable[[], object]:
        vae, z = vaes[name], latents[:1].to(CUDA, DTYPES[name.split()[1]])
        return (lambda: vae.decode(z).sample) if name.startswith("diffusers") else (lambda: vae.decode(z))

    results = {}
    with torch.no_grad():
        for what, make_call in (("unet step 512", unet_call), ("vae decode 512", vae_call)):
            calls = {name: make_call(name) for name in unets}
            tflop = {impl: count_flops(calls[f"{impl} fp32"]) / 1e12 for impl in ("diffusers", "diffuse")}
            results[what] = {"seconds": seconds_per_call(calls, repeats), "tflop": tflop}
            print(f"  {what} done", file=sys.stderr)
    unets.clear(), vaes.clear()  # the closures above hold the dicts, not the networks
    torch.cuda.empty_cache()
    return results


def whole_images(folder: Path, repeats: int) -> dict:
    """One contender at a time, so the GPU memory it peaks at is its own."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    import diffuse

    results = {}
    for impl in ("diffusers", "diffuse"):
        for name, dtype in DTYPES.items():
            if impl == "diffusers":
                pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None).to(CUDA)
                pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
                pipe.set_progress_bar_config(disable=True)

                def generate(pipe=pipe):
                    generator = torch.Generator("cpu").manual_seed(SEED)
                    return pipe(
                        PROMPT, num_inference_steps=WHOLE_STEPS, guidance_scale=7.5, generator=generator
                    ).images[0]
            else:
                pipe = diffuse.load_pipeline(folder, dtype=dtype, device=CUDA)

                def generate(pipe=pipe):
                    return pipe.txt2img(
                        PROMPT, steps=WHOLE_STEPS, guidance_scale=7.5, sampler="DPM++ 2M", seed=SEED
                    ).images[0]

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            image = generate()
            seconds = seconds_per_call({"image": generate}, repeats)["image"]
            results[f"{impl} {name}"] = {
                "seconds": seconds,
                "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
                "pixels": np.asarray(image.convert("RGB"), dtype=np.float64),
            }
            pipe = generate = None  # frees this contender before the next loads
            torch.cuda.empty_cache()
            print(f"  whole image {impl} {name} done", file=sys.stderr)
    return results


def default_model_across_devices(count: int = 8) -> dict:
    """The shipped model's images on the GPU (each dtype) against its CPU fp32 images, same seeds."""
    import diffuse
    from diffuse.cli import DEFAULT_MODEL

    prompts = [
        f"a {colour} {shape} above a {other} {second}"
        for colour, shape, other, second in zip(
            ["red", "green", "blue", "yellow"] * 2,
            ["circle", "square", "triangle", "star"] * 2,
            ["blue", "yellow", "red", "green"] * 2,
            ["square", "star", "circle", "triangle"] * 2,
        )
    ][:count]

    def images(device: torch.device, dtype: torch.dtype) -> np.ndarray:
        pipe = diffuse.load_pipeline(DEFAULT_MODEL, dtype=dtype, device=device)
        result = pipe.txt2img(
            prompts, width=64, height=64, steps=20, guidance_scale=4.0, seed=SEED
        )  # make run's guidance
        return np.stack([np.asarray(im, dtype=np.float64) for im in result.images])

    cpu = images(torch.device("cpu"), torch.float32)
    out = {}
    for name, dtype in DTYPES.items():
        diff = np.abs(images(CUDA, dtype) - cpu)
        out[name] = {"mean_abs": float(diff.mean()), "max_abs": float(diff.max())}
    return {"images": count, "vs_cpu_fp32": out}


def report(peaks: dict, parts: dict, whole: dict, default: dict) -> None:
    print(f"machine: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    print("matmul peak (8192^3 GEMM): " + ", ".join(f"{n} {tf:.0f} TFLOP/s" for n, tf in peaks.items()))
    for what, entry in parts.items():
        s, work = entry["seconds"], entry["tflop"]
        print(f"\n{what} (diffusers {work['diffusers']:.2f} TFLOP, diffuse {work['diffuse']:.2f} TFLOP)")
        for name, seconds in s.items():
            impl, dtype = name.split()
            share = work[impl] / seconds / peaks[dtype]
            print(f"  {name:15s} {seconds * 1e3:8.1f} ms   {share:4.0%} of the {dtype} matmul peak")
        for dtype in DTYPES:
            print(f"  diffuse {dtype} is {s[f'diffusers {dtype}'] / s[f'diffuse {dtype}']:.2f}x diffusers {dtype}")
    print(f"\nwhole {WHOLE_STEPS}-step 512x512 guided image (DPM++ 2M)")
    reference = whole["diffusers fp32"]["pixels"]
    for name, entry in whole.items():
        diff = np.abs(entry["pixels"] - reference)
        print(
            f"  {name:15s} {entry['seconds']:6.2f} s   GPU memory peak {entry['peak_gb']:5.2f} GB   "
            f"image vs diffusers fp32: mean {diff.mean():5.2f}/255, max {diff.max():3.0f}/255"
        )
    for dtype in DTYPES:
        ratio = whole[f"diffusers {dtype}"]["seconds"] / whole[f"diffuse {dtype}"]["seconds"]
        print(f"  diffuse {dtype} is {ratio:.2f}x diffusers {dtype}")
    print(f"\nshipped default model on the GPU vs on the CPU (fp32), {default['images']} images at 64x64, same seeds:")
    for name, diff in default["vs_cpu_fp32"].items():
        print(f"  GPU {name}: mean abs difference {diff['mean_abs']:.2f}/255, max {diff['max_abs']:.0f}/255")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed repetitions per component (default 10)")
    parser.add_argument("--image-repeats", type=int, default=3, help="timed whole images per contender (default 3)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU; bench/speed.py measures the CPU")
    warnings.filterwarnings("ignore")
    from diffusers.utils import logging

    logging.set_verbosity_error()
    folder = sd15_folder()
    peaks = {name: matmul_peak(dtype) for name, dtype in DTYPES.items()}
    parts = components(folder, args.repeats)
    whole = whole_images(folder, args.image_repeats)
    report(peaks, parts, whole, default_model_across_devices())


if __name__ == "__main__":
    main()
