"""Generation parameters inside PNGs, written and read the way AUTOMATIC1111's web UI does.

A1111 stores an "infotext" in a PNG text chunk named "parameters":

    a photo of a cat, (masterpiece:1.2)
    Negative prompt: blurry, lowres
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 512x512, ...

The prompt (any number of lines), an optional "Negative prompt:" line, and one last line
of "Key: value" pairs that always starts with "Steps:" (readers look for "\\nSteps:").
Writing the same text makes our images readable by the tools that read A1111's
(PNG Info tab, image browsers, civitai), and lets any image be made again.

Also here: A1111's model hash, and one atomic file writer used for every image we save.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
from pathlib import Path
from typing import BinaryIO, Callable

from PIL import Image, PngImagePlugin

PARAMETERS_KEY = "parameters"  # the PNG text chunk's name, as A1111 writes it

# Our generation-info keys in the order A1111's create_infotext lists their labels.
# "Size" stands for width and height together; "Mask blur" is one of A1111's extra
# parameters, which come after its fixed ones and before "Version".
_LABELS = {
    "steps": "Steps",
    "sampler": "Sampler",
    "schedule_type": "Schedule type",
    "cfg_scale": "CFG scale",
    "seed": "Seed",
    "size": "Size",
    "model_hash": "Model hash",
    "model": "Model",
    "denoising_strength": "Denoising strength",
    "clip_skip": "Clip skip",
    "token_merging_ratio": "Token merging ratio",  # A1111 writes it here too, when merging is on
    "eta": "Eta",  # DDIM's eta or the ancestral noise share, written only when asked for
    "mask_blur": "Mask blur",
    "guidance_cutoff": "Guidance cutoff",  # diffuse's optional speed-ups, written only when used
    "deep_cache": "Deep cache",
    "version": "Version",
}

# A1111's "Key: value" pattern: a key starting with a word character, then a value that is
# either JSON-quoted (may hold commas, colons, newlines) or runs to the next comma.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")

# What A1111's parser assumes when a key is absent: the infotext leaves defaults out.
_PARSE_DEFAULTS = {"Clip skip": "1", "RNG": "GPU", "Schedule type": "Automatic"}


# ---- infotext ----------------------------------------------------------------------------------


def _quote(value: object) -> str:
    """A1111's rule: values that would break the "k: v, k: v" line are written as JSON strings."""
    text = str(value)
    if "," in text or "\n" in text or ":" in text:
        return json.dumps(text, ensure_ascii=False)
    return text


def _format_cfg(value: float) -> str:
    # A1111's UI hands over 7 (an int) for a whole-number scale and 7.5 otherwise.
    value = float(value)
    return str(int(value)) if value.is_integer() else str(value)


def infotext(info: dict) -> str:
    """A1111's parameters text for one image from our generation-info dict.

    Keys read: prompt, negative_prompt, steps, sampler, schedule_type, cfg_scale, seed, width,
    height, model_hash, model, clip_skip (written only above 1), denoising_strength
    (img2img/inpaint), mask_blur, version. None values and other keys are left out.
    """
    values: dict[str, object] = {}
    for key, label in _LABELS.items():
        if key == "size":
            width, height = info.get("width"), info.get("height")
            if width is not None and height is not None:
                values[label] = f"{int(width)}x{int(height)}"
            continue
        value = info.get(key)
        if value is None or (key == "clip_skip" and int(value) <= 1):
            continue
        values[label] = _format_cfg(value) if key == "cfg_scale" else value
    params = ", ".join(f"{label}: {_quote(value)}" for label, value in values.items())
    negative = info.get("negative_prompt") or ""
    negative_line = f"\nNegative prompt: {negative}" if negative else ""
    # A1111 strips the whole text, so an empty prompt leaves the "Steps:" line first.
    return f"{info.get('prompt') or ''}{negative_line}\n{params}".strip()


def parse_infotext(text: str) -> dict[str, str]:
    """A1111's parse_generation_parameters: labels → values, kept as strings.

    The last line holds the parameters only if the "Key: value" pattern matches it at least
    three times; otherwise it belongs to the prompt. Every line is stripped; "Size: WxH"
    becomes "Size-1"/"Size-2"; JSON-quoted values are unquoted; an empty value is dropped
    (A1111 fails on it and skips the key). Missing "Clip skip", "RNG" and "Schedule type"
    get A1111's defaults ("1", "GPU", "Automatic"). A1111's UI-only steps (prompt styles,
    hires-fix and inpaint form defaults) are not reproduced.
    """
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""

    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)

    result = {"Prompt": "\n".join(prompt_lines), "Negative prompt": "\n".join(negative_lines)}
    for key, value in _PARAM.findall(last):
        if not value:
            continue
        if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass  # A1111 keeps a value it cannot unquote as it is
        size = _IMAGE_SIZE.match(value)
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
        else:
            result[key] = value
    for key, default in _PARSE_DEFAULTS.items():
        result.setdefault(key, default)
    return result


# Parsed labels back to our keys, with the type each key has in a generation-info dict.
_FROM_LABEL = {
    "Prompt": ("prompt", str),
    "Negative prompt": ("negative_prompt", str),
    "Steps": ("steps", int),
    "Sampler": ("sampler", str),
    "Schedule type": ("schedule_type", str),
    "CFG scale": ("cfg_scale", float),
    "Seed": ("seed", int),
    "Size-1": ("width", int),
    "Size-2": ("height", int),
    "Model hash": ("model_hash", str),
    "Model": ("model", str),
    "Denoising strength": ("denoising_strength", float),
    "Clip skip": ("clip_skip", int),
    "Eta": ("eta", float),
    "Mask blur": ("mask_blur", int),
    "Version": ("version", str),
}


