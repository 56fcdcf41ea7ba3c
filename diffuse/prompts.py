"""Prompt text -> text conditioning, the way AUTOMATIC1111's web UI reads prompts.

Three steps, each reproducing A1111's behaviour so its prompts give the same context:
  1. parse_attention: emphasis syntax. "(word)" weights a span x1.1, "[word]" /1.1,
     "(word:1.3)" sets a factor, nesting multiplies, "\\(" etc. are literal brackets,
     and the keyword BREAK becomes its own segment.
  2. prompt_chunks: the segments' token ids are packed into chunks of 75 (CLIP sees 77
     positions: BOS + 75 + EOS), so a prompt is not cut off at 77 tokens. A full chunk
     is broken after a recent comma rather than mid-phrase, and BREAK starts a new one.
     A textual-inversion embedding's name in the text takes one slot per vector (never
     split between chunks); its vectors replace those slots' token vectors.
  3. encode_prompts: every chunk goes through the text encoder on its own; each token's
     hidden state is scaled by its weight, the chunk rescaled to keep its mean, and the
     chunks are laid end to end: context [B, 77*k, D] that the UNet cross-attends to.
     Cross-attention does not care about the context's length, so longer prompts just
     give the UNet more tokens to look at.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from diffuse.models.clip import CLIPTextEncoder
from diffuse.tokenizer import CONTEXT_LENGTH, CLIPTokenizer

CHUNK_TOKENS = CONTEXT_LENGTH - 2  # prompt tokens per chunk, between BOS and EOS
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack: how far back a comma may end a full chunk
ROUND_FACTOR = 1.1  # "(word)"; "[word]" divides by it
BREAK_WEIGHT = -1.0  # marks the BREAK segment, as in A1111

# One emphasis token per match; alternatives are tried in this order. An escaped bracket
# or backslash, a lone backslash (dropped), an opening bracket, ":number)" closing a
# round bracket with an explicit factor, a closing bracket, plain text, a lone colon.
_EMPHASIS_TOKEN = re.compile(
    r"""
    (?P<escaped>\\[()\[\]\\]) | (?P<backslash>\\)
  | (?P<open>[(\[])
  | :(?P<factor>[+-]?[.\d]+)\)
  | (?P<close>[)\]])
  | (?P<text>[^\\()\[\]:]+ | :)
""",
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) segments by A1111's emphasis rules.

    >>> parse_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]

    A bracket left open at the end still applies to everything after it (round ones
    first, then square ones); a closing bracket with nothing open is plain text.
    BREAK (upper case, a word on its own) outside brackets becomes ("BREAK", -1.0).
    Inside brackets its marker weight gets multiplied like any other and it is then
    read as the word "break", exactly as A1111 does. Neighbouring segments of equal
    weight are merged; an empty prompt is [("", 1.0)].
    """
    segments, open_round, open_square = _bracketed_segments(text)
    for start in open_round:
        _scale_from(segments, start, ROUND_FACTOR)
    for start in open_square:
        _scale_from(segments, start, 1 / ROUND_FACTOR)
    return _merge_equal_weights(segments or [["", 1.0]])


def _bracketed_segments(text: str) -> tuple[list[list], list[int], list[int]]:
    """[text, weight] segments with the factors of the brackets closed so far, and where the
    round and square brackets still open start (as indices into the segments)."""
    segments: list[list] = []  # mutable while brackets close
    open_round: list[int] = []
    open_square: list[int] = []
    for match in _EMPHASIS_TOKEN.finditer(text):
        kind, token = match.lastgroup, match.group(0)
        if kind == "escaped":
            segments.append([token[1], 1.0])
        elif kind == "backslash":
            continue
        elif kind == "open":
            (open_round if token == "(" else open_square).append(len(segments))
        elif kind == "factor" and open_round:
            _scale_from(segments, open_round.pop(), _explicit_factor(match.group("factor"), text))
        elif token == ")" and open_round:
            _scale_from(segments, open_round.pop(), ROUND_FACTOR)
        elif token == "]" and open_square:
            _scale_from(segments, open_square.pop(), 1 / ROUND_FACTOR)
        else:  # plain text, including brackets and ":1.2)" that close nothing
            segments.extend(_plain_segments(token))
    return segments, open_round, open_square


def _scale_from(segments: list[list], start: int, factor: float) -> None:
    for segment in segments[start:]:
        segment[1] *= factor


def _explicit_factor(factor: str, text: str) -> float:
    try:
        return float(factor)
    except ValueError:
        raise ValueError(f"prompt weight {factor!r} in {text!r} is not a number") from None


