"""The `diffuse` command line: txt2img, img2img, inpaint, illustrate, convert, pnginfo, regenerate, info, and
for diffuse's own model: train, assemble (three trained stages -> the model folder), eval (measure a model)
and data (fetch a training world's pinned pictures)."""

from __future__ import annotations

import argparse
import re
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from diffuse.pipeline import Pipeline, Result, Step
from diffuse.preflight import Checked, check_generation_args
from diffuse.regenerate import add_addon_options, add_quantize_option
from diffuse.request import MAX_CONDITIONED_PIXELS, GenerationRequest, whole_pixels

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "default"
DEFAULT_EMOJI_JUDGE = DEFAULT_MODEL.parent / "emoji-judge"
DEFAULT_EMOJI_DATA = "runs/emoji-data"  # where configs/emoji's recipes read the pictures


def _count(module: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.1f}M"


def info(args: argparse.Namespace) -> int:
    """Load a checkpoint, print what was detected, and run each network once on a small input."""
    pipe = _load(args)
    cfg = pipe.config
    if cfg.text_encoder is not None:  # an SDXL refiner reads bigG alone
        print(
            f"  text encoder  {_count(pipe.text_encoder):>7}  width {cfg.text_encoder.width}, "
            f"{cfg.text_encoder.layers} layers, {cfg.text_encoder.activation}, pad id {cfg.pad_token_id}"
        )
    if cfg.text_encoder_2 is not None:
        second = cfg.text_encoder_2
        print(
            f"  text encoder 2 {_count(pipe.text_encoder_2):>6}  width {second.width}, {second.layers} layers, "
            f"{second.activation}, pooled projection {second.projection_dim}, pad id {cfg.pad_token_id_2}"
        )
    inpainting = " (inpainting: latents, mask, masked image)" if cfg.unet.in_channels == 9 else ""
    print(
        f"  unet          {_count(pipe.unet):>7}  {cfg.unet.in_channels} in-channels{inpainting}, model channels "
        f"{cfg.unet.model_channels} x {cfg.unet.channel_mult}, context {cfg.unet.context_dim}, {cfg.prediction_type}"
    )
    print(
        f"  vae           {_count(pipe.vae):>7}  {cfg.vae.latent_channels} latent channels, "
        f"f={cfg.vae.downsample_factor}, scale {cfg.vae.scaling_factor}"
    )

    start = time.perf_counter()
    with torch.no_grad():
        side = 64 // cfg.vae.downsample_factor
        latents = torch.randn(1, cfg.unet.in_channels, side, side, generator=torch.Generator().manual_seed(0))
        context, y = pipe.unet_conditioning(args.prompt, width=64, height=64)
        y = None if y is None else y.to(pipe.dtype)
        noise = pipe.unet(latents.to(pipe.dtype), torch.tensor([500]), context, y)
        image = pipe.vae.decode(latents[:, : cfg.vae.latent_channels].to(pipe.dtype))
    print(
        f"  one pass: context {tuple(context.shape)}, noise prediction {tuple(noise.shape)}, "
        f"decoded image {tuple(image.shape)} in {time.perf_counter() - start:.2f} s"
    )
    return 0


def _load(args: argparse.Namespace, model: str | None = None) -> Pipeline:
    """The model `args.model` names (or `model`, e.g. the refiner), with the run's dtype, quantization,
    device and add-on folders."""
    from diffuse.loader import load_pipeline

    model = model or args.model
    if model is None:
        if not DEFAULT_MODEL.exists():
            raise ValueError(
                f"no --model given, and the default model ({DEFAULT_MODEL}) is not in this checkout; "
                "pass --model PATH (a diffusers folder, .safetensors or .ckpt)"
            )
        model = DEFAULT_MODEL
    quantize = getattr(args, "quantize", None)  # convert: never (it writes the weights as loaded)
    start = time.perf_counter()
    pipe = load_pipeline(
        model,
        dtype=args.dtype,
        device=getattr(args, "device", "cpu"),  # convert: always the CPU
        lora_dirs=getattr(args, "lora_dir", []),
        embedding_dirs=getattr(args, "embeddings_dir", []),
        quantize=quantize,
    )
    how = str(pipe.dtype) if quantize is None else f"{pipe.dtype}, {quantize}"
    print(f"{pipe.source}: loaded in {time.perf_counter() - start:.1f} s ({how})", file=sys.stderr)
    return pipe


