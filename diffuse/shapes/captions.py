"""Scene -> caption in varied phrasings, and caption -> the attributes it states.

Every caption states every object's shape and colour, the background, the position of a
lone object and the relation between two. Sizes are optional words: each object's size
("small"/"large") is mentioned with probability SIZE_MENTION_PROBABILITY, so the model
learns both to obey a size word and to pick a size itself when a prompt has none (the
acceptance prompts name no size). Two-object captions say how the objects relate, not
where they are.

`parse_caption` reads any of these phrasings (and hand-written prompts in the same
words) back into a Scene whose unstated attributes are None: the evaluation turns a
prompt into what the analyzer should find in the generated image.
"""

from __future__ import annotations

import random
import re

from diffuse.shapes.scenes import BACKGROUNDS, COLOURS, INVERSE_RELATION, POSITIONS, SHAPES, SIZES, Scene, Shape

SIZE_MENTION_PROBABILITY = 0.5

# How each grid cell is said in a caption; the first is the plain one.
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left", "at the top left", "in the top left corner"),
    "top": ("at the top", "in the top middle"),
    "top right": ("in the top right", "at the top right", "in the top right corner"),
    "left": ("on the left", "at the left"),
    "center": ("at the center", "in the center", "in the middle"),
    "right": ("on the right", "at the right"),
    "bottom left": ("in the bottom left", "at the bottom left", "in the bottom left corner"),
    "bottom": ("at the bottom", "in the bottom middle"),
    "bottom right": ("in the bottom right", "at the bottom right", "in the bottom right corner"),
}
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
# {obj}/{a}/{b}: "a large red circle"; {bare_obj}/{bare_a}: the same without the article.
SINGLE_TEMPLATES = (
    "{obj} {where} on a {bg} background",
    "{obj} {where}, {bg} background",
    "{bare_obj} {where} on {bg}",
    "{where}, {obj} on a {bg} background",
    "{bg} background with {obj} {where}",
    "{obj} on a {bg} background, {where}",
)
PAIR_TEMPLATES = (
    "{a} {rel} {b} on a {bg} background",
    "{a} {rel} {b}, {bg} background",
    "{bare_a} {rel} {b} on {bg}",
    "on a {bg} background, {a} {rel} {b}",
    "{bg} background with {a} {rel} {b}",
)


def _noun_phrase(obj: Shape, rng: random.Random) -> str:
    words = [obj.colour, obj.kind]
    if obj.size is not None and rng.random() < SIZE_MENTION_PROBABILITY:
        words.insert(0, obj.size)
    return " ".join(words)


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(scene: Scene, rng: random.Random) -> str:
    """One phrasing of the scene, drawn with `rng` (template, synonyms, which sizes to say)."""
    if scene.background is None:
        raise ValueError("a caption needs the scene's background")
    if len(scene.objects) == 1:
        obj = scene.objects[0]
        if obj.position is None:
            raise ValueError("a one-object caption needs the object's position")
        phrase = _noun_phrase(obj, rng)
        template = rng.choice(SINGLE_TEMPLATES)
        return template.format(
            obj=_with_article(phrase),
            bare_obj=phrase,
            bg=scene.background,
            where=rng.choice(POSITION_PHRASES[obj.position]),
        )
    if scene.relation is None:
        raise ValueError("a two-object caption needs the relation between the objects")
    a, rel, b = scene.relation
    if rng.random() < 0.5:  # "a left of b" and "b right of a" describe the same picture
        a, rel, b = b, INVERSE_RELATION[rel], a
    first, second = _noun_phrase(scene.objects[a], rng), _noun_phrase(scene.objects[b], rng)
    template = rng.choice(PAIR_TEMPLATES)
    return template.format(
        a=_with_article(first),
        bare_a=first,
        b=_with_article(second),
        bg=scene.background,
        rel=rng.choice(RELATION_PHRASES[rel]),
    )


def _alternatives(words) -> str:
    # Longest first, so "top left" wins over "top".
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_OBJECT = re.compile(rf"\b(?:({_alternatives(SIZES)})\s+)?({_alternatives(COLOURS)})\s+({_alternatives(SHAPES)})s?\b")
_BACKGROUND = re.compile(rf"\b({_alternatives(BACKGROUNDS)})\b")
_POSITION_WORDS = {
    **{name: name for name in POSITIONS},
    "middle": "center",
    "centre": "center",
    "top middle": "top",
    "bottom middle": "bottom",
    "top center": "top",
    "bottom center": "bottom",
}
_POSITION = re.compile(rf"\b({_alternatives(_POSITION_WORDS)})\b")
_RELATION_WORDS = {
    "left of": "left of",
    "right of": "right of",
    "above": "above",
    "over": "above",
    "below": "below",
    "under": "below",
    "beneath": "below",
}
_RELATION = re.compile(rf"\b({_alternatives(_RELATION_WORDS)})\b")


def parse_caption(text: str) -> Scene:
    """The attributes a caption states, as a Scene with the unstated ones (centres, maybe sizes) None.

    >>> parse_caption("a large blue star at the center, black background").objects
    (Shape(kind='star', colour='blue', size='large', position='center', centre=None),)
    """
    normalised = " ".join(text.lower().replace("-", " ").replace("grey", "gray").replace("centre", "center").split())
    found = list(_OBJECT.finditer(normalised))
    if not 1 <= len(found) <= 2:
        raise ValueError(f"expected one or two '<colour> <shape>' phrases in caption {text!r}, found {len(found)}")
    # Cut the object phrases out, so their colour words are not taken for the background.
    pieces = cut_apart(normalised, found)
    rest = " | ".join(pieces)
    background = _BACKGROUND.search(rest)
    objects = [Shape(kind=m.group(3), colour=m.group(2), size=m.group(1)) for m in found]
    if len(objects) == 1:
        where = _POSITION.search(rest)
        position = _POSITION_WORDS[where.group(1)] if where else None
        return Scene(
            objects=(Shape(objects[0].kind, objects[0].colour, objects[0].size, position),),
            background=background.group(1) if background else None,
        )
    between = _RELATION.search(pieces[1])
    if between is None:
        raise ValueError(f"no relation (left of, right of, above, below) between the two objects in {text!r}")
    return Scene(
        objects=tuple(objects),
        background=background.group(1) if background else None,
        relation=(0, _RELATION_WORDS[between.group(1)], 1),
    )


def cut_apart(text: str, matches: list[re.Match]) -> list[str]:
    """The pieces of text before, between and after the matched spans."""
    pieces, last = [], 0
    for match in matches:
        pieces.append(text[last : match.start()])
        last = match.end()
    pieces.append(text[last:])
    return pieces
