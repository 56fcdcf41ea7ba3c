"""What a LoRA costs on Stable Diffusion 1.5: time per UNet step, apply + restore, peak memory.

The LoRAs are random kohya-format files written here with safetensors (rank 32 and 128 by
default, alpha = rank / 2, fp16 as sd-scripts saves them), patching the 192 UNet modules
kohya trains (every transformer's attention, feed-forward and proj_in / proj_out) and the 72
of the text encoder (attention and MLP); --locon adds the resnets' 3x3 convolutions. They
are merged into the cached random SD1.5 weights (bench/sd15.py): a weight's values do not
change what a step costs, so random weights time the real thing.

Measured in one run on one host, interleaved (each round visits every case, in a rotated
order, so a change in the machine's load hits all alike), medians over the rounds:
  - a guided UNet step (batch 2, 64x64 latents) in bf16 (and fp32 with --fp32) with each
    LoRA merged against without: the step just after the switch, and the next one;
  - reading the file, merging it (LoraMerge.apply) and restoring the weights, in bf16, and
    whether every parameter is bit-identical to before after all the rounds (sha256); the
    warm-up round's read + apply, the process's first, apart: it checks the whole file for
    non-finite values and writes the touched weights' originals to the spill file, which later
    applies reuse;
  - the peak resident memory (ru_maxrss) of a process that loads the model with a LoRA folder
    and makes one small image, with the LoRA's tag in the prompt and without, a fresh process
    per case and round; beside it the peak of loading alone and the peak while generating
    (the high-water mark reset after loading, which otherwise hides a small image's peak).
Nothing passes or fails on a time: the bars of issue 22 are printed beside the figures.

    .venv/bin/python bench/lora.py            # defaults (about 10 minutes on 2 cores, more under load)
    .venv/bin/python bench/lora.py --quick    # tiny sizes, one round: checks the bench runs
    .venv/bin/python bench/lora.py --fp32 --locon
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd15 import sd15_folder  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse on the moon"
# diffusers' module names (as kohya writes them) that a full attention + feed-forward LoRA patches.
UNET_SUFFIXES = (
    ".attn1.to_q",
    ".attn1.to_k",
    ".attn1.to_v",
    ".attn1.to_out.0",
    ".attn2.to_q",
    ".attn2.to_k",
    ".attn2.to_v",
    ".attn2.to_out.0",
    ".ff.net.0.proj",
    ".ff.net.2",
    ".proj_in",
    ".proj_out",
)
TE_SUFFIXES = (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")
LOCON_SUFFIXES = (".conv1", ".conv2")


# ---- the LoRA files --------------------------------------------------------------------------------------


def weight_shapes(file: Path) -> dict[str, list[int]]:
    """Module path -> weight shape, read from a safetensors header (no tensor is loaded)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return {k.removesuffix(".weight"): f.get_slice(k).get_shape() for k in f.keys() if k.endswith(".weight")}


def lora_modules(folder: Path, locon: bool) -> dict[str, list[int]]:
    """kohya module name -> the patched weight's shape, for SD1.5's UNet and text encoder."""
    unet = weight_shapes(folder / "unet" / "diffusion_pytorch_model.safetensors")
    te = weight_shapes(folder / "text_encoder" / "model.safetensors")
    modules = {}
    for path, shape in unet.items():
        is_lora = "attentions" in path and path.endswith(UNET_SUFFIXES)
        if is_lora or (locon and "resnets" in path and path.endswith(LOCON_SUFFIXES)):
            modules["lora_unet_" + path.replace(".", "_")] = shape
    for path, shape in te.items():
        path = path if path.startswith("text_model.") else "text_model." + path  # transformers 5 drops it
        if path.startswith("text_model.encoder.layers.") and path.endswith(TE_SUFFIXES):
            modules["lora_te_" + path.replace(".", "_")] = shape
    return modules


def write_lora(path: Path, modules: dict[str, list[int]], rank: int, seed: int) -> int:
    """A random kohya LoRA of `rank` with alpha = rank / 2 over `modules`; returns its size in bytes."""
    from safetensors.torch import save_file

    generator, tensors = torch.Generator().manual_seed(seed), {}
    for name, shape in modules.items():
        out, inner, *kernel = shape
        r = min(rank, out, inner)
        down_kernel, up_kernel = (kernel, [1] * len(kernel))  # LoCon: the kernel on down, 1x1 on up
        down = torch.randn(r, inner, *down_kernel, generator=generator) / inner**0.5
        up = torch.randn(out, r, *up_kernel, generator=generator) * 0.01
        tensors[f"{name}.lora_down.weight"] = down.half().contiguous()
        tensors[f"{name}.lora_up.weight"] = up.half().contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(rank / 2, dtype=torch.float16)
    save_file(tensors, str(path), metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(rank / 2)})
    return path.stat().st_size