DEFAULT_REFINER_SWITCH_AT = 0.8  # A1111's "Refiner switch at" default
DEVICE_HELP = "where the networks run: cpu (default), cuda, cuda:N or mps; seeds give the same noise on any"
AUTO_DTYPE_HELP = (
    "auto (default: bfloat16 where the CPU computes it natively, else float32), float32 (exact), bfloat16 or float16"
)


def _speedups(args: argparse.Namespace):
    from diffuse.speedups import Speedups

    return Speedups(
        guidance_cutoff=args.guidance_cutoff,
        deep_cache_interval=args.deep_cache,
        deep_cache_depth=args.deep_cache_depth,
        token_merging=args.token_merging,
    )


def _add_speedup_options(p: argparse.ArgumentParser) -> None:
    speed = p.add_argument_group("optional speed-ups (off by default; they change the image a little)")
    speed.add_argument(
        "--guidance-cutoff",
        type=float,
        default=1.0,
        metavar="F",
        help="guide only the first fraction F of the steps; later steps cost half (default 1)",
    )
    speed.add_argument(
        "--deep-cache",
        type=_positive_int,
        default=1,
        metavar="N",
        help="run the UNet's deep blocks only every N-th call, reusing their features (default 1: off)",
    )
    speed.add_argument(
        "--deep-cache-depth",
        type=_positive_int,
        default=1,
        metavar="D",
        help="shallow blocks that still run on the cached calls (default 1)",
    )
    speed.add_argument(
        "--token-merging",
        type=float,
        default=0.0,
        metavar="R",
        help="merge the fraction R (up to 0.75) of the full-resolution positions before "
        "self-attention (default 0: off)",
    )


def generate(args: argparse.Namespace) -> int:
    """txt2img / img2img / inpaint: generate, show progress, write PNGs that carry their parameters."""
    from diffuse.metadata import numbered_path, save_png

    checked = check_generation_args(args)  # before the model loads: a bad option costs no loading time
    _check_addon_folders(args)
    switch_at = _check_refiner_args(args)
    pipe = _load(args)
    refiner = None if args.refiner is None else _load(args, args.refiner)
    request = _generation_request(args, checked, switch_at)
    for batch in range(args.n_iter):
        result = _draw_batch(pipe, request, args, batch, refiner)
        for image, image_seed, text in zip(result.images, result.seeds, result.infotexts):
            # overwrite=False: a second process writing the same number gets an error, not our file
            print(save_png(image, numbered_path(args.out, image_seed), text, overwrite=False))
        request = replace(request, seed=result.seeds[-1] + 1)  # the next batch continues the seeds, as A1111 does
    return 0


def _check_addon_folders(args: argparse.Namespace) -> None:
    """A misspelt add-on folder fails before the model loads, not as "unknown LoRA" after."""
    for flag, folders in (("--lora-dir", args.lora_dir), ("--embeddings-dir", args.embeddings_dir)):
        for folder in folders:
            if not Path(folder).expanduser().is_dir():
                raise ValueError(f"{flag} {folder} is not a folder")


def _check_refiner_args(args: argparse.Namespace) -> float | None:
    """--refiner and --refiner-switch-at, before any model loads: the switch point for the request
    (A1111's default 0.8 when only --refiner is given), None without a refiner."""
    if args.refiner is None:
        if args.refiner_switch_at is not None:
            raise ValueError("--refiner-switch-at needs --refiner, the model that takes over")
        return None
    if not Path(args.refiner).expanduser().exists():
        raise ValueError(f"--refiner {args.refiner}: no such file or folder")
    switch_at = DEFAULT_REFINER_SWITCH_AT if args.refiner_switch_at is None else args.refiner_switch_at
    if not 0 < switch_at < 1:
        raise ValueError(f"--refiner-switch-at must be a fraction of the steps above 0 and below 1, got {switch_at}")
    return switch_at


