"""What a PNG's parameters record about how its image was made, turned back into the values
that make it again: the sampler with every setting its plan depends on, and the speed-ups.

A sampler's trajectory depends on more than its name: the model's training noise schedule
(beta schedule, start and end, training steps, prediction type) and options such as the
timestep spacing, the steps offset, Karras' rho or DDIM's final-step rule. "Sampler settings"
records all of them as space-separated `name=value` pairs (no commas or colons, so the
infotext line needs no quoting), so an image can be made again on a model whose own scheduler
config differs, and a changed default shows.
"""

from __future__ import annotations

from dataclasses import asdict, fields, replace

from diffuse.samplers import Sampler, get_sampler
from diffuse.samplers.schedule import NoiseSchedule, SamplerOptions
from diffuse.speedups import Speedups

# "Schedule type" records the sigma ramp; the settings hold everything else.
_NOT_IN_SETTINGS = {"sigma_schedule"}


def sampler_settings(sampler: Sampler) -> str:
    """Every training-schedule field and sampler option of `sampler` as "name=value name=value ..."."""
    values = {**asdict(sampler.schedule), **asdict(sampler.options)}
    return " ".join(f"{name}={value}" for name, value in values.items() if name not in _NOT_IN_SETTINGS)


def eta_of(sampler: Sampler) -> float | None:
    """The eta `sampler` runs with (DDIM's eta, or the ancestral samplers' share of fresh noise);
    None for a sampler that has none. Found as the option that A1111's eta field sets for its name."""
    low, high = (asdict(get_sampler(sampler.name, eta=eta).options) for eta in (0.0, 1.0))
    option = next((name for name in low if low[name] != high[name]), None)
    return None if option is None else float(getattr(sampler.options, option))


def recorded_eta(sampler: Sampler, asked: float | None) -> float | None:
    """The eta a generation records: the one the sampler uses, when it was asked for or differs from
    the sampler's default (A1111 writes Eta only then); None when the sampler has no eta."""
    used = eta_of(sampler)
    if used is None or (asked is None and used == eta_of(get_sampler(sampler.name))):
        return None
    return used


def _typed(cls, name: str, text: str):
    """A settings value as the type of the dataclass field's default (int, float, bool or str)."""
    default = next(f.default for f in fields(cls) if f.name == name)
    if isinstance(default, bool):
        if text not in ("True", "False"):
            raise ValueError(f"Sampler settings: {name}={text!r} is not True or False")
        return text == "True"
    try:
        return type(default)(text)
    except ValueError:
        raise ValueError(f"Sampler settings: {name}={text!r} is not a valid {type(default).__name__}") from None


def sampler_from_record(
    name: str, schedule_type: str | None, settings: str | None, eta: float | None = None
) -> Sampler:
    """The sampler an image's parameters describe, checked now (no model needed).

    With `settings` (diffuse's "Sampler settings") the schedule and options are exactly the
    recorded ones; without (an A1111 image) they are Stable Diffusion's defaults, and `eta`
    applies as A1111's field does. Unknown names, schedule types and settings raise
    ValueError naming them.
    """
    named = get_sampler(name, schedule_type=schedule_type, eta=eta)
    if settings is None:
        return named
    schedule_names = {f.name for f in fields(NoiseSchedule)}
    option_names = {f.name for f in fields(SamplerOptions)} - _NOT_IN_SETTINGS
    schedule, options = {}, {}
    for pair in settings.split():
        key, sep, text = pair.partition("=")
        if not sep:
            raise ValueError(f"Sampler settings: {pair!r} is not name=value")
        if key in schedule_names:
            schedule[key] = _typed(NoiseSchedule, key, text)
        elif key in option_names:
            options[key] = _typed(SamplerOptions, key, text)
        else:
            raise ValueError(f"Sampler settings: unknown setting {key!r}")
    sampler = Sampler(
        named.algorithm,
        replace(SamplerOptions(**options), sigma_schedule=named.options.sigma_schedule),
        NoiseSchedule(**schedule),
    )
    sampler.plan(1)  # an option the algorithm cannot walk fails here, naming itself
    return sampler


def speedups_from_info(info: dict) -> Speedups:
    """The speed-ups an image's info records (absent keys: off)."""
    interval, depth = 1, 1
    deep_cache = info.get("deep_cache")
    if deep_cache is not None:
        parts = str(deep_cache).split("/")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"Deep cache: {deep_cache!r} is not INTERVAL/DEPTH, e.g. 3/1")
        interval, depth = int(parts[0]), int(parts[1])
    cutoff = info.get("guidance_cutoff")
    return Speedups(
        guidance_cutoff=1.0 if cutoff is None else float(cutoff),
        deep_cache_interval=interval,
        deep_cache_depth=depth,
        token_merging=float(info.get("token_merging_ratio") or 0.0),
    )