def _plain_segments(token: str) -> list[list]:
    """Unweighted text, with each BREAK keyword as its own marker segment."""
    segments: list[list] = []
    for k, part in enumerate(_BREAK.split(token)):
        if k > 0:
            segments.append(["BREAK", BREAK_WEIGHT])
        segments.append([part, 1.0])
    return segments


def _merge_equal_weights(segments: list[list]) -> list[tuple[str, float]]:
    merged: list[list] = []
    for segment in segments:
        if merged and merged[-1][1] == segment[1]:
            merged[-1][0] += segment[0]
        else:
            merged.append(segment)
    return [(segment_text, weight) for segment_text, weight in merged]


class TokenVectors(Protocol):
    """What a prompt needs of a textual-inversion embedding (diffuse.adapters.embeddings.Embedding)."""

    vectors: torch.Tensor  # [n, D]: n token slots, D the text encoder's width


@dataclass(frozen=True)
class PromptChunk:
    """One pass of the text encoder: BOS + 75 prompt tokens (EOS-padded) + EOS, and per-token weights.

    `fixes` lists (position in `ids`, embedding name) for each embedding written in the prompt: its
    n vectors replace the token vectors at positions p..p+n-1 (whose ids are placeholders).
    """

    ids: tuple[int, ...]
    weights: tuple[float, ...]
    fixes: tuple[tuple[int, str], ...] = ()


EMBEDDING_PLACEHOLDER = 0  # the id A1111 puts in an embedding's slots; its token vector is replaced


def prompt_chunks(
    tokenizer: CLIPTokenizer, text: str, embeddings: Mapping[str, TokenVectors] | None = None
) -> list[PromptChunk]:
    """A prompt's token ids and weights in chunks of 77, as A1111 packs them.

    Each segment from parse_attention is tokenized on its own (so BPE never merges
    across an emphasis boundary). When a chunk is full and the next token is not a
    comma, the tokens after the last comma are moved on to the next chunk if that
    comma is at most COMMA_BACKTRACK tokens back, so a phrase is not split between
    two encoder passes. An empty prompt still gives one chunk.

    An embedding's name in a segment (matched on token ids, longest name first, so
    case and neighbouring punctuation do not matter as far as the tokenizer
    lowercases and splits) takes as many slots as it has vectors, each with the
    segment's weight; if they do not fit in the current chunk a new one starts.
    """
    packer = _ChunkPacker(tokenizer)
    lookup = _embedding_lookup(tokenizer, embeddings or {})
    for segment, weight in parse_attention(text):
        if segment == "BREAK" and weight == BREAK_WEIGHT:
            packer.finish_chunk()
            continue
        tokens = tokenizer.encode(segment)
        position = 0
        while position < len(tokens):
            packer.make_room(tokens[position])
            found = _embedding_at(lookup, tokens, position)
            if found is None:
                packer.add(tokens[position], weight)
                position += 1
            else:
                name, matched = found
                packer.add_embedding(name, embeddings[name].vectors.shape[0], weight)
                position += matched
    return packer.finished()


class _ChunkPacker:
    """The chunk being filled (ids without BOS/EOS, weights, embedding fixes) and the chunks done."""

    def __init__(self, tokenizer: CLIPTokenizer):
        self.tokenizer = tokenizer
        self.comma = _comma_id(tokenizer)
        self.chunks: list[PromptChunk] = []
        self.ids: list[int] = []
        self.weights: list[float] = []
        self.fixes: list[tuple[int, str]] = []
        self.last_comma = -1  # index in `ids` of the chunk's last comma

    def finish_chunk(self) -> None:
        self.chunks.append(_framed(self.tokenizer, self.ids, self.weights, self.fixes))
        self.ids, self.weights, self.fixes, self.last_comma = [], [], [], -1

    def make_room(self, token: int) -> None:
        """A1111's check before each token: a full chunk ends at a recent comma, or where it is."""
        ids = self.ids
        if token == self.comma:
            self.last_comma = len(ids)
        elif len(ids) == CHUNK_TOKENS and self.last_comma != -1 and len(ids) - self.last_comma <= COMMA_BACKTRACK:
            cut = self.last_comma + 1
            # An embedding's slots after the comma move with it (A1111 leaves its fix behind).
            moved_fixes = [(at - cut, name) for at, name in self.fixes if at >= cut]
            moved = ids[cut:], self.weights[cut:], moved_fixes
            self.ids, self.weights = ids[:cut], self.weights[:cut]
            self.fixes = [(at, name) for at, name in self.fixes if at < cut]
            self.finish_chunk()
            self.ids, self.weights, self.fixes = (list(part) for part in moved)
        if len(self.ids) == CHUNK_TOKENS:
            self.finish_chunk()

    def add(self, token: int, weight: float) -> None:
        self.ids.append(token)
        self.weights.append(weight)

    def add_embedding(self, name: str, count: int, weight: float) -> None:
        """n slots for an embedding's n vectors, in a new chunk when they do not fit in this one."""
        if count > CHUNK_TOKENS:
            raise ValueError(f"embedding {name!r} has {count} vectors; a prompt chunk holds {CHUNK_TOKENS}")
        if len(self.ids) + count > CHUNK_TOKENS:
            self.finish_chunk()
        self.fixes.append((len(self.ids), name))
        self.ids += [EMBEDDING_PLACEHOLDER] * count
        self.weights += [weight] * count

    def finished(self) -> list[PromptChunk]:
        if self.ids or not self.chunks:
            self.finish_chunk()
        return self.chunks