def _generation_request(
    args: argparse.Namespace, checked: Checked, refiner_switch_at: float | None = None
) -> GenerationRequest:
    """The command line as one request: the seed resolved and the images opened by the preflight checks."""
    return GenerationRequest(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        width=args.width,
        height=args.height,
        steps=args.steps,
        guidance_scale=args.cfg_scale,
        sampler=args.sampler,
        schedule_type=args.schedule_type,
        seed=checked.seed,
        batch_size=args.batch_size,
        clip_skip=args.clip_skip,
        eta=args.eta,
        speedups=checked.speedups,
        image=checked.image,
        mask=checked.mask,
        strength=getattr(args, "strength", None),
        keep_unmasked=not getattr(args, "no_keep_unmasked", False),
        refiner_switch_at=refiner_switch_at,
        crop_top=args.crop_top,
        crop_left=args.crop_left,
        negative_original_size=args.negative_original_size,
        negative_target_size=args.negative_target_size,
        negative_crop=args.negative_crop,
    )


def _draw_batch(
    pipe: Pipeline, request: GenerationRequest, args: argparse.Namespace, batch: int, refiner: Pipeline | None = None
) -> Result:
    """One batch of the request, with a progress bar and, with --save-steps, every step's image;
    `refiner` takes over at the request's refiner_switch_at."""
    from tqdm import tqdm

    from diffuse.preview import StepRecorder, to_pil

    recorder = None
    if args.save_steps:
        folder = Path(args.save_steps) / (f"batch{batch + 1}" if args.n_iter > 1 else "")
        recorder = StepRecorder(folder, decode=lambda latents: to_pil(pipe.decode_latents(latents)))
    bar = None  # created at the first step, so a rejected request prints no empty bar

    def on_step(step: Step) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=step.total, desc=f"{args.command} {batch + 1}/{args.n_iter}", unit="step", file=sys.stderr)
        bar.update(1)
        if recorder is not None:
            recorder(step.index, step.timestep, step.latents)

    try:
        result = pipe.generate(request, callback=on_step, refiner=refiner)
    finally:
        if bar is not None:  # closed before an error is printed, so the message gets its own line
            bar.close()
    if recorder is not None:
        print(f"steps: {recorder.finish()}")
    return result


def illustrate(args: argparse.Namespace) -> int:
    """Generate once with every part recorded and write the figures of "The Illustrated Stable
    Diffusion" for this run: OUT/index.html (opens offline) and OUT/report.json."""
    from diffuse.illustrate.report import illustrate as illustrate_run

    seed, out = _check_illustrate_args(args)  # before the model loads
    _check_addon_folders(args)
    pipe = _load(args)
    report = illustrate_run(
        pipe,
        args.prompt,
        out=out,
        seed=seed,
        steps=args.steps,
        sampler=args.sampler,
        cfg_scale=args.cfg_scale,
        negative_prompt=args.negative_prompt,
        width=args.width,
        height=args.height,
        overwrite=args.overwrite,
    )
    for entry in report.errors:
        print(f"diffuse illustrate: the {entry['kind']} figure failed: {entry['error']}", file=sys.stderr)
    timings = report.report["timings"]
    print(
        f"{len(report.figures)} figures in {timings['report']:.1f} s (the run {timings['record']:.1f} s)",
        file=sys.stderr,
    )
    print(report.folder / "index.html")
    return 1 if report.errors else 0


def _check_illustrate_args(args: argparse.Namespace) -> tuple[int, Path]:
    """Every illustrate option that needs no model, one line naming the first bad one: the seed
    (-1 picked now) and the folder the report goes to."""
    from diffuse import inputs
    from diffuse.illustrate.report import check_out
    from diffuse.runtime import resolve_device, resolve_dtype
    from diffuse.samplers import get_sampler

    inputs.prompt_list(args.prompt, "prompt")
    inputs.prompt_list(args.negative_prompt, "negative prompt (-n)")
    if args.steps is not None:
        inputs.check_steps(args.steps, "--steps")
    if args.cfg_scale is not None:
        inputs.check_number("--cfg-scale", args.cfg_scale, 0.0, 100.0)
    for name, value in (("-W/--width", args.width), ("-H/--height", args.height)):
        if value is not None:
            inputs.check_side(name, value)
    if args.sampler is not None:
        get_sampler(args.sampler)
    try:
        seed = inputs.resolve_seed(args.seed)
        resolve_dtype(args.dtype, resolve_device(args.device))
    except ValueError as e:
        raise ValueError(f"--seed/--dtype/--device: {e}") from None
    out = Path(args.out) if args.out is not None else Path("outputs", "illustrated", f"{seed}-{_slug(args.prompt)}")
    inputs.check_output_folder(out, "--out")
    check_out(out, args.overwrite)
    return seed, out


