"""A1111's add-on syntax in prompts: `<lora:NAME:W>` and its relatives, read and taken out of the text.

A1111 (extra_networks.py) finds every `<kind:args>` with the pattern `<(\\w+):([^>]+)>`,
replaces it by the empty string (the commas and spaces around it stay) and splits the
arguments on ":". For `lora` and its alias `lyco`:

    <lora:NAME>                   text-encoder and UNet weights 1.0
    <lora:NAME:W>                 both W
    <lora:NAME:TE_W:UNET_W>       each its own (the UNet weight defaults to the TE weight)
    <lora:NAME:te=W:unet=W>       named arguments, overriding the positional ones

Choices made here where A1111 is lenient, so nothing asked for is silently dropped:
  - `dyn=` / a fourth positional argument (DyLoRA's rank slice) is refused: it would
    change the result and is not supported.
  - another tag kind (`<hypernet:...>`, ...) is refused rather than skipped with a log
    line: it would otherwise vanish from the image without a word.
  - a weight that is not a finite number, an empty name, an unknown named argument or
    extra arguments are refused.
Every refusal is a ValueError of one line that quotes the tag.

The name is kept exactly as written (A1111 looks it up exactly, case-sensitively).
Tags count in negative prompts too (the issue asks for it; A1111 reads positive ones).

Public API:
  split_lora_tags(prompt) -> (text, [LoraTag])
  split_lora_tags_pair(prompt, negative_prompt) -> (text, negative_text, [LoraTag])
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

TAG = re.compile(r"<(\w+):([^>]+)>")
LORA_KINDS = ("lora", "lyco")  # "lyco" is A1111's alias of the same handler


@dataclass(frozen=True)
class LoraTag:
    """One `<lora:...>` / `<lyco:...>` tag: the name as written and the two weights it asks for."""

    name: str
    te_weight: float = 1.0
    unet_weight: float = 1.0
    kind: str = "lora"


def split_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """The prompt with every add-on tag removed, and the tags in the order written."""
    tags: list[LoraTag] = []

    def take(match: re.Match) -> str:
        tags.append(_lora_tag(match))
        return ""

    return TAG.sub(take, prompt), tags


def split_lora_tags_pair(prompt: str, negative_prompt: str) -> tuple[str, str, list[LoraTag]]:
    """Both prompts without their tags, and the tags of both: the prompt's first, then the negative's."""
    text, tags = split_lora_tags(prompt)
    negative_text, negative_tags = split_lora_tags(negative_prompt)
    return text, negative_text, tags + negative_tags


def rename_lora(prompt: str, old: str, new: str) -> str:
    """The prompt with every `<lora:OLD...>` / `<lyco:OLD...>` tag naming `new` instead, the rest of each tag kept."""

    def renamed(match: re.Match) -> str:
        name, colon, rest = match.group(2).partition(":")
        if match.group(1) not in LORA_KINDS or name != old:
            return match.group(0)
        return f"<{match.group(1)}:{new}{colon}{rest}>"

    return TAG.sub(renamed, prompt)


def names_lora(prompt: str, name: str) -> bool:
    """Whether a `<lora:...>` / `<lyco:...>` tag of the prompt names `name`."""
    return any(m.group(1) in LORA_KINDS and m.group(2).partition(":")[0] == name for m in TAG.finditer(prompt))


def _lora_tag(match: re.Match) -> LoraTag:
    tag, kind = match.group(0), match.group(1)
    if kind not in LORA_KINDS:
        raise ValueError(f"prompt tag {tag!r}: unsupported add-on kind {kind!r} (only <lora:...> and <lyco:...>)")
    positional, named = _arguments(match.group(2).split(":"), tag)
    if not positional or not positional[0]:
        raise ValueError(f"prompt tag {tag!r} names no LoRA (expected <{kind}:NAME:WEIGHT>)")
    if "dyn" in named or len(positional) > 3:
        raise ValueError(f"prompt tag {tag!r}: DyLoRA rank slicing (dyn) is not supported")
    te_weight = _weight(named.get("te", positional[1] if len(positional) > 1 else "1"), tag)
    unet_weight = _weight(named.get("unet", positional[2] if len(positional) > 2 else str(te_weight)), tag)
    return LoraTag(positional[0], te_weight, unet_weight, kind)


def _arguments(items: list[str], tag: str) -> tuple[list[str], dict[str, str]]:
    """A1111's ExtraNetworkParams: items with "=" are named, the rest positional."""
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            positional.append(item)
            continue
        key, value = item.split("=", 1)
        if key.strip() not in ("te", "unet", "dyn"):
            raise ValueError(f"prompt tag {tag!r}: unknown argument {key!r} (expected te=, unet=)")
        named[key.strip()] = value
    return positional, named


def _weight(value: str, tag: str) -> float:
    try:
        weight = float(value)
    except ValueError:
        raise ValueError(f"prompt tag {tag!r}: weight {value!r} is not a number") from None
    if not math.isfinite(weight):
        raise ValueError(f"prompt tag {tag!r}: weight {value!r} is not a finite number")
    return weight