# ---- host ----------------------------------------------------------------------------------------------


def host_line(peak_repeats: int) -> str:
    """The CPU (lscpu), cores, threads and the fp32 and bf16 4096^3 GEMM peak measured now."""
    from speed import cpu_model, dense_peaks

    peaks = dense_peaks(peak_repeats)
    return (
        f"host: {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__} on {torch.get_num_threads()} threads; "
        f"4096^3 GEMM peak fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s"
    )


# ---- steps, apply and restore, in this process -----------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def weights_hash(networks: dict[str, torch.nn.Module]) -> str:
    digest = hashlib.sha256()
    for network in networks.values():
        for name, tensor in network.state_dict(keep_vars=True).items():
            digest.update(name.encode())
            digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.3f} s (min {min(values):.3f}, max {max(values):.3f})"


def measure_steps(folder: Path, files: dict[str, Path], dtype: torch.dtype, args: argparse.Namespace) -> dict:
    """Interleaved rounds over "none" and each LoRA: merge (timed), two UNet steps (both timed),
    restore (timed). Returns the lists of seconds per case and the hashes before and after."""
    import diffuse
    from diffuse.adapters import LoraMerge, read_lora

    pipe = diffuse.load_pipeline(folder, dtype=dtype)
    networks = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    merge = LoraMerge(networks)
    size = args.latent
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size, size, generator=generator).to(dtype)
    c = torch.randn(2, 77, 768, generator=generator).to(dtype)
    t = torch.tensor([500, 500])
    cases = ["none", *files]
    times = {case: {"read": [], "apply": [], "first": [], "step": [], "restore": []} for case in cases}
    warm = {case: {name: [] for name in times[case]} for case in cases}  # round 0: the process's first apply
    before = weights_hash(networks)
    with torch.no_grad():
        pipe.unet(x, t, c)  # warm-up: first calls allocate and pick kernels
        for round_ in range(args.rounds + 1):  # round 0 warms every case up and is not kept
            for case in cases[round_ % len(cases) :] + cases[: round_ % len(cases)]:
                got = times[case] if round_ else warm[case]
                if case != "none":
                    start = time.perf_counter()
                    lora = read_lora(files[case])
                    got["read"].append(time.perf_counter() - start)
                    got["apply"].append(timed(lambda: merge.apply([(lora, 1.0, 1.0)])))  # noqa: B023
                got["first"].append(timed(lambda: pipe.unet(x, t, c)))
                got["step"].append(timed(lambda: pipe.unet(x, t, c)))
                if case != "none":
                    got["restore"].append(timed(merge.restore))
            print(f"  round {round_} of {args.rounds} done", file=sys.stderr, flush=True)
    return {"times": times, "warm": warm, "identical": weights_hash(networks) == before}


def report_steps(label: str, result: dict, with_merge: bool) -> list[str]:
    times, lines = result["times"], []
    base = statistics.median(times["none"]["step"])
    lines.append(f"{label} UNet step, guided batch 2 (bar: LoRA / none <= 1.02)")
    for case, got in times.items():
        ratio = statistics.median(got["step"]) / base
        first = statistics.median(got["first"]) / base
        lines.append(
            f"  {case:>8}: step {spread(got['step'])}  ratio {ratio:.3f}; "
            f"first step after the switch {statistics.median(got['first']):.3f} s (ratio {first:.3f})"
        )
    if not with_merge:
        return lines
    lines.append(f"{label} one LoRA merged and restored on SD1.5 (bar: apply + restore <= 2 s)")
    for case, got in times.items():
        if case == "none":
            continue
        both = [a + r for a, r in zip(got["apply"], got["restore"], strict=True)]
        lines.append(
            f"  {case:>8}: read {spread(got['read'])}; apply {spread(got['apply'])}; "
            f"restore {spread(got['restore'])}; apply + restore {spread(both)}"
        )
        first = result["warm"][case]
        lines.append(
            f"  {case:>8}: the process's first read + apply (the whole file checked finite, the originals "
            f"written to the spill file): {first['read'][0] + first['apply'][0]:.3f} s"
        )
    verdict = "bit-identical" if result["identical"] else "DIFFERENT"
    lines.append(f"  every UNet and text encoder parameter after all rounds vs before (sha256): {verdict}")
    return lines


# ---- peak memory of a whole small generation, a fresh process per case -----------------------------------


