"""SDXL at full size on this CPU: one 1024x1024 guided UNet step and one 1024x1024 VAE decode in
bf16, diffuse against diffusers, on the same random weights of the full SDXL base.

No model hub is reachable here, so the weights are random: a network's cost does not depend on
its weights' values. The architecture is diffuse's SDXL preset (diffuse.models.configs
PRESETS["sdxl"]) written as a diffusers folder by the configs diffuse's own export writes, in
bf16 (about 7 GB), once, into bench/cache/sdxl-random; both implementations load that folder.

Each contender runs in a fresh process of its own, one at a time, since two full SDXL models at
once would crowd a 24 GB machine; the rounds alternate (diffusers, diffuse, diffusers, ...) so a
change in the machine's load hits both alike. Each process loads the whole pipeline (both text
encoders too), makes one untimed call of each network, then times `--calls` of each, and reports
its peak resident memory; the first round also counts each network's FLOPs (torch's counter), from
which the share of the host's dense floor (the FLOPs at the bf16 GEMM peak measured in the run) is
printed. Nothing passes or fails: it prints medians and ratios. `bench/speed.py --sdxl` runs the same.

    .venv/bin/python bench/sdxl.py              # builds the folder if missing, then 2 rounds
    .venv/bin/python bench/sdxl.py --rounds 3 --calls 2
    .venv/bin/python bench/sdxl.py --tiles 512   # diffuse's tiled VAE decode against the whole one
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "tests"))
from sd15 import CACHE, perturb, save_into  # noqa: E402
from speed import count_flops, cpu_model, dense_peaks, peak_resident_mb, timed  # noqa: E402

FOLDER = CACHE / "sdxl-random"
SIZE, SEED = 1024, 1234
warnings.filterwarnings("ignore")


def sdxl_folder(seed: int = 0) -> Path:
    """The cached folder, built first if missing: diffusers' and transformers' classes from the
    preset's configs, made directly in bf16 so no float32 copy of the 2.6 G-parameter UNet exists."""
    if (FOLDER / "model_index.json").is_file():
        return FOLDER
    import conftest  # the CLIP vocabulary writer the tests use
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffuse.checkpoints import clip_layout, unet_layout, vae_layout
    from diffuse.models.configs import PRESETS

    cfg = PRESETS["sdxl"]
    start = time.perf_counter()
    print(f"building random SDXL weights into {FOLDER} (once) ...", file=sys.stderr)
    torch.manual_seed(seed)
    torch.set_default_dtype(torch.bfloat16)
    try:
        unet = UNet2DConditionModel.from_config(
            unet_layout.config_to_diffusers(cfg.unet, sample_size=cfg.sample_size, size_embed_dim=cfg.size_embed_dim)
        )
        vae = AutoencoderKL.from_config(vae_layout.config_to_diffusers(cfg.vae, sample_size=cfg.image_size))
        special = dict(bos_token_id=49406, eos_token_id=49407)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(**clip_layout.config_to_transformers(cfg.text_encoder, pad_token_id=49407, **special))
        )
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(**clip_layout.config_to_transformers(cfg.text_encoder_2, pad_token_id=0, **special))
        )
    finally:
        torch.set_default_dtype(torch.float32)
    perturb(unet, vae, text_encoder, text_encoder_2)
    CACHE.mkdir(parents=True, exist_ok=True)
    vocab = conftest.write_clip_vocab(CACHE / "clip-vocab")
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=conftest.reference_tokenizer(vocab, "sd1"),
        tokenizer_2=conftest.reference_tokenizer(vocab, "sd2"),
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
        ),
        add_watermarker=False,
    )
    save_into(pipe, FOLDER)
    print(f"built in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return FOLDER


def inputs() -> dict[str, torch.Tensor]:
    """One guided step's inputs (batch 2: the negative and the positive prompt) and one latent to decode."""
    g = torch.Generator().manual_seed(SEED)
    side = SIZE // 8
    return {
        "x": torch.randn(2, 4, side, side, generator=g).to(torch.bfloat16),
        "context": torch.randn(2, 77, 2048, generator=g).to(torch.bfloat16),
        "pooled": torch.randn(2, 1280, generator=g).to(torch.bfloat16),
        "z": torch.randn(1, 4, side, side, generator=g).to(torch.bfloat16),
    }


def contender(impl: str, calls: int, flops: bool) -> dict:
    """Runs in its own process: load the whole pipeline in bf16, then one untimed and `calls` timed
    calls of the UNet step and of the VAE decode (and, with `flops`, each one's FLOPs)."""
    folder, t, data = sdxl_folder(), torch.tensor([500, 500]), inputs()
    start = time.perf_counter()
    if impl == "diffusers":
        from diffusers import StableDiffusionXLPipeline
        from diffusers.utils import logging

        logging.set_verbosity_error()
        pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16, add_watermarker=False)
        time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]] * 2, dtype=torch.bfloat16)
        added = {"text_embeds": data["pooled"], "time_ids": time_ids}

        def step():
            return pipe.unet(data["x"], t, encoder_hidden_states=data["context"], added_cond_kwargs=added).sample

        def decode():
            return pipe.vae.decode(data["z"]).sample
    else:
        import diffuse

        pipe = diffuse.load_pipeline(folder, dtype=torch.bfloat16, quantize="int8" if impl == "diffuse-int8" else None)
        y = torch.cat([data["pooled"], torch.randn(2, 2816 - 1280, generator=torch.Generator().manual_seed(1))], 1)
        y = y.to(torch.bfloat16)

        def step():
            return pipe.unet(data["x"], t, data["context"], y)

        def decode():  # as a generation decodes (diffuse.runtime.vae_tiles: whole at this size)
            return pipe.decode_latents(data["z"] * pipe.config.vae.scaling_factor)

    load = time.perf_counter() - start
    networks = {"unet step": step, "vae decode": decode}
    with torch.no_grad():
        first = {what: timed(fn) for what, fn in networks.items()}
        seconds = {what: statistics.median(timed(fn) for _ in range(calls)) for what, fn in networks.items()}
        peak = peak_resident_mb()  # before the count, whose attention runs the math path's large scores
        work = {what: count_flops(fn) / 1e12 for what, fn in networks.items()} if flops else None
    return {"load": load, "first": first, "seconds": seconds, "peak_rss_mb": peak, "tflop": work}