def _embedding_lookup(
    tokenizer: CLIPTokenizer, embeddings: Mapping[str, TokenVectors]
) -> dict[int, list[tuple[tuple[int, ...], str]]]:
    """Each name's token ids under its first id, longest first (A1111's ids_lookup)."""
    lookup: dict[int, list[tuple[tuple[int, ...], str]]] = {}
    for name in embeddings:
        ids = tuple(tokenizer.encode(name))
        if ids:
            lookup.setdefault(ids[0], []).append((ids, name))
    for candidates in lookup.values():
        candidates.sort(key=lambda candidate: len(candidate[0]), reverse=True)
    return lookup


def _embedding_at(lookup: dict, tokens: list[int], position: int) -> tuple[str, int] | None:
    """(name, ids matched) of the longest embedding name starting at `position`, if any."""
    for ids, name in lookup.get(tokens[position], ()):
        if tuple(tokens[position : position + len(ids)]) == ids:
            return name, len(ids)
    return None


def _comma_id(tokenizer: CLIPTokenizer) -> int | None:
    ids = tokenizer.encode(",")
    return ids[0] if len(ids) == 1 else None


def _framed(
    tokenizer: CLIPTokenizer, ids: list[int], weights: list[float], fixes: list[tuple[int, str]]
) -> PromptChunk:
    """BOS + ids + EOS padding to 77; after the first EOS, the tokenizer's pad id; fixes shifted past BOS.

    SD1 pads with EOS itself; SD2 was trained with "!" (id 0) after the EOS, so those
    positions must hold the pad id for its text encoder to see what it was trained on.
    """
    fill = CHUNK_TOKENS - len(ids)
    framed = [tokenizer.bos_token_id, *ids, *[tokenizer.eos_token_id] * (fill + 1)]
    if tokenizer.pad_token_id != tokenizer.eos_token_id:
        first_eos = framed.index(tokenizer.eos_token_id)
        framed[first_eos + 1 :] = [tokenizer.pad_token_id] * (len(framed) - first_eos - 1)
    shifted = tuple((at + 1, name) for at, name in fixes)
    return PromptChunk(ids=tuple(framed), weights=(1.0, *weights, *[1.0] * (fill + 1)), fixes=shifted)


def encode_chunks(
    text_encoder: CLIPTextEncoder,
    chunks: list[PromptChunk],
    clip_skip: int = 1,
    embeddings: Mapping[str, TokenVectors] | None = None,
) -> torch.Tensor:
    """Chunks -> weighted hidden states [N, 77, D], all in one encoder call.

    A1111's "Original" emphasis: multiply each token's hidden state by its weight, then
    rescale the chunk so its mean over tokens and channels is what it was, which keeps
    the overall magnitude the UNet was trained on. Done in float32 whatever the encoder's
    dtype; a chunk with no weights other than 1 comes back bit for bit unchanged.
    Unlike A1111, the mean is taken per chunk rather than over the whole batch, so a
    prompt's conditioning does not depend on the other prompts encoded with it.
    The chunks' embedding fixes take their vectors from `embeddings`, by name.
    """
    if not chunks:
        raise ValueError("no prompt chunks to encode")
    device = next(text_encoder.parameters()).device
    ids = torch.tensor([chunk.ids for chunk in chunks], dtype=torch.long, device=device)
    if any(chunk.fixes for chunk in chunks):
        vectors = token_vectors(text_encoder, ids, chunks, embeddings or {})
        hidden = text_encoder(ids, clip_skip=clip_skip, token_embeddings=vectors)
    else:  # the plain call, so prompts without embeddings encode exactly as before
        hidden = text_encoder(ids, clip_skip=clip_skip)
    return apply_weights(hidden, chunks)


