"""The illustrated report: one recorded generation and every figure drawn from it, written as
DIR/report.json (the run's numbers) and DIR/index.html (the figures with their captions).

The page opens offline: it names its images by relative file names, carries its style inline
and loads no script, font or style from anywhere. The folder appears complete or not at all: it
is written beside `out` under a temporary name and renamed into place at the end.
"""

from __future__ import annotations

import json
import math
import platform
import secrets
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import torch
from matplotlib import pyplot

from diffuse.checkpoints.export import move_into_place
from diffuse.illustrate.figure import Figure
from diffuse.illustrate.record import record
from diffuse.illustrate.recording import Recording
from diffuse.pipeline import VERSION, Pipeline

# The order of "The Illustrated Stable Diffusion": what the parts are, the text's way in, the
# loop, the training that made it, then inside the networks.
KINDS = (
    "components",
    "tokens",
    "embeddings",
    "vector",
    "steps",
    "schedule",
    "forward_diffusion",
    "noise_prediction",
    "autoencoder",
    "attention",
    "guidance",
    "unet",
    "clip_similarity",
)
TITLES = {
    "components": "The three components",
    "tokens": "The tokenizer: the prompt as 77 token ids",
    "embeddings": "Token embeddings and the text encoder's output",
    "vector": "SDXL's vector conditioning: pooled text and sizes",
    "steps": "Every step, decoded",
    "schedule": "The noise schedule",
    "forward_diffusion": "Forward diffusion: noise added step by step",
    "noise_prediction": "The noise predictor's training example",
    "autoencoder": "The autoencoder: to latent space and back",
    "attention": "Cross-attention: where each word looks",
    "guidance": "Classifier-free guidance",
    "unet": "Inside the UNet",
    "clip_similarity": "CLIP: images and captions compared",
}
GENERATOR = "diffuse illustrate"  # report.json's mark: a folder carrying it may be replaced by a new report
IMAGE = "image.png"
TEMPLATES = Path(__file__).resolve().parent / "templates"

Maker = Callable[[Pipeline, Recording, Path], Figure]


@dataclass
class Report:
    """A written report: its folder, what report.json holds, and the figures drawn (a kind whose
    maker failed is in report["figures"] with its error and not here)."""

    folder: Path
    report: dict[str, Any]
    figures: list[Figure]

    @property
    def errors(self) -> list[dict[str, str]]:
        return [entry for entry in self.report["figures"] if "error" in entry]


def default_makers() -> dict[str, Maker]:
    """Every figure maker: the run's figures and the parts' figures."""
    from diffuse.illustrate.figures_parts import MAKERS as parts
    from diffuse.illustrate.figures_run import MAKERS as run

    return {**run, **parts}


def illustrate(
    pipe: Pipeline,
    prompt: str,
    *,
    out: str | Path,
    seed: int = 0,
    steps: int | None = None,
    sampler: str | None = None,
    cfg_scale: float | None = None,
    negative_prompt: str = "",
    width: int | None = None,
    height: int | None = None,
    kinds: Iterable[str] | None = None,
    overwrite: bool = False,
    makers: dict[str, Maker] | None = None,
) -> Report:
    """Generate `prompt` once with everything recorded and write the report of it into `out`.

    None settings are the model's defaults (diffuse.illustrate.record). `kinds` picks figures
    (default: all, in the order of KINDS); `makers` replaces the figure makers by kind. An
    existing non-empty `out` is replaced only when it holds a previous report, or with
    `overwrite`; either way only once the new report is complete."""
    out = Path(out).expanduser()
    makers = default_makers() if makers is None else makers
    chosen = choose_kinds(kinds, makers)
    check_out(out, overwrite)  # before the run: a refused folder costs no generation
    start = time.perf_counter()
    rec = record(
        pipe,
        prompt,
        negative_prompt=negative_prompt,
        seed=seed,
        steps=steps,
        sampler=sampler,
        cfg_scale=cfg_scale,
        width=width,
        height=height,
    )
    return write_report(
        pipe, rec, out, kinds=chosen, makers=makers, overwrite=overwrite, record_seconds=time.perf_counter() - start
    )


def choose_kinds(kinds: Iterable[str] | None, makers: dict[str, Maker]) -> list[str]:
    """The kinds asked for (None: every kind `makers` draws), in the report's order; ValueError for
    an unknown one or one without a maker."""
    asked = list(makers) if kinds is None else list(dict.fromkeys(kinds))
    unknown = [kind for kind in asked if kind not in KINDS]
    if unknown:
        raise ValueError(f"unknown figure kind {unknown[0]!r}; the kinds are {', '.join(KINDS)}")
    missing = [kind for kind in asked if kind not in makers]
    if missing:
        raise ValueError(f"no figure maker for kind {missing[0]!r}")
    return [kind for kind in KINDS if kind in asked]


def is_report(folder: Path) -> bool:
    """Whether `folder` holds a report this module wrote (its report.json carries GENERATOR)."""
    try:
        data = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("generator") == GENERATOR


