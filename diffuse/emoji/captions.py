"""Scene -> caption in varied phrasings, and caption -> what it states, for the emoji world.

A caption always names every picture (by its catalogue name, "dog face", "red apple") and,
for two, how they relate: "a dog face left of a red apple". The rest is said only some of the
time, so the model learns both to obey it and to choose it itself when a prompt is silent: a
lone picture's position (POSITION_MENTION_PROBABILITY), the background
(BACKGROUND_MENTION_PROBABILITY) and each size word (SIZE_MENTION_PROBABILITY). The position
and relation phrases are the shapes world's (diffuse.shapes.captions), one place for both.

`parse_caption(text, names)` reads these phrasings (and hand-written prompts in the same
words) back into a Scene whose unstated attributes are None: the evaluation turns a prompt
into what the judge should find. Names are matched longest first, so "dog face" is never
read as "dog"; a size word is left unsaid where it would make another name ("small airplane"
for a small "airplane"), so every caption reads back as the scene it came from.
"""

from __future__ import annotations

import random
import re
from collections.abc import Collection
from functools import lru_cache

from diffuse.emoji.scenes import BACKGROUNDS, INVERSE_RELATION, POSITIONS, SIZES, Picture, Scene
from diffuse.shapes.captions import POSITION_PHRASES, RELATION_PHRASES, cut_apart

SIZE_MENTION_PROBABILITY = 0.5
POSITION_MENTION_PROBABILITY = 0.75
BACKGROUND_MENTION_PROBABILITY = 0.5

# {obj}: "a small dog face"; {bare_obj}: the same without its article. Keyed by what is said:
# (position, background).
SINGLE_TEMPLATES: dict[tuple[bool, bool], tuple[str, ...]] = {
    (True, True): (
        "{obj} {where} on a {bg} background",
        "{obj} {where}, {bg} background",
        "{where}, {obj} on a {bg} background",
        "{bg} background with {obj} {where}",
        "{obj} on a {bg} background, {where}",
    ),
    (True, False): ("{obj} {where}", "{bare_obj} {where}", "{where}, {obj}"),
    (False, True): ("{obj} on a {bg} background", "{obj}, {bg} background", "{bg} background with {obj}"),
    (False, False): ("{obj}", "{bare_obj}", "a picture of {obj}"),
}
PAIR_TEMPLATES: dict[bool, tuple[str, ...]] = {  # keyed by whether the background is said
    True: (
        "{a} {rel} {b} on a {bg} background",
        "{a} {rel} {b}, {bg} background",
        "on a {bg} background, {a} {rel} {b}",
        "{bg} background with {a} {rel} {b}",
    ),
    False: ("{a} {rel} {b}", "{bare_a} {rel} {b}"),
}


def _noun_phrase(obj: Picture, rng: random.Random, names: Collection[str]) -> str:
    say_size = rng.random() < SIZE_MENTION_PROBABILITY  # drawn always: the phrasing stays seeded alike
    if obj.size is not None and say_size and f"{obj.size} {obj.name}" not in names:
        return f"{obj.size} {obj.name}"
    return obj.name


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(scene: Scene, rng: random.Random, names: Collection[str] = (), *, state_position: bool = False) -> str:
    """One phrasing of the scene, drawn with `rng` (template, synonyms, what to say).

    `names` are all the catalogue's names (to keep size words from making another name);
    `state_position` always says a lone picture's position (the evaluation's prompts ask for it).
    """
    if len(scene.objects) == 1:
        return _single_caption(scene, rng, names, state_position)
    if scene.relation is None:
        raise ValueError("a two-picture caption needs the relation between the pictures")
    a, rel, b = scene.relation
    if rng.random() < 0.5:  # "a left of b" and "b right of a" describe the same picture
        a, rel, b = b, INVERSE_RELATION[rel], a
    first, second = _noun_phrase(scene.objects[a], rng, names), _noun_phrase(scene.objects[b], rng, names)
    say_background = rng.random() < BACKGROUND_MENTION_PROBABILITY and scene.background is not None
    template = rng.choice(PAIR_TEMPLATES[say_background])
    # The relation's phrase is drawn last: a caption with its relation reversed keeps every other choice.
    return template.format(
        a=_with_article(first),
        bare_a=first,
        b=_with_article(second),
        bg=scene.background,
        rel=rng.choice(RELATION_PHRASES[rel]),
    )


def _single_caption(scene: Scene, rng: random.Random, names: Collection[str], state_position: bool) -> str:
    obj = scene.objects[0]
    if state_position and obj.position is None:
        raise ValueError("a caption stating the position needs the picture's position")
    phrase = _noun_phrase(obj, rng, names)
    say_position = (rng.random() < POSITION_MENTION_PROBABILITY or state_position) and obj.position is not None
    say_background = rng.random() < BACKGROUND_MENTION_PROBABILITY and scene.background is not None
    template = rng.choice(SINGLE_TEMPLATES[say_position, say_background])
    where = rng.choice(POSITION_PHRASES[obj.position]) if say_position else ""
    return template.format(obj=_with_article(phrase), bare_obj=phrase, bg=scene.background, where=where)