def _slug(prompt: str, length: int = 48) -> str:
    """A folder name from a prompt: lower-case letters and digits joined by dashes."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:length].rstrip("-") or "prompt"


def convert(args: argparse.Namespace) -> int:
    """Write any loadable checkpoint as a diffusers folder, or as one original-layout file when the
    output ends in .safetensors or .ckpt (optionally cast, e.g. to float16)."""
    from diffuse.checkpoints import export
    from diffuse.runtime import resolve_dtype

    pipe = _load(args)
    dtype = resolve_dtype(args.dtype) if args.dtype else None
    one_file = Path(args.out).suffix.lower() in export.SINGLE_FILE_FORMATS
    save = export.save_single_file_checkpoint if one_file else export.save_diffusers_folder
    print(save(pipe, args.out, dtype=dtype, overwrite=args.overwrite))
    return 0


def assemble(args: argparse.Namespace) -> int:
    """Build the model folder from the finished vae, clip and unet stages."""
    from diffuse.runtime import resolve_dtype
    from diffuse.train.assemble import AssemblyWarning
    from diffuse.train.assemble import assemble as assemble_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AssemblyWarning)
        try:
            folder = assemble_model(
                args.vae, args.clip, args.unet, args.out, dtype=resolve_dtype(args.dtype), overwrite=args.overwrite
            )
        finally:
            for warning in caught:
                print(f"diffuse assemble: warning: {warning.message}", file=sys.stderr)
    print(folder)
    return 0


def unpack(args: argparse.Namespace) -> int:
    """Write a model folder's VAE, text encoder and UNet as finished training stages (to train them further)."""
    from diffuse.train.unpack import unpack as unpack_model

    for component, folder in unpack_model(args.model, args.out).items():
        print(f"{component}: {folder}")
    return 0


def serve(args: argparse.Namespace) -> int:
    """The A1111-compatible HTTP API and the web page."""
    from diffuse.server.serve import serve as run_server

    if args.model is None:
        if not DEFAULT_MODEL.exists():
            raise ValueError(f"no --model given, and the default model ({DEFAULT_MODEL}) is not in this checkout")
        args.model = str(DEFAULT_MODEL)
    return run_server(args)


def evaluate(args: argparse.Namespace) -> int:
    """Measure a model: prompt adherence on held-out prompts, VAE PSNR, caption retrieval, speed."""
    from diffuse.shapes.evaluate import EvalSettings, format_report, write_report
    from diffuse.shapes.evaluate import evaluate as evaluate_model

    for option, path in (("--json", args.json), ("--grid", args.grid)):
        if path is not None and Path(path).is_dir():
            raise ValueError(f"{option} {path} is a folder; give the file to write")
    if args.grid is not None and args.world != "emoji":
        raise ValueError("--grid draws the emoji world's evaluation: give --world emoji")
    if args.world == "emoji":
        return evaluate_emoji(args)
    settings = EvalSettings(
        singles=EvalSettings.singles if args.singles is None else args.singles,
        pairs=EvalSettings.pairs if args.pairs is None else args.pairs,
        images=args.images,
        steps=args.steps,
        sampler=args.sampler,
        cfg_scale=args.cfg_scale,
        seed=args.seed,
        scene_seed=args.scene_seed,
        batch_size=args.batch_size,
        speedups=_speedups(args),
    )
    pipe = _load(args)
    results = evaluate_model(pipe, settings, progress=True)
    print(format_report(results))
    if args.json is not None:
        print(f"wrote {write_report(results, args.json)}", file=sys.stderr)
    return 0