def run_contender(impl: str, calls: int, flops: bool) -> dict:
    command = [sys.executable, __file__, "--contender", impl, "--calls", str(calls)] + ["--flops"] * flops
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{impl} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(peaks: dict, runs: dict[str, list[dict]]) -> None:
    print(f"host: {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__} on {torch.get_num_threads()} threads")
    print(f"4096^3 GEMM peak, measured now: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")
    print(
        f"SDXL base, random bf16 weights, {SIZE}x{SIZE}; each contender in a fresh process, {len(runs['diffuse'])} rounds"
        " (the times listed are each process's median)"
    )
    medians = {}
    for impl, rounds in runs.items():
        medians[impl] = {what: statistics.median(r["seconds"][what] for r in rounds) for what in rounds[0]["seconds"]}
        peak = max(r["peak_rss_mb"] for r in rounds)
        each = "; ".join(
            f"{what} "
            + ", ".join(f"{r['seconds'][what]:.1f}" for r in rounds)
            + f" s (first {rounds[0]['first'][what]:.1f})"
            for what in rounds[0]["seconds"]
        )
        print(f"  {impl:9s} load {statistics.median(r['load'] for r in rounds):5.1f} s; {each}; peak RSS {peak:.0f} MB")
    bars = {"unet step": 1.5, "vae decode": 1.4}
    for what, bar in bars.items():
        for ours in (impl for impl in runs if impl != "diffusers"):
            ratio = medians["diffusers"][what] / medians[ours][what]
            print(
                f"  {what}: {ours} {medians[ours][what]:.1f} s, diffusers {medians['diffusers'][what]:.1f} s, "
                f"{ours} is {ratio:.2f}x diffusers (bar {bar}x)"
            )
        for impl in runs:
            # torch's FLOP counter knows no int8 products: the int8 run does the bf16 run's work.
            tflop = runs["diffuse" if impl == "diffuse-int8" else impl][0]["tflop"][what]
            floor = tflop * 1e3 / peaks["bf16"]
            print(
                f"    {impl:9s} {tflop:.2f} TFLOP: dense floor {floor:.1f} s at the bf16 peak, "
                f"{floor / medians[impl][what]:.0%} of it reached"
            )
    theirs = max(r["peak_rss_mb"] for r in runs["diffusers"])
    for impl in (impl for impl in runs if impl != "diffusers"):
        ours = max(r["peak_rss_mb"] for r in runs[impl])
        print(f"  peak RSS: {impl} / diffusers = {ours / theirs:.2f} (bar <= 1)")