def memory_worker(folder: Path, lora_dir: Path, tag: str, size: int, steps: int) -> None:
    """Loads bf16 SD1.5 with the LoRA folder, makes one image, prints its peak resident MB as JSON."""
    import diffuse

    pipe = diffuse.load_pipeline(folder, dtype=torch.bfloat16, lora_dirs=[lora_dir])
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # Loading converts fp32 files to bf16 and peaks above what a small image needs: resetting the
    # high-water mark (Linux's clear_refs) lets the generation's own peak show.
    Path("/proc/self/clear_refs").write_text("5")
    prompt = PROMPT + (f" <lora:{tag}:1>" if tag else "")
    request = diffuse.GenerationRequest(prompt=prompt, width=size, height=size, steps=steps, seed=1)
    start = time.perf_counter()
    pipe.generate(request)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    since_load = int(status["VmHWM"].split()[0]) / 1024
    print(json.dumps({"loaded_mb": loaded, "peak_mb": peak, "generate_mb": since_load, "seconds": seconds}))


def measure_memory(lora_dir: Path, names: list[str], args: argparse.Namespace) -> list[str]:
    cases = ["none", *names]
    got: dict[str, list[dict]] = {case: [] for case in cases}
    for round_ in range(args.memory_rounds):
        for case in cases[round_ % len(cases) :] + cases[: round_ % len(cases)]:
            command = [
                sys.executable,
                __file__,
                "--memory-worker",
                str(lora_dir),
                case,
                str(args.image),
                str(args.steps),
            ]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            got[case].append(json.loads(out.strip().splitlines()[-1]))
        print(f"  memory round {round_ + 1} of {args.memory_rounds} done", file=sys.stderr, flush=True)
    base = statistics.median(r["peak_mb"] for r in got["none"])
    lines = [
        f"peak resident memory (ru_maxrss), one {args.image}x{args.image} {args.steps}-step bf16 image in a fresh "
        f"process, medians of {args.memory_rounds} (bar: with the tag / without <= 1.05)"
    ]
    base_generate = statistics.median(r["generate_mb"] for r in got["none"])
    for case, runs in got.items():
        peak = statistics.median(r["peak_mb"] for r in runs)
        loaded = statistics.median(r["loaded_mb"] for r in runs)
        generate = statistics.median(r["generate_mb"] for r in runs)
        seconds = statistics.median(r["seconds"] for r in runs)
        what = "no tag" if case == "none" else f"<lora:{case}:1>"
        each = ", ".join(f"{r['peak_mb']:.0f}" for r in runs)
        lines.append(
            f"  {what:>16}: process peak {peak:.0f} MB (ratio {peak / base:.3f}; runs {each}), of which loading "
            f"{loaded:.0f} MB; peak while generating {generate:.0f} MB (ratio {generate / base_generate:.3f}); "
            f"generate {seconds:.1f} s"
        )
    return lines


# ---- command line ----------------------------------------------------------------------------------------


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of the step / merge cases")
    parser.add_argument("--latent", type=int, default=64, help="latent side of the timed UNet steps")
    parser.add_argument("--fp32", action="store_true", help="time the fp32 steps too")
    parser.add_argument("--locon", action="store_true", help="patch the resnets' 3x3 convolutions as well")
    parser.add_argument("--memory-rounds", type=int, default=2, help="fresh-process memory rounds (0: none)")
    parser.add_argument("--image", type=int, default=256, help="side of the memory case's image")
    parser.add_argument("--steps", type=int, default=4, help="sampler steps of the memory case's image")
    parser.add_argument("--peak-repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one round: checks the bench runs")
    parser.add_argument("--memory-worker", nargs=4, metavar=("DIR", "TAG", "SIZE", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.ranks, args.rounds, args.latent, args.memory_rounds = [4, 8], 1, 8, 1
        args.image, args.steps, args.peak_repeats = 64, 1, 1
    return args


def main() -> None:
    args = parse()
    folder = sd15_folder()
    if args.memory_worker:
        lora_dir, tag, size, steps = args.memory_worker
        memory_worker(folder, Path(lora_dir), "" if tag == "none" else tag, int(size), int(steps))
        return
    lines = [host_line(args.peak_repeats)]
    modules = lora_modules(folder, args.locon)
    unet = sum(name.startswith("lora_unet_") for name in modules)
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as scratch:
        files = {}
        for rank in args.ranks:
            files[f"rank{rank}"] = Path(scratch) / f"rank{rank}.safetensors"
            size = write_lora(files[f"rank{rank}"], modules, rank, seed=rank)
            lines.append(
                f"LoRA rank{rank}: kohya, alpha {rank / 2:g}, {unet} UNet + {len(modules) - unet} text encoder "
                f"modules{' (LoCon convolutions included)' if args.locon else ''}, fp16, {size / 2**20:.1f} MiB"
            )
        print(
            f"latents {args.latent}x{args.latent}, {args.rounds} interleaved rounds after a warm-up round",
            file=sys.stderr,
        )
        lines += report_steps("bf16", measure_steps(folder, files, torch.bfloat16, args), with_merge=True)
        if args.fp32:
            lines += report_steps("fp32", measure_steps(folder, files, torch.float32, args), with_merge=True)
        if args.memory_rounds:
            lines += measure_memory(Path(scratch), list(files), args)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