def evaluate_emoji(args: argparse.Namespace) -> int:
    """The emoji world's held-out prompts (per evaluated category), read back by the judge."""
    from diffuse.emoji.data import EmojiDataConfig, EmojiDataset
    from diffuse.emoji.evaluate import EvalSettings, format_report, write_report
    from diffuse.emoji.evaluate import evaluate as evaluate_model
    from diffuse.emoji.grid import example_grid
    from diffuse.emoji.judge import EmojiJudge
    from diffuse.speedups import Speedups

    if _speedups(args) != Speedups():
        raise ValueError("--world emoji measures the model as it runs by default: leave out the speed-up options")
    settings = EvalSettings(
        singles=EvalSettings.singles if args.singles is None else args.singles,
        pairs=EvalSettings.pairs if args.pairs is None else args.pairs,
        steps=args.steps,
        sampler=args.sampler,
        cfg_scale=args.cfg_scale,
        seed=args.seed,
        scene_seed=args.scene_seed,
    )
    dataset = EmojiDataset(EmojiDataConfig(folder=args.data))
    judge = EmojiJudge.load(args.judge, names=list(dataset.pictures.emoji))  # the same names, in order
    pipe = _load(args)
    images: list = []
    results = evaluate_model(pipe, dataset, judge, settings, progress=True, images=images)
    print(format_report(results))
    if args.json is not None:
        print(f"wrote {write_report(results, args.json)}", file=sys.stderr)
    if args.grid is not None:
        print(f"wrote {example_grid(results, images, args.grid, args.grid_columns)}", file=sys.stderr)
    return 0


def data(args: argparse.Namespace) -> int:
    """Fetch, check and unpack a pinned picture set into a data folder (the emoji world's pictures)."""
    from diffuse.emoji.source import PIN, make_data_folder

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    start = time.perf_counter()
    folder = make_data_folder(args.out, tarball=args.tarball, overwrite=args.overwrite, log=log)
    source = f"{PIN.package} {PIN.version}"
    if folder.already_there:
        print(f"{folder.path}: already there ({folder.pictures} pictures, {source})")
    else:
        print(f"wrote {folder.path}: {folder.pictures} pictures ({source}) in {time.perf_counter() - start:.1f} s")
    return 0


def pnginfo(args: argparse.Namespace) -> int:
    """Print the generation parameters a PNG carries."""
    from diffuse.metadata import read_parameters

    text = read_parameters(args.image)
    if text is None:
        print(f"{args.image}: no generation parameters in this image", file=sys.stderr)
        return 1
    print(text)
    return 0


def regenerate(args: argparse.Namespace) -> int:
    """Make an image again from its PNG's parameters; --check compares the pixels."""
    from diffuse.regenerate import run

    return run(args, DEFAULT_MODEL)


def _int_at_least(text: str, minimum: int) -> int:
    value = int(text)
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {minimum} or more, got {value}")
    return value


# argparse names the type function in its "invalid ... value" message, so each bound gets a named one.
def _positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def _non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _pixels(text: str, low: int) -> int:
    value = int(text)
    if not whole_pixels(value, low):
        raise argparse.ArgumentTypeError(f"must be from {low} to {MAX_CONDITIONED_PIXELS} pixels, got {value}")
    return value


def _crop_pixels(text: str) -> int:
    return _pixels(text, 0)


def _size_pair(text: str) -> tuple[int, int]:
    """ "WxH" -> (width, height), as "Size" is written."""
    match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"must be WIDTHxHEIGHT in pixels, e.g. 512x512, got {text!r}")
    return _pixels(match.group(1), 1), _pixels(match.group(2), 1)


def _crop_pair(text: str) -> tuple[int, int]:
    """ "TOP,LEFT" -> (top, left)."""
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"must be TOP,LEFT in pixels, e.g. 0,256, got {text!r}")
    return _crop_pixels(parts[0]), _crop_pixels(parts[1])


