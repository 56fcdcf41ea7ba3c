"""Watching the image emerge from noise: cheap latent previews, tensor → PIL, filmstrips.

A full VAE decode per sampling step is slow, so A1111's "Approx cheap" live preview
projects the 4 latent channels straight to RGB with a fixed 4×3 matrix: every latent
pixel becomes one (blurry, 8× smaller) image pixel. The matrix is only right for the VAE
it was fitted to (SD 1.x/2.x's); `fit_preview_matrix` fits one for any other VAE, and a
model folder can carry its own (Pipeline.preview_matrix, vae/latent_rgb.json).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from diffuse.metadata import save_png

# A1111's "Approx cheap" coefficients for SD 1.x/2.x latents (UNet scale, i.e. already
# multiplied by the VAE scaling factor 0.18215): row = latent channel, column = R, G, B,
# giving an image roughly in [-1, 1].
SD_LATENT_RGB = torch.tensor(
    [
        [0.298, 0.207, 0.208],
        [0.187, 0.286, 0.173],
        [-0.158, 0.189, 0.264],
        [-0.184, -0.271, -0.473],
    ]
)


def latents_to_rgb_cheap(latents: torch.Tensor, matrix: torch.Tensor | None = None) -> torch.Tensor:
    """Latents [B, C, h, w] → preview images [B, 3, h, w] in [0, 1], without the VAE.

    `matrix` is [C, 3], or [C + 1, 3] whose last row is a bias (as `fit_preview_matrix`
    returns); default: A1111's SD 1.x/2.x table.
    """
    if latents.ndim != 4:
        raise ValueError(f"latents must be [B, C, h, w], got shape {tuple(latents.shape)}")
    matrix = SD_LATENT_RGB if matrix is None else matrix
    channels = latents.shape[1]
    check_preview_matrix(matrix, channels)
    matrix = matrix.to(latents.device, latents.dtype)
    rgb = torch.einsum("bchw,cr->brhw", latents, matrix[:channels])
    if matrix.shape[0] == channels + 1:
        rgb = rgb + matrix[channels].view(1, 3, 1, 1)
    return (rgb * 0.5 + 0.5).clamp(0, 1)


def check_preview_matrix(matrix: torch.Tensor, channels: int) -> None:
    """Refuse a matrix that does not map `channels`-channel latents to RGB: [C, 3], or [C + 1, 3] with a bias row."""
    if matrix.ndim != 2 or matrix.shape[1] != 3 or matrix.shape[0] not in (channels, channels + 1):
        raise ValueError(
            f"preview matrix must be [{channels}, 3] or [{channels + 1}, 3] for {channels}-channel "
            f"latents, got {tuple(matrix.shape)}"
        )
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError("preview matrix holds a non-finite value")


def fit_preview_matrix(latents: torch.Tensor, images: torch.Tensor, bias: bool = True) -> torch.Tensor:
    """Least-squares latent → RGB matrix for `latents_to_rgb_cheap`, from examples of one VAE.

    latents: [B, C, h, w] in UNet scale; images: their VAE decodes [B, 3, H, W] in [-1, 1],
    H and W whole multiples of h and w (they are averaged down to the latent grid, since one
    latent pixel stands for a block of image pixels). Returns [C + 1, 3] (last row the bias)
    or [C, 3] with bias=False.
    """
    if latents.ndim != 4 or images.ndim != 4 or len(latents) != len(images) or images.shape[1] != 3:
        raise ValueError(
            f"need latents [B, C, h, w] and images [B, 3, H, W] with the same B, "
            f"got {tuple(latents.shape)} and {tuple(images.shape)}"
        )
    (h, w), (H, W) = latents.shape[2:], images.shape[2:]
    if H % h or W % w:
        raise ValueError(f"image size {H}x{W} is not a whole multiple of the latent size {h}x{w}")
    targets = torch.nn.functional.avg_pool2d(images.double(), kernel_size=(H // h, W // w))
    inputs = latents.double().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    targets = targets.permute(0, 2, 3, 1).reshape(-1, 3)
    if bias:
        inputs = torch.cat([inputs, torch.ones(len(inputs), 1, dtype=inputs.dtype, device=inputs.device)], dim=1)
    if len(inputs) < inputs.shape[1]:
        raise ValueError(f"{len(inputs)} latent pixels cannot determine {inputs.shape[1]} coefficients per colour")
    return torch.linalg.lstsq(inputs, targets).solution.float()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Images [B, 3, H, W] (or [B, 1, H, W]) in [-1, 1] → 8-bit PIL images.

    Same arithmetic as diffusers' VaeImageProcessor.postprocess, so the bytes match: map to
    [0, 1] and clamp in the tensor's own dtype, then round(x · 255) in float32 (half to even).
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [B, 3, H, W] or [B, 1, H, W], got shape {tuple(images.shape)}")
    unit = (images.detach().cpu() * 0.5 + 0.5).clamp(0, 1)
    pixels = (unit.permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8).numpy()
    if pixels.shape[-1] == 1:
        return [Image.fromarray(p[..., 0], mode="L") for p in pixels]
    return [Image.fromarray(p) for p in pixels]


# ---- filmstrip ---------------------------------------------------------------------------------

GAP = 4  # pixels between cells
BACKGROUND = (255, 255, 255)
LABEL_COLOUR = (0, 0, 0)


def filmstrip(
    frames: list[Image.Image], labels: list[str] | None = None, columns: int | None = None, max_width: int = 2048
) -> Image.Image:
    """The frames in a grid, left to right then top to bottom, each with its label underneath.

    columns: default as many as fit side by side within `max_width` (all of them if they
    fit: one strip). Frames are shrunk, keeping their aspect, only when `columns` of them
    would be wider than `max_width`. Cells are the first frame's size; GAP pixels apart.
    Size: columns·cw + (columns−1)·GAP wide, rows·(ch + label band) + (rows−1)·GAP high.
    """
    if not frames:
        raise ValueError("filmstrip needs at least one frame")
    if labels is not None and len(labels) != len(frames):
        raise ValueError(f"{len(labels)} labels for {len(frames)} frames")
    if columns is not None and columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    if max_width < 1:
        raise ValueError(f"max_width must be positive, got {max_width}")
    width, height = frames[0].size
    if columns is None:
        columns = max(1, min(len(frames), (max_width + GAP) // (width + GAP)))
    scale = min(1.0, (max_width - (columns - 1) * GAP) / (columns * width))
    cell_w, cell_h = max(1, int(width * scale)), max(1, int(height * scale))
    rows = math.ceil(len(frames) / columns)

    font = ImageFont.load_default()
    label_h = 0
    if labels is not None:
        text_h = max(font.getbbox(text or " ")[3] for text in labels)
        label_h = text_h + 2 * GAP
    sheet = Image.new(
        "RGB", (columns * cell_w + (columns - 1) * GAP, rows * (cell_h + label_h) + (rows - 1) * GAP), BACKGROUND
    )
    draw = ImageDraw.Draw(sheet)
    for i, frame in enumerate(frames):
        x = (i % columns) * (cell_w + GAP)
        y = (i // columns) * (cell_h + label_h + GAP)
        cell = frame.convert("RGB")
        if cell.size != (cell_w, cell_h):
            cell = cell.resize((cell_w, cell_h), Image.Resampling.LANCZOS)
        sheet.paste(cell, (x, y))
        if labels is not None:
            draw.text((x + 2, y + cell_h + GAP), labels[i], fill=LABEL_COLOUR, font=font)
    return sheet


# ---- recording every step ----------------------------------------------------------------------


class StepRecorder:
    """A per-step callback that saves the picture at each step and, at the end, a filmstrip.

        recorder = StepRecorder("steps/", decode=lambda z: to_pil(pipe.decode_latents(z)))
        pipe.txt2img(..., callback=lambda s: recorder(s.index, s.timestep, s.latents))
        recorder.finish()   # steps/filmstrip.png

    Writes step_000.png, step_001.png, ... for every `every`-th step (0-based), and always the
    last step seen, so the strip ends on the finished image. A batch's images share one frame,
    side by side.
    """

    def __init__(self, folder: str | os.PathLike, decode: Callable[[torch.Tensor], list[Image.Image]], every: int = 1):
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        self.folder = Path(folder)
        self.decode = decode
        self.every = every
        self.frames: list[Image.Image] = []
        self.labels: list[str] = []
        self._recorded_last = True
        self._last: tuple[int, float, torch.Tensor] | None = None

    def __call__(self, step: int, timestep: float, latents: torch.Tensor) -> None:
        if step % self.every == 0:
            self._record(step, timestep, latents)
            self._recorded_last = True
        else:
            self._last = (step, timestep, latents.detach().clone())
            self._recorded_last = False

    def _record(self, step: int, timestep: float, latents: torch.Tensor) -> None:
        images = self.decode(latents)
        if not images:
            raise ValueError(f"decode returned no image for step {step}")
        frame = images[0] if len(images) == 1 else filmstrip(images, columns=len(images), max_width=1 << 30)
        save_png(frame, self.folder / f"step_{step:03d}.png", None)
        self.frames.append(frame)
        self.labels.append(f"step {step + 1}  t={timestep:.0f}")

    def finish(self) -> Path:
        """Writes filmstrip.png (all recorded steps, labelled) and returns its path."""
        if not self._recorded_last and self._last is not None:
            self._record(*self._last)
            self._recorded_last = True
        if not self.frames:
            raise ValueError("no steps were recorded, so there is no filmstrip to write")
        strip = filmstrip(self.frames, self.labels)
        return save_png(strip, self.folder / "filmstrip.png", None)