# ---- reading a caption back ------------------------------------------------------------------------


def normalise(text: str) -> str:
    """Lower case, hyphens as spaces, one space between words, British and American spellings made
    one: names go through it too, so "top-left" and "head-bandage" read either way."""
    text = text.lower().replace("-", " ").replace("grey", "gray").replace("centre", "center")
    return " ".join(text.split())


def _alternatives(words) -> str:
    # Longest first, so "dog face" wins over "dog" and "top left" over "top".
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


def _bare_position(phrase: str) -> str:
    """ "in the top left corner" -> "top left corner": the words a prompt may use without the preposition."""
    return re.sub(r"^(in|at|on) the ", "", phrase)


_POSITION_WORDS = {
    **{name: name for name in POSITIONS},
    **{_bare_position(p): name for name, phrases in POSITION_PHRASES.items() for p in phrases},
    "top center": "top",
    "bottom center": "bottom",
}
_POSITION = re.compile(rf"(?<!\w)({_alternatives(_POSITION_WORDS)})(?!\w)")
_RELATION_WORDS = {p.removeprefix("to the "): rel for rel, phrases in RELATION_PHRASES.items() for p in phrases}
_RELATION = re.compile(rf"(?<!\w)({_alternatives(_RELATION_WORDS)})(?!\w)")
_BACKGROUND = re.compile(rf"(?<!\w)({_alternatives(BACKGROUNDS)})(?!\w)")


@lru_cache(maxsize=4)
def _name_pattern(names: tuple[str, ...]) -> tuple[re.Pattern, dict[str, tuple[str | None, str]]]:
    """A pattern finding any of `names`, with or without a size word before it, and each phrase it
    finds -> (size, name). The longest phrase at a place wins ("small airplane departure" is a small
    "airplane departure", not "small airplane"), and a whole name wins over a size word and a
    shorter name ("small airplane" is itself)."""
    phrases: dict[str, tuple[str | None, str]] = {}
    for name in reversed(names):  # the first of names alike after normalising wins
        for size in SIZES:
            phrases[f"{size} {normalise(name)}"] = (size, name)
    for name in reversed(names):
        phrases[normalise(name)] = (None, name)
    return re.compile(rf"(?<!\w)({_alternatives(phrases)})(?!\w)"), phrases


def reserved_words() -> frozenset[str]:
    """Every word a caption's own phrasing uses besides the names: a name made only of these
    ("top", "light blue") would be found in any caption, so the dataset leaves such names out."""
    templates = [t for ts in (*SINGLE_TEMPLATES.values(), *PAIR_TEMPLATES.values()) for t in ts]
    phrases = [p for ps in (*POSITION_PHRASES.values(), *RELATION_PHRASES.values()) for p in ps]
    text = " ".join([*templates, *phrases, *_POSITION_WORDS, *_RELATION_WORDS, *BACKGROUNDS, *SIZES, "a an"])
    return frozenset(re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", text)))


def parse_caption(text: str, names: Collection[str]) -> Scene:
    """The attributes a caption states, as a Scene with the unstated ones (centres, maybe sizes,
    positions, the background) None. `names`: the pictures a caption may name.

    >>> parse_caption("a small dog face at the top left", ["dog", "dog face"]).objects
    (Picture(name='dog face', size='small', position='top left', centre=None),)
    """
    pattern, phrases = _name_pattern(tuple(names))
    normalised = normalise(text)
    found = list(pattern.finditer(normalised))
    if not 1 <= len(found) <= 2:
        raise ValueError(f"expected one or two picture names in caption {text!r}, found {len(found)}")
    # Cut the names out, so words inside them ("top hat", "black heart") are not read as the scene's.
    pieces = cut_apart(normalised, found)
    rest = " | ".join(pieces)
    background = _BACKGROUND.search(rest)
    background_name = background.group(1) if background else None
    pictures = [Picture(name, size) for size, name in (phrases[m.group(1)] for m in found)]
    if len(pictures) == 1:
        where = _POSITION.search(rest)
        position = _POSITION_WORDS[where.group(1)] if where else None
        return Scene((Picture(pictures[0].name, pictures[0].size, position),), background_name)
    between = _RELATION.search(pieces[1])
    if between is None:
        raise ValueError(f"no relation (left of, right of, above, below) between the two pictures in {text!r}")
    return Scene(tuple(pictures), background_name, (0, _RELATION_WORDS[between.group(1)], 1))