def _add_size_conditioning_options(p: argparse.ArgumentParser) -> None:
    sizes = p.add_argument_group("SDXL size conditioning (what the model is told of its training image)")
    sizes.add_argument(
        "--crop-top", type=_crop_pixels, default=0, metavar="N", help="the crop's top edge (default 0: uncropped)"
    )
    sizes.add_argument(
        "--crop-left", type=_crop_pixels, default=0, metavar="N", help="the crop's left edge (default 0: uncropped)"
    )
    sizes.add_argument(
        "--negative-original-size",
        type=_size_pair,
        default=None,
        metavar="WxH",
        help="the original size the negative prompt is conditioned on (default: the image's size)",
    )
    sizes.add_argument(
        "--negative-target-size",
        type=_size_pair,
        default=None,
        metavar="WxH",
        help="the target size the negative prompt is conditioned on (default: the image's size)",
    )
    sizes.add_argument(
        "--negative-crop",
        type=_crop_pair,
        default=None,
        metavar="TOP,LEFT",
        help="the crop the negative prompt is conditioned on (default: --crop-top, --crop-left)",
    )


def _add_generation_options(p: argparse.ArgumentParser, kind: str) -> None:
    p.add_argument("prompt", help="what to draw; (word:1.3) and [word] weights and BREAK work as in A1111")
    if kind != "txt2img":
        p.add_argument("--image", required=True, help="the input image (PNG, JPEG, ...)")
    if kind == "inpaint":
        p.add_argument("--mask", required=True, help="mask image, same size as --image: white = repaint")
        p.add_argument(
            "--no-keep-unmasked", action="store_true", help="do not paste the original pixels back outside the mask"
        )
    p.add_argument("-n", "--negative-prompt", default="", help="what to steer away from")
    p.add_argument("--model", default=None, help="diffusers folder, .safetensors or .ckpt (default: the shipped model)")
    p.add_argument(
        "-W",
        "--width",
        type=int,
        default=None,
        help="pixels, a multiple of 8 (default: the model's native size, e.g. 512 for SD 1.x; "
        "img2img/inpaint: the image's size)",
    )
    p.add_argument("-H", "--height", type=int, default=None, help="pixels, a multiple of 8")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    p.add_argument("--cfg-scale", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--sampler", default="DPM++ 2M Karras", help='A1111 name, e.g. "Euler a", "DDIM", "UniPC"')
    p.add_argument("--schedule-type", default=None, help='"Automatic" (default), "Karras" or "Exponential"')
    p.add_argument(
        "--eta", type=float, default=None, help="DDIM's eta, or the fresh-noise share of ancestral/SDE samplers (0..1)"
    )
    p.add_argument("--seed", type=int, default=-1, help="-1 (default) picks one; image i of a batch uses seed + i")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="images per batch")
    p.add_argument("--n-iter", type=_positive_int, default=1, help="number of batches")
    p.add_argument("--clip-skip", type=int, default=1, help="use the text encoder's n-th last layer (default 1)")
    if kind != "txt2img":
        p.add_argument(
            "--strength",
            type=float,
            default=0.75 if kind == "img2img" else 1.0,
            help="how much to change the image, 0..1",
        )
    p.add_argument(
        "--refiner",
        metavar="MODEL",
        default=None,
        help="an SDXL refiner (diffusers folder, .safetensors or .ckpt) that takes over from the SDXL model "
        "for the last steps",
    )
    p.add_argument(
        "--refiner-switch-at",
        type=float,
        metavar="F",
        default=None,
        help=f"the fraction of the denoising after which --refiner takes over (default {DEFAULT_REFINER_SWITCH_AT})",
    )
    p.add_argument("--out", default="outputs", help="output folder (default ./outputs)")
    p.add_argument(
        "--save-steps",
        metavar="DIR",
        default=None,
        help="also write every step's decoded latents and a filmstrip.png here",
    )
    p.add_argument("--dtype", default="auto", help=AUTO_DTYPE_HELP)
    add_quantize_option(p)
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    add_addon_options(p)
    _add_size_conditioning_options(p)
    _add_speedup_options(p)
    p.set_defaults(run=generate)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from diffuse.train.__main__ import main_train

        return main_train(argv[1:])
    args = build_parser().parse_args(argv)

    from diffuse.checkpoints.errors import CheckpointError

    try:
        return args.run(args)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"diffuse: error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffuse", description="Stable Diffusion from its parts.")
    commands = parser.add_subparsers(dest="command", required=True)
    for kind, text in (
        ("txt2img", "generate images from a prompt"),
        ("img2img", "repaint an image guided by a prompt"),
        ("inpaint", "repaint the masked part of an image"),
    ):
        _add_generation_options(commands.add_parser(kind, help=text), kind)
    _add_illustrate_command(commands)
    # Listed here for `diffuse --help`; its own options are parsed by the training entry point.
    commands.add_parser(
        "train", help="train vae | clip | unet (shapes dataset) or lora | embedding add-ons", add_help=False
    )
    _add_model_folder_commands(commands)
    _add_eval_command(commands)
    _add_data_command(commands)
    _add_serving_and_reading_commands(commands)
    return parser


