"""Generation parameters inside PNGs, written and read the way AUTOMATIC1111's web UI does.

A1111 stores an "infotext" in a PNG text chunk named "parameters":

    a photo of a cat, (masterpiece:1.2)
    Negative prompt: blurry, lowres
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 512x512, ...

The prompt (any number of lines), an optional "Negative prompt:" line, and one last line
of "Key: value" pairs that always starts with "Steps:" (readers look for "\\nSteps:").
Writing the same text makes our images readable by the tools that read A1111's
(PNG Info tab, image browsers, civitai), and lets any image be made again.

A1111 writes prompts raw, so a prompt holding a newline and "Steps: ..." would forge a
parameters line that readers trust. Prompts are therefore written with newlines escaped (see
`escape_newlines`): an ordinary prompt, `\\(` included, stays byte-identical, and any prompt
comes back exactly, but for the leading and trailing whitespace every reader strips and a
prompt that itself starts with "Negative prompt:", which A1111's layout cannot tell apart.

After A1111's own keys come diffuse's, which say what is needed to make an image again and
whether that can match: the model's full sha256, dtype, quantization, device, the sampler's
settings, the batch and the image's place in it, the input image's and mask's hashes.

Also here: one atomic file writer used for every image we save.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from PIL import Image, PngImagePlugin

# The hashes are diffuse.hashes' and the safe chunk reader is diffuse.pngtext's; callers
# that read and write PNG metadata find them here too.
from diffuse.hashes import ModelHashes, model_hash, model_hashes, sha256_file  # noqa: F401
from diffuse.pngtext import PngTextError, read_png_text  # noqa: F401

PARAMETERS_KEY = "parameters"  # the PNG text chunk's name, as A1111 writes it

# Our generation-info keys in the order A1111's create_infotext lists their labels.
# "Size" stands for width and height together; "Mask blur" is one of A1111's extra
# parameters, which come after its fixed ones; diffuse's own keys follow them, before "Version".
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
    "init_image_hash": "Init image hash",  # img2img/inpaint: sha256 of the input's pixels (diffuse.inputs)
    "eta": "Eta",  # DDIM's eta or the ancestral noise share, written only when asked for
    "mask_blur": "Mask blur",
    "refiner": "Refiner",  # SDXL's base -> refiner hand-off: "name [hash]" and the fraction it switched at
    "refiner_switch_at": "Refiner switch at",
    # What the SDXL refiner is told of the prompts' and negative prompts' look, written only away from the defaults.
    "aesthetic_score": "Aesthetic score",
    "negative_aesthetic_score": "Negative aesthetic score",
    "lora_hashes": "Lora hashes",  # "name: hash, ...": each LoRA the prompts applied (diffuse.adapters.library)
    "ti_hashes": "TI hashes",  # "name: hash, ...": each embedding the prompts used
    "guidance_cutoff": "Guidance cutoff",  # diffuse's optional speed-ups, written only when used
    "deep_cache": "Deep cache",
    "nan_fallback": "NaN fallback",  # what ran in float32 after a NaN in reduced precision, e.g. "UNet float32"
    "mask_hash": "Mask hash",  # inpaint: sha256 of the mask as the model saw it (diffuse.inputs)
    "keep_unmasked": "Keep unmasked",  # inpaint: written only when off (A1111 always pastes back)
    # SDXL's size conditioning, written only where the request moved it off the size asked for, uncropped.
    "crop_top": "Crop top",
    "crop_left": "Crop left",
    "negative_original_size": "Negative original size",
    "negative_target_size": "Negative target size",
    "negative_crop_top": "Negative crop top",
    "negative_crop_left": "Negative crop left",
    "batch_size": "Batch size",  # images drawn together (A1111's old labels); written from 2 up
    "batch_pos": "Batch pos",
    "model_sha256": "Model sha256",  # diffuse.hashes: the file's, or a folder's every part's
    "dtype": "Dtype",
    "quantize": "Quantize",  # the networks' int8 path (diffuse.runtime.prepare), written only when on
    "device": "Device",  # the device type: "cpu", "cuda", "mps"
    "sampler_settings": "Sampler settings",  # diffuse.recipe: every schedule and sampler option
    "version": "Version",
}

# Labels written "WxH" from a width key and a height key, as A1111 writes "Size"; they read back
# as "<label>-1" and "<label>-2".
_SIZE_KEYS = {
    "size": ("width", "height"),
    "negative_original_size": ("negative_original_width", "negative_original_height"),
    "negative_target_size": ("negative_target_width", "negative_target_height"),
}

# A1111's "Key: value" pattern: a key starting with a word character, then a value that is
# either JSON-quoted (may hold commas, colons, newlines) or runs to the next comma.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")

# What A1111's parser assumes when a key is absent: the infotext leaves defaults out.
_PARSE_DEFAULTS = {"Clip skip": "1", "RNG": "GPU", "Schedule type": "Automatic"}


# ---- infotext ----------------------------------------------------------------------------------


def _quote(value: object) -> str:
    """A1111's rule: values that would break the "k: v, k: v" line are written as JSON strings
    (and, beyond A1111, a value that starts with a quote, which a reader would unquote)."""
    text = str(value)
    if "," in text or "\n" in text or "\r" in text or ":" in text or text.startswith('"'):
        return json.dumps(text, ensure_ascii=False)
    return text


_TO_ESCAPE = re.compile(r"(\\*)([\n\rnr])")
_ESCAPED = re.compile(r"(\\+)([nr])")


def escape_newlines(text: str) -> str:
    """A prompt as one line, reversibly: newline -> \\n, carriage return -> \\r.

    A run of k backslashes before a newline (CR) is written as 2k+1 backslashes and "n" ("r");
    before a literal "n" ("r") as 2k backslashes and the letter; everything else is unchanged,
    so prompts without those (A1111's `\\(` escapes included) stay byte-identical.
    """

    def one(match: re.Match) -> str:
        run, char = len(match.group(1)), match.group(2)
        if char in "\n\r":
            return "\\" * (2 * run + 1) + ("n" if char == "\n" else "r")
        return "\\" * (2 * run) + char

    return _TO_ESCAPE.sub(one, text)


def unescape_newlines(text: str) -> str:
    """The inverse of escape_newlines: m backslashes before "n"/"r" are m // 2 backslashes and,
    for odd m, a newline (CR), for even m the letter itself."""

    def one(match: re.Match) -> str:
        run, char = len(match.group(1)), match.group(2)
        if run % 2:
            return "\\" * (run // 2) + ("\n" if char == "n" else "\r")
        return "\\" * (run // 2) + char

    return _ESCAPED.sub(one, text)


def _format_cfg(value: float) -> str:
    # A1111's UI hands over 7 (an int) for a whole-number scale and 7.5 otherwise.
    value = float(value)
    return str(int(value)) if value.is_integer() else str(value)


def infotext(info: dict) -> str:
    """A1111's parameters text for one image from our generation-info dict.

    Keys read: prompt, negative_prompt (both through escape_newlines), width and height (as
    "Size"; the negative size conditioning's widths and heights likewise), clip_skip (written only above 1), batch_size and batch_pos (only for batches of
    2 or more), keep_unmasked (only when False) and every other key of _LABELS. None values
    and other keys are left out.
    """
    values: dict[str, object] = {}
    for key, label in _LABELS.items():
        if key in _SIZE_KEYS:
            width, height = (info.get(side) for side in _SIZE_KEYS[key])
            if width is not None and height is not None:
                values[label] = f"{int(width)}x{int(height)}"
            continue
        value = info.get(key)
        if value is None or (key == "clip_skip" and int(value) <= 1) or (key == "keep_unmasked" and value):
            continue
        if key in ("batch_size", "batch_pos") and int(info.get("batch_size") or 1) < 2:
            continue
        values[label] = _format_cfg(value) if key == "cfg_scale" else value
    params = ", ".join(f"{label}: {_quote(value)}" for label, value in values.items())
    negative = escape_newlines(info.get("negative_prompt") or "")
    negative_line = f"\nNegative prompt: {negative}" if negative else ""
    # A1111 strips the whole text, so an empty prompt leaves the "Steps:" line first.
    return f"{escape_newlines(info.get('prompt') or '')}{negative_line}\n{params}".strip()


def parse_infotext(text: str) -> dict[str, str]:
    """A1111's parse_generation_parameters: labels → values, kept as strings.

    The last line holds the parameters only if the "Key: value" pattern matches it at least
    three times; otherwise it belongs to the prompt. Every line is stripped; "Size: WxH"
    becomes "Size-1"/"Size-2"; JSON-quoted values are unquoted; an empty value is dropped
    (A1111 fails on it and skips the key). Missing "Clip skip", "RNG" and "Schedule type"
    get A1111's defaults ("1", "GPU", "Automatic"). A1111's UI-only steps (prompt styles,
    hires-fix and inpaint form defaults) are not reproduced. The prompts go through
    unescape_newlines; a raw multi-line prompt (as A1111 writes them) keeps its lines.
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
            line = line[len("Negative prompt:") :].strip()
        (negative_lines if in_negative else prompt_lines).append(line)

    result = {
        "Prompt": unescape_newlines("\n".join(prompt_lines)),
        "Negative prompt": unescape_newlines("\n".join(negative_lines)),
    }
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


def _boolean(text: str) -> bool:
    """ "True"/"False" as Python writes them (A1111's infotexts hold bools this way too)."""
    if text not in ("True", "False"):
        raise ValueError(text)
    return text == "True"


_boolean.__name__ = "boolean (True or False)"

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
    "Token merging ratio": ("token_merging_ratio", float),
    "Init image hash": ("init_image_hash", str),
    "Eta": ("eta", float),
    "Mask blur": ("mask_blur", int),
    "Refiner": ("refiner", str),
    "Refiner switch at": ("refiner_switch_at", float),
    "Aesthetic score": ("aesthetic_score", float),
    "Negative aesthetic score": ("negative_aesthetic_score", float),
    "Lora hashes": ("lora_hashes", str),
    "TI hashes": ("ti_hashes", str),
    "Guidance cutoff": ("guidance_cutoff", float),
    "Deep cache": ("deep_cache", str),
    "NaN fallback": ("nan_fallback", str),
    "Mask hash": ("mask_hash", str),
    "Keep unmasked": ("keep_unmasked", _boolean),
    "Crop top": ("crop_top", int),
    "Crop left": ("crop_left", int),
    "Negative original size-1": ("negative_original_width", int),
    "Negative original size-2": ("negative_original_height", int),
    "Negative target size-1": ("negative_target_width", int),
    "Negative target size-2": ("negative_target_height", int),
    "Negative crop top": ("negative_crop_top", int),
    "Negative crop left": ("negative_crop_left", int),
    "Batch size": ("batch_size", int),
    "Batch pos": ("batch_pos", int),
    "Model sha256": ("model_sha256", str),
    "Dtype": ("dtype", str),
    "Quantize": ("quantize", str),
    "Device": ("device", str),
    "Sampler settings": ("sampler_settings", str),
    "Version": ("version", str),
}