def check_out(out: str | Path, overwrite: bool = False) -> None:
    """ValueError unless a report may be written at `out`: a new or empty folder, a previous
    report, or (with `overwrite`) any folder; checked, nothing created."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    if out.is_dir() and not overwrite and any(out.iterdir()) and not is_report(out):
        raise ValueError(f"{out} is not empty and holds no previous report; pass overwrite to replace it")


def write_report(
    pipe: Pipeline,
    rec: Recording,
    out: str | Path,
    *,
    kinds: Iterable[str] | None = None,
    makers: dict[str, Maker] | None = None,
    overwrite: bool = False,
    record_seconds: float | None = None,
) -> Report:
    """Draw every figure of `rec` and write the report folder `out` (see illustrate).

    A maker that raises costs only its own figure: its kind is listed with the error, in
    report.json and on the page, and the others are drawn."""
    out = Path(out).expanduser()
    makers = default_makers() if makers is None else makers
    chosen = choose_kinds(kinds, makers)
    check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.{secrets.token_hex(4)}.partial"
    staging.mkdir()
    try:
        start = time.perf_counter()
        rec.image.save(staging / IMAGE)
        entries, figures, seconds = draw_figures(pipe, rec, staging, chosen, makers)
        timings = {**rec.timings, "figures": seconds, "figures_total": time.perf_counter() - start}
        if record_seconds is not None:
            timings["record"] = record_seconds
            timings["report"] = record_seconds + timings["figures_total"]
        report = plain(report_dict(pipe, rec, entries, timings))
        text = json.dumps(report, indent=1, allow_nan=False)
        (staging / "report.json").write_text(text + "\n", encoding="utf-8")
        (staging / "index.html").write_text(render_html(report), encoding="utf-8")
        move_into_place(staging, out, overwrite or is_report(out))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Report(folder=out, report=report, figures=figures)


def draw_figures(
    pipe: Pipeline, rec: Recording, folder: Path, kinds: list[str], makers: dict[str, Maker]
) -> tuple[list[dict[str, Any]], list[Figure], dict[str, float]]:
    """Run each kind's maker into `folder`: report.json's entries, the figures, each one's seconds."""
    entries, figures, seconds = [], [], {}
    for kind in kinds:
        start = time.perf_counter()
        try:
            figure = makers[kind](pipe, rec, folder)
            check_figure(figure, kind, folder)
        except Exception as e:  # one figure's failure is reported with it, and the others still drawn
            pyplot.close("all")  # a plot the maker left half drawn
            entries.append({"kind": kind, "error": f"{type(e).__name__}: {e}"})
        else:
            entries.append(figure.as_json())
            figures.append(figure)
        seconds[kind] = time.perf_counter() - start
    return entries, figures, seconds


def check_figure(figure: Figure, kind: str, folder: Path) -> None:
    """What a maker returned is the figure of its kind, with a caption and a file in the report's folder."""
    if not isinstance(figure, Figure):
        raise TypeError(f"the maker returned {type(figure).__name__}, not a Figure")
    if figure.kind != kind:
        raise ValueError(f"the maker of {kind!r} returned a figure of kind {figure.kind!r}")
    if not figure.caption.strip():
        raise ValueError("the figure has no caption")
    path = folder / figure.file
    if Path(figure.file).is_absolute() or ".." in Path(figure.file).parts or not path.is_file():
        raise ValueError(f"the figure's file {figure.file!r} is not a file in the report's folder")


def report_dict(pipe: Pipeline, rec: Recording, entries: list[dict[str, Any]], timings: dict) -> dict[str, Any]:
    """report.json: the issue's keys (prompt, seed, model, image, figures, attention) and the run's settings."""
    return {
        "prompt": rec.prompt,
        "seed": rec.seed,
        "model": rec.model,
        "image": IMAGE,
        "figures": entries,
        "attention": attention_dict(rec),
        "negative_prompt": rec.negative_prompt,
        "settings": {
            "steps": rec.steps,
            "sampler": rec.sampler,
            "cfg_scale": rec.cfg_scale,
            "width": rec.width,
            "height": rec.height,
            "dtype": str(pipe.dtype).removeprefix("torch."),
            "device": str(pipe.device),
            "threads": torch.get_num_threads(),
        },
        "shapes": rec.shapes,
        "timings": timings,
        "versions": {"diffuse": VERSION, "torch": torch.__version__, "python": platform.python_version()},
        "generator": GENERATOR,
    }


def attention_dict(rec: Recording) -> dict[str, Any] | None:
    """Each prompt token's cross-attention map at latent resolution (None: attention was not recorded)."""
    attention = rec.attention
    if attention is None:
        return None
    return {
        "tokens": list(attention.tokens),
        "positions": list(attention.positions),
        "maps": [[[round(float(v), 6) for v in row] for row in token_map] for token_map in attention.maps.tolist()],
        "layers": attention.layers,
        "steps": attention.steps,
    }


def plain(value: Any) -> Any:
    """`value` as JSON holds it: tensors and arrays as lists, paths as text, a non-finite number as null."""
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, torch.Tensor):
        return plain(value.detach().cpu().tolist())
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy arrays and scalars
        return plain(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def render_html(report: dict[str, Any]) -> str:
    """index.html for a report dict (report.json's content) through the Jinja2 template."""
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    environment.filters["number"] = _format_number
    environment.filters["seconds"] = lambda value: f"{value:.2f} s"
    sections = [
        {
            **entry,
            "title": TITLES.get(entry["kind"], entry["kind"]),
            "numbers": {key: value for key, value in entry.items() if _shown_number(key, value)},
        }
        for entry in report["figures"]
    ]
    return environment.get_template("report.html.j2").render(report=report, sections=sections)


def _shown_number(key: str, value: Any) -> bool:
    """A figure's numbers the page lists under it: the short ones (lists stay in report.json)."""
    if key in ("kind", "file", "caption", "error"):
        return False
    return isinstance(value, (int, float, str)) and len(str(value)) <= 80


def _format_number(value: Any) -> str:
    """Floats to four significant digits, the rest as they are."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