def _add_illustrate_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "illustrate",
        help="generate once and write every figure of The Illustrated Stable Diffusion for this run (HTML + JSON)",
    )
    p.add_argument("prompt", help="what to draw")
    p.add_argument("-n", "--negative-prompt", default="", help="what to steer away from")
    p.add_argument("--model", default=None, help="diffusers folder, .safetensors or .ckpt (default: the shipped model)")
    p.add_argument("--seed", type=int, default=0, help="the noise's seed (default 0; -1 picks one)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--sampler", default=None, help='A1111 name, e.g. "Euler a" (default: the model\'s)')
    p.add_argument(
        "--cfg-scale", type=float, default=None, help="classifier-free guidance scale (default: the model's)"
    )
    p.add_argument("-W", "--width", type=int, default=None, help="pixels, a multiple of 8 (default: the model's size)")
    p.add_argument("-H", "--height", type=int, default=None, help="pixels, a multiple of 8")
    p.add_argument(
        "--out", default=None, metavar="DIR", help="the report's folder (default outputs/illustrated/SEED-PROMPT)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out that is not a previous report")
    p.add_argument("--dtype", default="auto", help=AUTO_DTYPE_HELP)
    add_quantize_option(p)
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    add_addon_options(p)
    p.set_defaults(run=illustrate)