INFO_LABELS = frozenset(_FROM_LABEL)  # every label info_from_infotext reads


def format_addon_hashes(pairs: list[tuple[str, str]]) -> str | None:
    """A1111's "Lora hashes" / "TI hashes" value: "name: hash, name: hash", with ":" and ","
    taken out of each name so the list reads back; None for no add-ons (the label is left out)."""
    if not pairs:
        return None
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {short}" for name, short in pairs)


def parse_addon_hashes(text: str | None) -> list[tuple[str, str]]:
    """The (name, hash) pairs of a "Lora hashes" / "TI hashes" value; ValueError for a malformed one."""
    pairs = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, colon, short = item.partition(":")
        if not colon or not name.strip() or not short.strip():
            raise ValueError(f"add-on hashes: {item.strip()!r} is not 'name: hash'")
        pairs.append((name.strip(), short.strip()))
    return pairs


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
            raise ValueError(
                f"infotext value for {label!r} is not a valid {kind.__name__}: {parsed[label]!r}"
            ) from None
    return info


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
    """The "parameters" text of a PNG (a path or an opened image), or None when it has none.

    A path is read chunk by chunk without decoding its pixels (diffuse.pngtext): a
    decompression bomb, an oversized text chunk, a truncated or damaged file and a file that
    is not a PNG raise PngTextError (a ValueError) with one line naming the file.
    """
    if isinstance(source, Image.Image):
        return _parameters_of(source)
    return read_png_text(source, PARAMETERS_KEY)


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