def info_from_infotext(text: str) -> dict:
    """Our generation-info dict (typed: int steps, float cfg_scale, ...) from a parameters text.

    The inverse of `infotext` for the keys it writes; A1111 defaults fill the keys the text
    leaves out (clip_skip 1, schedule_type "Automatic"). Other A1111 labels are ignored.
    """
    parsed = parse_infotext(text)
    info = {}
    for label, (key, kind) in _FROM_LABEL.items():
        if label not in parsed:
            continue
        try:
            info[key] = kind(parsed[label])
        except ValueError:
            raise ValueError(f"infotext value for {label!r} is not a valid {kind.__name__}: "
                             f"{parsed[label]!r}") from None
    return info


# ---- model hash --------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """sha256 of a whole file, read in chunks so a multi-GB checkpoint never sits in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


# For a diffusers folder: the UNet is the part that makes one model differ from another
# (fine-tunes share text encoder and VAE), so its weights file stands for the model.
_DIFFUSERS_UNET_WEIGHTS = (
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.fp16.bin",
)


def model_hash(path: str | os.PathLike) -> str:
    """A1111's "Model hash" (AutoV2): the first 10 hex digits of the sha256 of the whole file.

    A single-file checkpoint hashes to exactly what A1111 shows. A diffusers folder has no
    single file, so its UNet weights file is hashed instead (the first of
    unet/diffusion_pytorch_model{,.fp16}.{safetensors,bin} that exists).
    """
    path = Path(path)
    if path.is_dir():
        candidates = [path / name for name in _DIFFUSERS_UNET_WEIGHTS]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            looked_for = ", ".join(_DIFFUSERS_UNET_WEIGHTS)
            raise ValueError(f"{path} is a folder without UNet weights to hash (looked for {looked_for})")
        path = found
    elif not path.is_file():
        raise ValueError(f"cannot hash model {path}: no such file or folder")
    return sha256_file(path)[:10]


# ---- writing files -----------------------------------------------------------------------------


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], *, overwrite: bool = True) -> Path:
    """Write a file so that `path` only ever holds a complete file: the old one or the new one.

    `write(f)` fills a temporary file in the same folder (so the final rename stays on one
    filesystem), which is flushed to disk and then renamed over `path`. Any error removes the
    temporary file and leaves an existing `path` untouched. With overwrite=False an existing
    `path` raises FileExistsError instead, decided atomically by the filesystem (a hard
    link), so two writers can never replace each other's file. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    # os.open with mode 0o666 lets the umask decide permissions, as for any ordinary file.
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(temp, path)
        else:
            os.link(temp, path)
            temp.unlink()
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)
    return path


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable. Best effort: the new file is already complete and in
    place, and some systems (Windows, some network filesystems) cannot sync a folder."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_png(image: Image.Image, path: str | os.PathLike, parameters: str | None, *, overwrite: bool = True) -> Path:
    """Save `image` as a PNG carrying `parameters` in a "parameters" text chunk, atomically.

    Pillow stores the text as tEXt when it is Latin-1 encodable and as UTF-8 iTXt otherwise
    (a Japanese prompt, emoji), as A1111 does. parameters=None writes no text chunk.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_png writes PNG files; {path} does not end in .png")
    pnginfo = _png_info(parameters)  # checked before any file is made
    return atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=pnginfo), overwrite=overwrite)


def png_bytes(image: Image.Image, parameters: str | None) -> bytes:
    """The PNG save_png would write, in memory (for an HTTP answer)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=_png_info(parameters))
    return buffer.getvalue()


def _png_info(parameters: str | None) -> PngImagePlugin.PngInfo | None:
    """The "parameters" text chunk (None: no chunk)."""
    if parameters is None:
        return None
    if not isinstance(parameters, str):
        raise ValueError(f"parameters must be a str, not {type(parameters).__name__}")
    pnginfo = PngImagePlugin.PngInfo()
    pnginfo.add_text(PARAMETERS_KEY, parameters)
    return pnginfo


def read_parameters(source: str | os.PathLike | Image.Image) -> str | None:
    """The "parameters" text of a PNG (a path or an opened image), or None when it has none."""
    if isinstance(source, Image.Image):
        return _parameters_of(source)
    with Image.open(source) as image:
        return _parameters_of(image)


def _parameters_of(image: Image.Image) -> str | None:
    text = image.info.get(PARAMETERS_KEY)
    if text is None and image.format == "PNG":
        # Text chunks placed after the pixel data only show up once the image is loaded.
        image.load()
        text = image.info.get(PARAMETERS_KEY)
    return None if text is None else str(text)


FIRST_INDEX = 0  # numbering starts at 00000, as in A1111


def numbered_path(folder: str | os.PathLike, seed: int, ext: str = ".png") -> Path:
    """The next "<5-digit index>-<seed><ext>" name in `folder`, never an existing file.

    As A1111: the index is one past the largest number any file in the folder starts with
    ("00007-123.png" counts as 7; files not starting with a number are ignored). Between
    choosing a name and writing it another process may take it; pass the path to
    save_png(..., overwrite=False) to turn that race into an error instead of a lost file.
    """
    folder = Path(folder)
    largest = FIRST_INDEX - 1
    if folder.is_dir():
        for entry in folder.iterdir():
            head = os.path.splitext(entry.name)[0].split("-", 1)[0]
            if head.isascii() and head.isdigit():
                largest = max(largest, int(head))
    index = largest + 1
    while (candidate := folder / f"{index:05d}-{seed}{ext}").exists():
        index += 1
    return candidate
