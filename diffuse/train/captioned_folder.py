"""A folder of images with a caption beside each, as kohya's sd-scripts reads one: `a.png` + `a.txt`.

Every image is checked when the folder is opened (the bytes say whether it is an image, not its
name; its size is bounded before a pixel is decoded), so a bad file stops a run before the first
step, in one line naming it. A sample is decoded when asked for, scaled so its shorter side is the
training size and cropped to the centre: nothing but the index decides it, as loop.train needs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

# The names sd-scripts takes for images; the bytes must then be one of IMAGE_FORMATS.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
CAPTION_SUFFIX = ".txt"
MAX_IMAGE_SIDE = 8192  # pixels; a training image larger than this is a mistake, not a photo to shrink
MAX_CAPTION_BYTES = 20_000  # about as long as a prompt may be (diffuse.inputs)


@dataclass(frozen=True)
class CaptionedImage:
    path: Path
    caption: str


def _caption_of(image: Path) -> str:
    caption_path = image.with_suffix(CAPTION_SUFFIX)
    if not caption_path.is_file():
        raise ValueError(f"{image}: no caption beside it ({caption_path.name} is missing)")
    data = caption_path.read_bytes()
    if len(data) > MAX_CAPTION_BYTES:
        raise ValueError(f"{caption_path}: the caption is {len(data)} bytes; the limit is {MAX_CAPTION_BYTES}")
    try:
        caption = data.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        raise ValueError(f"{caption_path}: the caption is not UTF-8 text") from None
    if not caption:
        raise ValueError(f"{caption_path}: the caption is empty")
    return " ".join(caption.split())  # one line, single spaces, as a prompt is typed


def _open_image(path: Path) -> Image.Image:
    """The image at `path`, its format and size checked before its pixels are decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path, formats=IMAGE_FORMATS)
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {str(e)[:200]})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from None
    if max(image.size) > MAX_IMAGE_SIDE or min(image.size) < 1:
        image.close()
        raise ValueError(f"{path}: {image.size[0]}x{image.size[1]} pixels; each side must be 1 to {MAX_IMAGE_SIDE}")
    return image


def _fitted(image: Image.Image, size: int) -> Image.Image:
    """The image scaled so its shorter side is `size`, then cropped to a centred size x size square."""
    image = image.convert("RGB")
    width, height = image.size
    scale = size / min(width, height)
    scaled = (max(size, round(width * scale)), max(size, round(height * scale)))
    if scaled != image.size:
        image = image.resize(scaled, Image.Resampling.LANCZOS)
    left, top = (scaled[0] - size) // 2, (scaled[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


class CaptionedFolder:
    """The images and captions of `folder` (sorted by name), each image `size` x `size` in [-1, 1]."""

    def __init__(self, folder: str | Path, size: int):
        self.folder, self.size = Path(folder), size
        if size < 8:
            raise ValueError(f"the training image size must be at least 8 pixels, not {size}")
        if not self.folder.is_dir():
            raise ValueError(f"training data {self.folder} is not a folder")
        images = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            raise ValueError(
                f"training data {self.folder} holds no images ({', '.join(IMAGE_SUFFIXES)}, each with a .txt caption)"
            )
        self.items = [CaptionedImage(path, _caption_of(path)) for path in images]
        for item in self.items:
            _open_image(item.path).close()

    def __len__(self) -> int:
        return len(self.items)

    def files(self) -> dict[str, Path]:
        """Every image and caption file, by a name for the run's input fingerprints (state.check_inputs)."""
        files = {}
        for item in self.items:
            files[f"data {item.path.name}"] = item.path
            files[f"data {item.path.with_suffix(CAPTION_SUFFIX).name}"] = item.path.with_suffix(CAPTION_SUFFIX)
        return files

    def sample(self, index: int) -> tuple[torch.Tensor, str]:
        """(image [3, size, size] in [-1, 1], caption) of sample `index` (taken modulo the folder's size)."""
        item = self.items[index % len(self.items)]
        with _open_image(item.path) as image:
            try:
                pixels = np.asarray(_fitted(image, self.size), dtype=np.float32)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise ValueError(f"{item.path}: cannot be decoded ({type(e).__name__}: {str(e)[:200]})") from None
        return torch.from_numpy(pixels / 127.5 - 1.0).permute(2, 0, 1).contiguous(), item.caption

    def batch(self, start: int, count: int) -> dict:
        """Samples start .. start+count-1 as {"images": [B, 3, size, size], "captions": [...]}."""
        samples = [self.sample(start + i) for i in range(count)]
        return {"images": torch.stack([s[0] for s in samples]), "captions": [s[1] for s in samples]}