def tiles(size: int, tile: int, overlap: int) -> None:
    """The SDXL VAE's tiled decode (diffuse.runtime.vae_tiles) against its whole decode, in bf16:
    the largest difference, the time ratio, and the largest activation of each."""
    import diffuse
    from diffuse.runtime.vae_tiles import decoder_peak_bytes, spans, tiled_decode

    vae = diffuse.load_pipeline(sdxl_folder(), dtype=torch.bfloat16).vae
    z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(SEED)).to(torch.bfloat16)
    largest: list[int] = []
    hooks = [m.register_forward_hook(lambda m, i, o: largest.append(o.numel())) for m in vae.decoder.up.modules()]
    with torch.no_grad():
        start = time.perf_counter()
        whole = vae.decode(z).float()
        whole_seconds, whole_largest = time.perf_counter() - start, max(largest)
        largest.clear()
        start = time.perf_counter()
        tiled = tiled_decode(vae, z, tile=tile, overlap=overlap).float()
        tiled_seconds, tiled_largest = time.perf_counter() - start, max(largest)
    for hook in hooks:
        hook.remove()
    count = len(spans(size // 8, tile, overlap)) ** 2
    diff = (tiled.clamp(-1, 1) - whole.clamp(-1, 1)).abs() * 127.5
    print(f"host: {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__} on {torch.get_num_threads()} threads")
    print(f"SDXL VAE (random bf16 weights) at {size}x{size}, {count} tiles of {tile} latent pixels, overlap {overlap}")
    print(f"  whole decode {whole_seconds:.1f} s, tiled {tiled_seconds:.1f} s ({tiled_seconds / whole_seconds:.1f}x)")
    print(f"  largest activation: whole {whole_largest * 2 / 2**20:.0f} MB, tiled {tiled_largest * 2 / 2**20:.0f} MB")
    estimate = decoder_peak_bytes(vae, z.shape, z.dtype) / 2**20
    print(f"  estimated peak of the whole decode {estimate:.0f} MB (diffuse.runtime.vae_tiles.decoder_peak_bytes)")
    print(f"  tiled vs whole: max {diff.max():.2f}/255, mean {diff.mean():.3f}/255")


def run(rounds: int, calls: int, int8: bool = False) -> None:
    """The interleaved rounds and their report (also `bench/speed.py --sdxl`); with int8 a third
    contender, diffuse with quantize="int8" (its share of the floor counted on the bf16 run's FLOPs)."""
    sdxl_folder()  # built once, before the processes that read it
    peaks = dense_peaks()
    runs: dict[str, list[dict]] = {"diffusers": [], "diffuse": []} | ({"diffuse-int8": []} if int8 else {})
    for round_ in range(rounds):
        for impl in runs:
            runs[impl].append(run_contender(impl, calls, flops=round_ == 0 and impl != "diffuse-int8"))
            print(f"  round {round_ + 1} {impl} done", file=sys.stderr)
    report(peaks, runs)
    (CACHE / "sdxl-results.json").write_text(json.dumps({"peaks_gflops": peaks, "runs": runs}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per contender (default 2)")
    parser.add_argument("--calls", type=int, default=2, help="timed calls of each network per process (default 2)")
    parser.add_argument("--contender", choices=("diffuse", "diffusers", "diffuse-int8"), help=argparse.SUPPRESS)
    parser.add_argument("--int8", action="store_true", help='also diffuse with quantize="int8"')
    parser.add_argument("--flops", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tiles", type=int, metavar="SIZE", help="time the tiled VAE decode at SIZE instead")
    parser.add_argument("--tile", type=int, default=40, help="with --tiles: tile side in latent pixels")
    parser.add_argument("--overlap", type=int, default=16, help="with --tiles: overlap in latent pixels")
    args = parser.parse_args()
    if args.tiles:
        tiles(args.tiles, args.tile, args.overlap)
        return
    if args.contender:
        print(json.dumps(contender(args.contender, args.calls, args.flops)))
        return
    run(args.rounds, args.calls, args.int8)


if __name__ == "__main__":
    main()
