"""The emoji world's judge: an image read back into the pictures it shows, where and how large.

Reading works on pixels alone, the way a generated image has to be judged:

1. The background is estimated from the image's border ring as a colour that may change from
   top to bottom (every background of the world is plain or a vertical gradient).
2. Pixels far enough from it are the pictures, labelled into connected components on the mask
   grown by a pixel (so a picture whose outline matches the background in places stays one
   blob); fragments too small to be a picture join a blob they lie next to or are dropped.
3. Each blob's square crop (its bounding box and a margin) goes to a small CNN trained on
   augmented renders of every picture of the catalogue (judge_train.py), which names it.
4. Knowing the picture, its own drawn bounds (the part of its 64 px square that is not
   transparent) turn the blob's bounding box back into the picture's box: the centre gives its
   cell (diffuse.shapes.scenes.cell_of) and the box side its size (the nearer of SIZES).

read(image) returns the readings most confident first, the order diffuse.emoji.evaluate scores
in. A judge is saved as judge.safetensors (the network) and judge.json (the class names and
their pictures' bounds) in one folder; `python -m diffuse.emoji.judge train --data DIR --out DIR`
trains one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save as safetensors_bytes

from diffuse.checkpoints.reader import check_finite, read_state_dict
from diffuse.emoji.judge_train import (
    CROP_MARGIN,
    CROP_SIZE,
    REPORT_FILE,
    JudgeNet,
    PictureBank,
    TrainSettings,
    fit,
    format_measure,
    measure,
)
from diffuse.emoji.scenes import SIZES, cell_of, relation_between
from diffuse.metadata import atomic_write

WEIGHTS_FILE = "judge.safetensors"
CLASSES_FILE = "judge.json"
MAX_READ_SIDE = 1024  # the largest image read (a 512 px scene with room to spare)
MAX_CLASSES = 100_000  # a class list longer than any catalogue is refused before its network is built
MAX_BLOBS = 8  # the largest blobs read; a scene holds at most two pictures
# A pixel belongs to a picture when its RGB distance from the estimated background is at least
# this far, or this many times the border ring's own spread (a noisy generated background).
MIN_DISTANCE = 40.0
SPREAD_FACTOR = 4.0
MIN_BLOB = 0.06  # a blob's longer side as a fraction of the image side, below which it is noise
MERGE_GAP = 0.03  # parts nearer than this (a fraction of the image side) are one picture's; pictures keep 0.05 apart
MIN_PART_PIXELS = 3  # smaller specks are left out before parts are joined
MAX_PARTS = 256  # the largest parts joined (a noisy image has thousands of specks)
# The box side halfway (geometrically) between the two sizes: below it a picture reads as small.
SIZE_SPLIT = math.sqrt(SIZES["small"] * SIZES["large"])


@dataclass(frozen=True)
class Reading:
    """One picture found in an image; centre and extent are fractions of the image side."""

    name: str
    probability: float
    position: str
    size: str
    centre: tuple[float, float]
    extent: float  # the picture's box side, estimated from its blob and its known drawn bounds


@dataclass(frozen=True)
class Blob:
    """A connected group of picture pixels: its bounding box in pixels (right and bottom exclusive)."""

    left: int
    top: int
    right: int
    bottom: int
    pixels: int

    @property
    def side(self) -> int:
        return max(self.right - self.left, self.bottom - self.top)


# ---------------------------------------------------------------- finding the pictures


def background(pixels: np.ndarray) -> np.ndarray:
    """The background [H, 3] row by row: a straight line in y fitted to the border ring's colours
    (twice, the second time without the ring pixels far off the first fit: a picture touching the border)."""
    h, w, _ = pixels.shape
    ys = np.concatenate([np.zeros(w), np.full(w, h - 1), np.arange(h), np.arange(h)]).astype(np.float64)
    ring = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]).astype(np.float64)
    keep = np.ones(len(ys), dtype=bool)
    t = ys / max(h - 1, 1)
    design = np.stack([1 - t, t], axis=1)  # the top and bottom colours blended
    for _ in range(2):
        ends, *_ = np.linalg.lstsq(design[keep], ring[keep], rcond=None)  # [2, 3]
        far = np.linalg.norm(ring - design @ ends, axis=1)
        keep = far <= max(MIN_DISTANCE / 2, 3 * float(np.median(far)))
    rows = np.linspace(0.0, 1.0, h)[:, None]
    return ends[0] * (1 - rows) + ends[1] * rows


def picture_mask(pixels: np.ndarray) -> np.ndarray:
    """Which pixels [H, W] stand out from the estimated background."""
    rows = background(pixels)
    distance = np.linalg.norm(pixels.astype(np.float64) - rows[:, None, :], axis=2)
    border = np.concatenate([distance[0], distance[-1], distance[:, 0], distance[:, -1]])
    return distance >= max(MIN_DISTANCE, SPREAD_FACTOR * float(np.median(border)))


def label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of a boolean mask, 8-connected: (labels 1..n, 0 outside; n)."""
    try:
        from scipy import ndimage  # much faster where installed; the project does not require it
    except ImportError:
        return _label_by_search(mask)
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    return labels, int(count)