def _add_model_folder_commands(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("convert", help="write a checkpoint as a diffusers folder or an original single file")
    p.add_argument("model", help="a diffusers folder, or a single-file .safetensors/.ckpt")
    p.add_argument("out", help="the folder to write, or a .safetensors/.ckpt file (the original single-file layout)")
    p.add_argument("--dtype", default=None, help="cast the weights: float16, bfloat16 or float32")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty folder")
    p.set_defaults(run=convert)
    p = commands.add_parser("assemble", help="build a model folder from the finished vae, clip and unet stages")
    p.add_argument("--vae", required=True, help="the finished VAE stage's folder (e.g. runs/vae)")
    p.add_argument("--clip", required=True, help="the finished CLIP stage's folder (e.g. runs/clip)")
    p.add_argument("--unet", required=True, help="the finished UNet stage's folder (e.g. runs/unet)")
    p.add_argument("--out", required=True, help="the model folder to write (e.g. models/default)")
    p.add_argument("--dtype", default="float16", help="weights as written: float16 (default), bfloat16 or float32")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty folder")
    p.set_defaults(run=assemble)
    p = commands.add_parser(
        "unpack", help="write a model folder's parts as finished stages, to train them further (a stage's init_from)"
    )
    p.add_argument("model", help="a diffusers model folder (e.g. models/default)")
    p.add_argument("--out", required=True, help="where the stages go: OUT/vae, OUT/clip, OUT/unet")
    p.set_defaults(run=unpack)


def _add_eval_command(commands: argparse._SubParsersAction) -> None:
    from diffuse.shapes.evaluate import EvalSettings

    p = commands.add_parser(
        "eval", help="measure a model: held-out prompt adherence, VAE PSNR, caption retrieval, generation time"
    )
    p.add_argument("--model", default=None, help="a model folder or file (default: the shipped model)")
    p.add_argument(
        "--world",
        choices=("shapes", "emoji"),
        default="shapes",
        help="the world the model was trained on (default shapes); emoji reads its images with --judge",
    )
    p.add_argument(
        "--data",
        default=DEFAULT_EMOJI_DATA,
        help=f"emoji: the data folder `diffuse data emoji` wrote (default {DEFAULT_EMOJI_DATA})",
    )
    p.add_argument(
        "--judge",
        default=str(DEFAULT_EMOJI_JUDGE),
        help="emoji: the trained judge's folder (default models/emoji-judge, where its card trains it)",
    )
    p.add_argument(
        "--singles",
        type=_non_negative_int,
        default=None,
        help=f"held-out one-object prompts (default {EvalSettings.singles}; emoji: 25 per category)",
    )
    p.add_argument(
        "--pairs",
        type=_non_negative_int,
        default=None,
        help=f"held-out two-object prompts (default {EvalSettings.pairs}; emoji: 25 per category)",
    )
    p.add_argument(
        "--images",
        type=_positive_int,
        default=EvalSettings.images,
        help=f"rendered images for the VAE's PSNR and caption retrieval (default {EvalSettings.images})",
    )
    p.add_argument(
        "--steps", type=_positive_int, default=EvalSettings.steps, help=f"sampling steps (default {EvalSettings.steps})"
    )
    p.add_argument(
        "--sampler", default=EvalSettings.sampler, help=f"A1111 sampler name (default {EvalSettings.sampler!r})"
    )
    p.add_argument(
        "--cfg-scale",
        type=float,
        default=EvalSettings.cfg_scale,
        help=f"classifier-free guidance scale (default {EvalSettings.cfg_scale})",
    )
    p.add_argument(
        "--seed",
        type=_non_negative_int,
        default=EvalSettings.seed,
        help=f"prompt i is drawn with seed + i (default {EvalSettings.seed})",
    )
    p.add_argument(
        "--scene-seed",
        type=_non_negative_int,
        default=EvalSettings.scene_seed,
        help="the held-out scenes' seed: 0 (the default) is the test set the model card reports; "
        "choose settings such as --cfg-scale on another",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=EvalSettings.batch_size,
        help=f"prompts per generation call, for speed only (default {EvalSettings.batch_size})",
    )
    p.add_argument(
        "--dtype",
        default=None,
        help="float32 (default: the exact path the model card's figures use), auto, bfloat16 or float16",
    )
    add_quantize_option(p)
    p.add_argument("--json", default=None, metavar="OUT", help="also write every number and the settings here")
    p.add_argument(
        "--grid",
        default=None,
        metavar="PNG",
        help="emoji: also draw the first images of each category and kind, with what the judge read, into PNG",
    )
    p.add_argument(
        "--grid-columns",
        type=_positive_int,
        default=6,
        help="emoji: images per category and kind in --grid (default 6)",
    )
    _add_speedup_options(p)
    p.set_defaults(run=evaluate)


def _add_data_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("data", help="fetch a training world's pictures at their pinned version (emoji)")
    kinds = p.add_subparsers(dest="kind", required=True)
    p = kinds.add_parser(
        "emoji",
        help="the Noto emoji pictures and names (npm emoji-datasource-google, pinned), checked and unpacked",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="the data folder to write (e.g. data/emoji)")
    p.add_argument(
        "--tarball",
        default=None,
        metavar="FILE",
        help="a local copy of the pinned package tarball instead of the download (checked the same way)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing data folder of another version or a damaged one"
    )
    p.set_defaults(run=data)


def _add_serving_and_reading_commands(commands: argparse._SubParsersAction) -> None:
    from diffuse.regenerate import add_regenerate_options
    from diffuse.server.serve import add_serve_options

    p = commands.add_parser("serve", help="serve the A1111-compatible HTTP API and the web page")
    p.add_argument("--model", default=None, help="the model to load (default: the shipped model)")
    add_serve_options(p)
    p.set_defaults(run=serve)
    p = commands.add_parser("pnginfo", help="print the generation parameters stored in a PNG")
    p.add_argument("image")
    p.set_defaults(run=pnginfo)
    p = commands.add_parser(
        "regenerate", help="make an image again from its PNG's parameters (--check: compare the pixels)"
    )
    add_regenerate_options(p, DEVICE_HELP)
    p.set_defaults(run=regenerate)
    p = commands.add_parser("info", help="load a checkpoint and report its architecture")
    p.add_argument("model", nargs="?", default=None, help="a diffusers folder, or a single-file .safetensors/.ckpt")
    p.add_argument("--dtype", default="auto", help=AUTO_DTYPE_HELP)
    add_quantize_option(p)
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.add_argument("--prompt", default="a photo of a cat")
    p.set_defaults(run=info)


if __name__ == "__main__":
    sys.exit(main())