def apply_weights(hidden: torch.Tensor, chunks: list[PromptChunk]) -> torch.Tensor:
    """A1111's "Original" emphasis on hidden states [N, 77, D] of `chunks` (see encode_chunks);
    `hidden` itself when no chunk weights a token."""
    device = hidden.device
    weights = torch.tensor([chunk.weights for chunk in chunks], dtype=torch.float32, device=device)
    weighted_rows = (weights != 1.0).any(dim=1)
    if not bool(weighted_rows.any()):
        return hidden
    z = hidden[weighted_rows].float()
    scaled = z * weights[weighted_rows, :, None]
    scaled = scaled * (z.mean(dim=(1, 2), keepdim=True) / scaled.mean(dim=(1, 2), keepdim=True))
    hidden = hidden.clone()
    hidden[weighted_rows] = scaled.to(hidden.dtype)
    return hidden


def token_vectors(
    text_encoder: CLIPTextEncoder, ids: torch.Tensor, chunks: list[PromptChunk], embeddings: Mapping[str, TokenVectors]
) -> torch.Tensor:
    """The encoder's token vectors for `ids` [N, 77, D], each fix's slots overwritten by its embedding's
    vectors: where A1111 (and diffusers, by new rows of the token table) put them."""
    table = text_encoder.embeddings.token_embedding
    tokens = table(ids)
    for row, chunk in enumerate(chunks):
        for at, name in chunk.fixes:
            if name not in embeddings:
                raise ValueError(f"prompt chunk uses embedding {name!r}, which was not given")
            vectors = embeddings[name].vectors
            if vectors.shape[-1] != table.embedding_dim:
                raise ValueError(
                    f"embedding {name!r} is {vectors.shape[-1]} wide; this text encoder's tokens are "
                    f"{table.embedding_dim} wide"
                )
            tokens[row, at : at + vectors.shape[0]] = vectors.to(tokens.device, tokens.dtype)
    return tokens


def encode_prompts(
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextEncoder,
    prompts: list[str],
    clip_skip: int = 1,
    embeddings: Mapping[str, TokenVectors] | None = None,
) -> torch.Tensor:
    """Prompts -> text conditioning [B, 77*k, D], k the largest chunk count among them.

    A prompt with fewer chunks is filled up with the empty prompt's encoding, which is
    what A1111 appends when a conditioning has to be made longer. `embeddings` maps a
    name that may appear in the prompts to its textual-inversion vectors; None or empty
    gives exactly what the prompts alone give.
    """
    return _encode_padded(tokenizer, text_encoder, _checked(prompts, "prompts"), clip_skip, embeddings)


def encode_prompt_pair(
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextEncoder,
    prompts: list[str],
    negative_prompts: list[str],
    clip_skip: int = 1,
    embeddings: Mapping[str, TokenVectors] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) for classifier-free guidance, both [B, 77*k, D] with the same k.

    The shorter side is filled with empty-prompt chunks so the two can be stacked into
    one UNet batch; both are encoded in the same encoder call. Embeddings (as in
    encode_prompts) work in the negative prompts as in the prompts.
    """
    prompts, negative_prompts = _checked(prompts, "prompts"), _checked(negative_prompts, "negative_prompts")
    if len(prompts) != len(negative_prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(negative_prompts)} negative prompts; they must pair up")
    both = _encode_padded(tokenizer, text_encoder, prompts + negative_prompts, clip_skip, embeddings)
    return both[: len(prompts)], both[len(prompts) :]


def _encode_padded(
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextEncoder,
    texts: list[str],
    clip_skip: int,
    embeddings: Mapping[str, TokenVectors] | None,
) -> torch.Tensor:
    unique = list(dict.fromkeys(texts))  # a batch often repeats one prompt: encode it once
    per_text = [prompt_chunks(tokenizer, text, embeddings) for text in unique]
    count = max(len(chunks) for chunks in per_text)
    needs_padding = any(len(chunks) < count for chunks in per_text)
    flat = [chunk for chunks in per_text for chunk in chunks]
    empty = prompt_chunks(tokenizer, "") if needs_padding else []  # one chunk, encoded once, reused
    hidden = encode_chunks(text_encoder, flat + empty, clip_skip, embeddings)

    rows, start = {}, 0
    for text, chunks in zip(unique, per_text):
        parts = list(hidden[start : start + len(chunks)]) + [hidden[-1]] * (count - len(chunks))
        rows[text] = torch.cat(parts, dim=0)
        start += len(chunks)
    return torch.stack([rows[text] for text in texts])


def _checked(prompts: list[str], name: str) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{name} must be a non-empty list of strings, got {prompts!r}")
    return list(prompts)