def _label_by_search(mask: np.ndarray) -> tuple[np.ndarray, int]:
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    count = 0
    for y, x in zip(*np.nonzero(mask)):
        if labels[y, x]:
            continue
        count += 1
        labels[y, x] = count
        queue = deque([(y, x)])
        while queue:
            cy, cx = queue.popleft()
            for ny in range(max(cy - 1, 0), min(cy + 2, h)):
                for nx in range(max(cx - 1, 0), min(cx + 2, w)):
                    if mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = count
                        queue.append((ny, nx))
    return labels, count


def _dilate(mask: np.ndarray) -> np.ndarray:
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    wide = grown.copy()
    wide[:, 1:] |= grown[:, :-1]
    wide[:, :-1] |= grown[:, 1:]
    return wide


def find_blobs(pixels: np.ndarray) -> list[Blob]:
    """The picture-sized blobs of an RGB image [H, W, 3], largest first.

    Components are taken on the mask grown by a pixel, so an outline broken where it matches
    the background stays whole. Parts of one picture drawn apart (paw prints, a bell and its
    stroke) join when their boxes lie within MERGE_GAP of each other: a scene keeps its pictures
    further apart than that. What is left smaller than MIN_BLOB is noise.
    """
    mask = picture_mask(pixels)
    labels, count = label(_dilate(mask))
    side = max(pixels.shape[:2])
    parts = [b for b in _components(np.where(mask, labels, 0), count) if b.pixels >= MIN_PART_PIXELS]
    blobs = _merged(sorted(parts, key=lambda b: -b.pixels)[:MAX_PARTS], MERGE_GAP * side)
    blobs = [b for b in blobs if b.side >= MIN_BLOB * side]
    return sorted(blobs, key=lambda b: -b.pixels)[:MAX_BLOBS]


def _merged(parts: list[Blob], gap: float) -> list[Blob]:
    """The parts joined wherever two boxes lie within `gap` of each other, until none do."""
    blobs: list[Blob] = []
    for part in parts:
        while near := [b for b in blobs if _apart(b, part) <= gap]:
            for b in near:
                blobs.remove(b)
                part = _joined(part, b)
        blobs.append(part)
    return blobs


def _components(labels: np.ndarray, count: int) -> list[Blob]:
    """Each label's bounding box and pixel count (labels with no pixels left out)."""
    ys, xs = np.nonzero(labels)
    values = labels[ys, xs] - 1
    pixels = np.bincount(values, minlength=count)
    far = np.iinfo(np.int64).max
    bounds = []
    for coords, reduce, start in (
        (ys, np.minimum, far),
        (ys, np.maximum, -1),
        (xs, np.minimum, far),
        (xs, np.maximum, -1),
    ):
        bounds.append(np.full(count, start))
        reduce.at(bounds[-1], values, coords)
    top, bottom, left, right = bounds
    return [
        Blob(int(left[i]), int(top[i]), int(right[i]) + 1, int(bottom[i]) + 1, int(pixels[i]))
        for i in range(count)
        if pixels[i]
    ]


def _apart(a: Blob, b: Blob) -> int:
    """The gap in pixels between two bounding boxes (0 where they overlap or touch)."""
    dx = max(a.left - b.right, b.left - a.right, 0)
    dy = max(a.top - b.bottom, b.top - a.bottom, 0)
    return max(dx, dy)


def _joined(a: Blob, b: Blob) -> Blob:
    return Blob(
        min(a.left, b.left), min(a.top, b.top), max(a.right, b.right), max(a.bottom, b.bottom), a.pixels + b.pixels
    )


