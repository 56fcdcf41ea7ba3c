"""Type and range checks for the fields of a model's config files, run before any field is used.

A config.json is data from whoever made the model folder: a string where a count belongs,
a zero head count or twenty thousand blocks per level must be refused by name, not turn
into a ZeroDivisionError or a network that takes minutes to build. Each layout module
states its file's fields once, as a table of these checks; `check_fields` applies one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

# A check returns None when the value is fine, else what is wrong with it.
Check = Callable[[Any], "str | None"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON's true is not a count


def integer(low: int, high: int) -> Check:
    def check(value: Any) -> str | None:
        if not _is_int(value) or not low <= value <= high:
            return f"must be an integer from {low} to {high}"
        return None

    return check


def number(low: float, high: float, *, above_low: bool = False) -> Check:
    """A finite number in [low, high], or (low, high] with `above_low`."""
    span = f"above {low} and at most {high}" if above_low else f"from {low} to {high}"

    def check(value: Any) -> str | None:
        finite = _is_int(value) or (isinstance(value, float) and math.isfinite(value))
        if not finite or value > high or value < low or (above_low and value == low):
            return f"must be a finite number {span}"
        return None

    return check


def flag(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def text(*choices: str) -> Check:
    """A string; one of `choices` when they are given."""

    def check(value: Any) -> str | None:
        if not isinstance(value, str):
            return "must be a string"
        if choices and value not in choices:
            return f"must be one of {', '.join(map(repr, choices))}"
        return None

    return check


def listing(item: Check, low: int, high: int) -> Check:
    """A list of `low` to `high` values, each passing `item`."""

    def check(value: Any) -> str | None:
        if not isinstance(value, (list, tuple)) or not low <= len(value) <= high:
            return f"must be a list of {low} to {high} entries"
        for i, entry in enumerate(value):
            if (problem := item(entry)) is not None:
                return f"entry {i} {problem}"
        return None

    return check


def one_of(*checks: Check) -> Check:
    """Passes when any of `checks` does (e.g. a count, or a list of counts per level)."""

    def check(value: Any) -> str | None:
        problems = [c(value) for c in checks]
        return None if None in problems else " or ".join(dict.fromkeys(problems))

    return check


def optional(inner: Check) -> Check:
    """null, or a value passing `inner`."""

    def check(value: Any) -> str | None:
        if value is None:
            return None
        problem = inner(value)
        return None if problem is None else f"{problem} (or null)"

    return check


def shown(value: Any, limit: int = 60) -> str:
    """A value as a message quotes it, cut short: a hostile one may be megabytes long."""
    text_ = repr(value)
    return text_ if len(text_) <= limit else text_[: limit - 3] + "..."


def check_fields(config: Any, checks: Mapping[str, Check]) -> None:
    """ValueError "field=value: what is wrong" for the first field of `config` that fails its check.

    Fields without a check are not read by diffuse and are left alone (diffusers' files carry many)."""
    fields = config if isinstance(config, Mapping) else {}
    if fields is not config:
        raise ValueError(f"holds a JSON {type(config).__name__}, not an object of fields")
    for field, check in checks.items():
        if field in config and (problem := check(config[field])) is not None:
            raise ValueError(f"{field}={shown(config[field])}: {problem}")