def crop(image: Image.Image, blob: Blob) -> Image.Image:
    """The blob's square crop with its margin, CROP_SIZE on a side; beyond the image the border repeats."""
    side = max(2, round(blob.side * CROP_MARGIN))
    cx, cy = (blob.left + blob.right) / 2, (blob.top + blob.bottom) / 2
    left, top = round(cx - side / 2), round(cy - side / 2)
    pixels = np.asarray(image)
    pad = side
    padded = np.pad(pixels, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    window = padded[top + pad : top + pad + side, left + pad : left + pad + side]
    return Image.fromarray(np.ascontiguousarray(window)).resize((CROP_SIZE, CROP_SIZE), Image.Resampling.BILINEAR)


def crops_to_tensor(crops: list[Image.Image]) -> torch.Tensor:
    """RGB crops -> [B, 3, CROP_SIZE, CROP_SIZE] in [-1, 1], what the network reads."""
    array = np.stack([np.asarray(c, dtype=np.float32) for c in crops])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


# ---------------------------------------------------------------- the judge


class EmojiJudge:
    """A trained JudgeNet with its class names and each picture's drawn bounds (fractions of its square)."""

    def __init__(self, names: list[str], bounds: list[tuple[float, float, float, float]], net: JudgeNet) -> None:
        if len(names) != len(bounds) or len(names) != net.classify.out_features:
            raise ValueError(f"{len(names)} names, {len(bounds)} bounds and {net.classify.out_features} classes differ")
        self.names, self.bounds, self.net = list(names), [tuple(b) for b in bounds], net.eval()

    @torch.no_grad()
    def classify(self, crops: torch.Tensor) -> torch.Tensor:
        """Class probabilities [B, names] of crops [B, 3, CROP_SIZE, CROP_SIZE]."""
        return self.net(crops).softmax(dim=1)

    def read(self, image: Image.Image) -> list[Reading]:
        """The pictures in an image, most confident first."""
        pixels = _pixels(image)
        blobs = find_blobs(pixels)
        if not blobs:
            return []
        rgb = Image.fromarray(pixels)
        probabilities = self.classify(crops_to_tensor([crop(rgb, b) for b in blobs]))
        best, index = probabilities.max(dim=1)
        side = max(pixels.shape[:2])
        readings = [self._reading(b, int(i), float(p), side) for b, i, p in zip(blobs, index, best)]
        return sorted(readings, key=lambda r: -r.probability)

    def _reading(self, blob: Blob, index: int, probability: float, side: int) -> Reading:
        """The picture's box from its blob: the blob is the picture's drawn bounds, scaled and placed."""
        x0, y0, x1, y1 = self.bounds[index]
        drawn = max(x1 - x0, y1 - y0)
        extent = float(blob.side / drawn / side)
        # The drawn part's centre sits off the box centre by its bounds' offset, in box sides.
        cx = (blob.left + blob.right) / 2 / side - ((x0 + x1) / 2 - 0.5) * extent
        cy = (blob.top + blob.bottom) / 2 / side - ((y0 + y1) / 2 - 0.5) * extent
        cx, cy = min(max(float(cx), 0.0), 1.0), min(max(float(cy), 0.0), 1.0)
        size = "small" if extent < SIZE_SPLIT else "large"
        return Reading(self.names[index], probability, cell_of(cx, cy), size, (cx, cy), extent)

    def save(self, folder: str | Path) -> Path:
        """Write judge.safetensors and judge.json into `folder` (each atomically)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.net.state_dict().items()}
        data = safetensors_bytes(state, metadata={"format": "pt"})
        atomic_write(folder / WEIGHTS_FILE, lambda f: f.write(data))
        classes = {"names": self.names, "bounds": self.bounds, "widths": list(self.net.widths)}
        text = json.dumps(classes, indent=1, ensure_ascii=False) + "\n"
        atomic_write(folder / CLASSES_FILE, lambda f: f.write(text.encode("utf-8")))
        return folder

    @classmethod
    def load(cls, folder: str | Path, names: list[str] | None = None) -> EmojiJudge:
        """A saved judge; with `names`, refused unless it was trained on exactly those names in that order."""
        folder = Path(folder)
        classes = _read_classes(folder / CLASSES_FILE)
        if names is not None and list(names) != classes["names"]:
            raise ValueError(f"{folder}: the judge was trained on {_differ(classes['names'], list(names))}")
        path = folder / WEIGHTS_FILE
        state = read_state_dict(path)
        check_finite(state, path)
        net = JudgeNet(len(classes["names"]), tuple(classes["widths"]))
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{path}: weights do not fit {CLASSES_FILE}: {str(e).splitlines()[0]}") from None
        return cls(classes["names"], classes["bounds"], net)


def relation(a: Reading, b: Reading) -> str:
    """Where reading a is relative to reading b ("left of", "above", ...), by their centres."""
    return relation_between(a.centre, b.centre)


def _pixels(image: Image.Image) -> np.ndarray:
    if not isinstance(image, Image.Image):
        raise ValueError(f"the judge reads a PIL image, got {type(image).__name__}")
    if not 8 <= min(image.size) or max(image.size) > MAX_READ_SIDE:
        raise ValueError(f"the judge reads images from 8 to {MAX_READ_SIDE} px on a side, got {image.size}")
    return np.asarray(image.convert("RGB"))


def _read_classes(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"{path.parent}: no judge here (train one with `python -m diffuse.emoji.judge train`)")
    try:
        classes = json.loads(path.read_text(encoding="utf-8"))
        names, bounds, widths = classes["names"], classes["bounds"], classes["widths"]
        ok = all(isinstance(n, str) for n in names) and len(set(names)) == len(names) == len(bounds)
        ok = ok and 1 <= len(names) <= MAX_CLASSES and all(n for n in names)
        ok = ok and all(len(b) == 4 and all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in b) for b in bounds)
        ok = ok and all(b[0] < b[2] and b[1] < b[3] for b in bounds)
        ok = ok and 1 <= len(widths) <= 8 and all(isinstance(w, int) and 1 <= w <= 1024 for w in widths)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: not a judge's class list ({e})") from None
    if not ok:
        raise ValueError(f"{path}: not a judge's class list (names, bounds and widths do not fit)")
    return classes


def _differ(trained: list[str], asked: list[str]) -> str:
    """A one-line account of how two name lists differ."""
    if len(trained) != len(asked):
        return f"{len(trained)} names, not these {len(asked)}"
    i = next(i for i, (a, b) in enumerate(zip(trained, asked)) if a != b)
    return f"another name list ({trained[i]!r} where this one has {asked[i]!r}, name {i})"


def train_judge(
    folder: str | Path,
    out: str | Path,
    settings: TrainSettings,
    *,
    start: str | Path | None = None,
    log_every: int = 100,
) -> EmojiJudge:
    """Train a judge on every name of a data folder's catalogue (judge_train.fit) and save it in `out`;
    from the saved judge in `start` where given (trained on the same names, else refused)."""
    bank = PictureBank(folder)
    net = EmojiJudge.load(start, names=bank.names).net if start is not None else None
    judge = EmojiJudge(bank.names, bank.bounds, fit(bank, settings, net, log_every=log_every))
    judge.save(out)
    return judge


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffuse.emoji.judge", description="Train the emoji judge or measure a saved one."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a judge on a data folder and report its accuracy")
    train.add_argument("--data", required=True, help="the emoji data folder (`diffuse data emoji --out DIR`)")
    train.add_argument("--out", required=True, help="the folder the judge is saved in")
    train.add_argument("--steps", type=int, help="training steps (or --minutes)")
    train.add_argument("--minutes", type=float, help="training time (or --steps)")
    train.add_argument("--batch", type=int, default=TrainSettings.batch)
    train.add_argument("--learning-rate", type=float, default=TrainSettings.learning_rate)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--init", help="a saved judge's folder to go on training from (the same names)")
    train.add_argument("--degrade", type=float, default=1.0, help="how often crops are worn (1: the usual shares)")
    train.add_argument("--threads", type=int, default=2, help="torch threads (the 2-core machine's)")
    check = commands.add_parser("measure", help="measure a saved judge on held-out renders")
    check.add_argument("--data", required=True)
    check.add_argument("--judge", required=True)
    for command in (train, check):
        command.add_argument("--image-size", type=int, default=64, help="the report's scene size")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")


def _run(args: argparse.Namespace) -> int:
    if args.command == "train":
        if not 1 <= args.threads <= 256:
            raise ValueError(f"--threads must be from 1 to 256, got {args.threads}")
        torch.set_num_threads(args.threads)
        settings = TrainSettings(
            args.steps, args.minutes, args.batch, args.learning_rate, args.seed, degrade=args.degrade
        )
        start = time.monotonic()
        judge = train_judge(args.data, args.out, settings, start=args.init)
        print(f"trained in {time.monotonic() - start:.0f} s; saved in {args.out}")
        folder = Path(args.out)
    else:
        folder = Path(args.judge)
        judge = EmojiJudge.load(folder)
    results = measure(judge, args.data, args.image_size)
    print(format_measure(results))
    text = json.dumps(results, indent=1) + "\n"
    atomic_write(folder / REPORT_FILE, lambda f: f.write(text.encode("utf-8")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
