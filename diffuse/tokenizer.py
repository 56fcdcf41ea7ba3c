"""CLIP's byte-level BPE tokenizer: prompt text -> the 77 token ids the text encoder reads.

The text conditioning of Stable Diffusion starts here. A prompt is
  1. split on special tokens written literally in it ("<|endoftext|>", SD2's pad "!"),
  2. normalized: NFC, every whitespace run -> one space, lowercased,
  3. pre-tokenized into words (letter runs, single digits, punctuation runs, contractions),
  4. each word's UTF-8 bytes mapped to printable characters and merged by BPE,
     with "</w>" marking the word's last symbol,
  5. wrapped as BOS + ids + EOS, truncated to 77 and padded with the pad id.

The reference is transformers' CLIPTokenizer (what diffusers pipelines use). Since
transformers 5 it runs on the `tokenizers` library with normalizer NFC -> Replace(\\s+, " ")
-> Lowercase; OpenAI's original instead runs ftfy.fix_text, html.unescape (twice) and
strips the text. So here, as in transformers, "&amp;" stays five characters, mojibake
is not repaired, and a special token typed in the prompt becomes that token's id.

Only the standard library and torch are used: the pre-tokenizer's \\p{L} / \\p{N}
classes are read from unicodedata categories.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import re
import unicodedata
from pathlib import Path

import torch

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
CONTEXT_LENGTH = 77  # positions of CLIP's text encoder
BPE_GZ_NAME = "bpe_simple_vocab_16e6.txt.gz"
# transformers stores int(1e30) as model_max_length when none was configured.
_UNSET_MAX_LENGTH = int(1e20)

# Unicode's White_Space property: what the reference's \s matches (Python's
# str.isspace also accepts the separators U+001C..U+001F, which \s does not).
WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000" + "".join(map(chr, range(0x2000, 0x200B)))
)
_WHITESPACE_RUN = re.compile("[" + re.escape("".join(sorted(WHITESPACE))) + "]+")
_CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")  # after an apostrophe, in the pattern's order

# The reference's NFC runs on Unicode 9.0 tables. Characters encoded later (10.0-14.0) that
# take part in canonical ordering (combining class > 0) or composition are unknown there,
# so they act as plain starters: nothing is reordered or composed across them.
_POST_UNICODE_9_MARKS = (
    (0x07FD, 0x07FD),
    (0x0898, 0x089F),
    (0x08CA, 0x08D3),
    (0x09FE, 0x09FE),
    (0x0C3C, 0x0C3C),
    (0x0D3B, 0x0D3C),
    (0x0EBA, 0x0EBA),
    (0x1715, 0x1715),
    (0x1ABF, 0x1ACE),
    (0x1DF6, 0x1DFA),
    (0xA82C, 0xA82C),
    (0x10D24, 0x10D27),
    (0x10EAB, 0x10EAC),
    (0x10F46, 0x10F50),
    (0x10F82, 0x10F85),
    (0x11070, 0x11070),
    (0x1133B, 0x1133B),
    (0x1145E, 0x1145E),
    (0x11839, 0x1183A),
    (0x11930, 0x11930),
    (0x11935, 0x11935),
    (0x11938, 0x11938),
    (0x1193D, 0x1193E),
    (0x11943, 0x11943),
    (0x119E0, 0x119E0),
    (0x11A34, 0x11A34),
    (0x11A47, 0x11A47),
    (0x11A99, 0x11A99),
    (0x11D42, 0x11D42),
    (0x11D44, 0x11D45),
    (0x11D97, 0x11D97),
    (0x16FF0, 0x16FF1),
    (0x1E130, 0x1E136),
    (0x1E2AE, 0x1E2AE),
    (0x1E2EC, 0x1E2EF),
)
_POST_UNICODE_9_SPLIT = re.compile("([" + "".join(f"{chr(a)}-{chr(b)}" for a, b in _POST_UNICODE_9_MARKS) + "])")


def bytes_to_unicode() -> dict[int, str]:
    """Each byte -> one printable character, so BPE works on text without spaces or control bytes.

    Printable Latin-1 bytes stand for themselves; the other 68 are shifted to U+0100 onwards.
    The order of this table is also the order of the first 256 vocabulary entries.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(shifted)}}


def normalize(text: str) -> str:
    """NFC, whitespace runs -> " ", lowercase: the reference's normalizer."""
    pieces = _POST_UNICODE_9_SPLIT.split(text)  # those characters land at the odd positions
    text = "".join(p if k % 2 else unicodedata.normalize("NFC", p) for k, p in enumerate(pieces))
    text = _WHITESPACE_RUN.sub(" ", text)
    # The reference lowercases character by character; str.lower() differs only in
    # its context rule for a word-final capital sigma, so map that one first.
    return text.replace("Σ", "σ").lower()


# \p{L} and \p{N} by general category. Python 3.11's database is Unicode 14.0; the reference's
# regex engine knows newer scripts, which these see as unassigned (punctuation-like).
def _is_letter(ch: str) -> bool:
    return unicodedata.category(ch)[0] == "L"


def _is_number(ch: str) -> bool:
    return unicodedata.category(ch)[0] == "N"


def pre_tokenize(text: str) -> list[str]:
    """Split normalized text into the words BPE sees, scanning like CLIP's pattern
    <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+
    (alternatives tried in that order at each position, whitespace dropped)."""
    words, i, n = [], 0, len(text)
    while i < n:
        ch = text[i]
        special = next((t for t in (BOS_TOKEN, EOS_TOKEN) if text.startswith(t, i)), None)
        if special is not None:
            # The reference's byte-level step splits again with GPT-2's pattern, which cuts
            # these (and only these) pieces at letter/punctuation borders: "<|", "endoftext", "|>".
            words += [special[:2], special[2:-2], special[-2:]]
            i += len(special)
            continue
        if ch == "'":
            suffix = next((c for c in _CONTRACTIONS if text.startswith(c, i + 1)), None)
            if suffix is not None:
                words.append("'" + suffix)
                i += 1 + len(suffix)
                continue
        if ch in WHITESPACE:
            i += 1
            continue
        j = i + 1
        if _is_letter(ch):
            while j < n and _is_letter(text[j]):
                j += 1
        elif not _is_number(ch):  # a run of everything else (punctuation, symbols, emoji)
            while j < n and not (text[j] in WHITESPACE or _is_letter(text[j]) or _is_number(text[j])):
                j += 1
        words.append(text[i:j])
        i = j
    return words


class CLIPTokenizer:
    """CLIP's tokenizer with transformers' behaviour, as data: vocabulary, merge ranks, special tokens.

    `special_tokens` maps a token's text to (id, normalized): such text in a prompt becomes
    that id, matched in the raw prompt, or after normalization when `normalized` is true
    (old SD1 folders mark BOS that way, so "<|StartOfText|>" matches it too).
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        *,
        pad_token: str = EOS_TOKEN,
        special_tokens: dict[str, tuple[int, bool]] | None = None,
        max_length: int = CONTEXT_LENGTH,
        cache_size: int = 20_000,
    ):
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        # BOS, EOS and the pad token are always special; by default matched in the raw text.
        special_tokens = dict(special_tokens or {})
        self.special_tokens = {
            t: (self.vocab[t], False) for t in (BOS_TOKEN, EOS_TOKEN, pad_token) if t not in special_tokens
        }
        self.special_tokens |= special_tokens
        self.id_to_token = {i: t for t, i in self.vocab.items()} | {i: t for t, (i, _) in self.special_tokens.items()}
        self.pad_token = pad_token
        self.max_length = max_length
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self._raw_specials = {t: i for t, (i, norm) in self.special_tokens.items() if not norm}
        self._normalized_specials = {normalize(t): i for t, (i, norm) in self.special_tokens.items() if norm}
        # Prompts repeat words constantly; remember each word's BPE result (bounded).
        self._cache_size = cache_size
        self._word_ids = functools.lru_cache(maxsize=cache_size)(self._bpe)

    # A tokenizer travels to training's data workers by pickling; the word cache is rebuilt there.
    def __getstate__(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key != "_word_ids"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._word_ids = functools.lru_cache(maxsize=self._cache_size)(self._bpe)

    # -- construction ----------------------------------------------------------------

    @classmethod
    def from_bpe_gz(cls, path: str | Path | None = None, pad_token_id: int = 49407) -> CLIPTokenizer:
        """From OpenAI's bpe_simple_vocab_16e6.txt.gz (shipped by the openai-clip package).

        pad_token_id: 49407 (<|endoftext|>) for SD1, 0 ("!") for SD2.
        """
        path = Path(path) if path is not None else find_bpe_gz()
        if not path.is_file():
            raise FileNotFoundError(f"CLIP BPE vocabulary not found: {path}")
        lines = gzip.open(path).read().decode("utf-8").split("\n")
        # Line 0 is a header; CLIP keeps the first 48894 merges so that 256 bytes x 2
        # (plain and word-final) + merges + 2 special tokens make 49408 ids.
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
        symbols = list(bytes_to_unicode().values())
        tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
        return cls({t: i for i, t in enumerate(tokens)}, merges, pad_token=tokens[pad_token_id])

    @classmethod
    def from_folder(cls, path: str | Path) -> CLIPTokenizer:
        """From a diffusers `tokenizer/` folder: tokenizer.json, or vocab.json + merges.txt,
        with special tokens read from tokenizer_config.json / special_tokens_map.json the way
        transformers reads them."""
        folder = Path(path)
        config = _read_json(folder / "tokenizer_config.json")
        added: dict[str, tuple[int, bool]] = {}  # text -> (id, normalized), declared with ids
        if (folder / "tokenizer.json").is_file():
            data = _read_json(folder / "tokenizer.json")
            vocab = data["model"]["vocab"]
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
            added |= {t["content"]: (t["id"], t.get("normalized", False)) for t in data.get("added_tokens", [])}
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = _read_json(folder / "vocab.json")
            lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
            merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
        else:
            raise FileNotFoundError(f"{folder}: no tokenizer.json, nor vocab.json + merges.txt")

        names = ("bos_token", "eos_token", "unk_token", "pad_token")
        entries = {name: config[name] for name in names if config.get(name) is not None}
        if "added_tokens_decoder" in config:
            added |= {
                t["content"]: (int(i), t.get("normalized", False)) for i, t in config["added_tokens_decoder"].items()
            }
        else:  # older saves: special_tokens_map.json overrides the config's entries
            entries |= {
                k: v for k, v in _read_json(folder / "special_tokens_map.json").items() if k in names and v is not None
            }
        # Special tokens join in attribute order; for one text the last entry's flags win,
        # unless the token was already declared with an id (tokenizer.json / config).
        special_tokens = dict(added)
        for name in names:
            if name in entries:
                text, normalized = _token_entry(entries[name])
                special_tokens[text] = added.get(text) or (_vocab_id(vocab, text, folder), normalized)
        pad = _token_entry(entries["pad_token"])[0] if "pad_token" in entries else EOS_TOKEN
        max_length = config.get("model_max_length")
        # Unset (transformers' huge placeholder) means CLIP's own context length.
        if not isinstance(max_length, int) or max_length >= _UNSET_MAX_LENGTH:
            max_length = CONTEXT_LENGTH
        return cls(vocab, merges, pad_token=pad, special_tokens=special_tokens, max_length=max_length)

    def save(self, folder: str | Path) -> None:
        """Write vocab.json, merges.txt and tokenizer_config.json (readable by from_folder and transformers)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_text(
            "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges), encoding="utf-8"
        )
        config = {
            "tokenizer_class": "CLIPTokenizer",
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "unk_token": EOS_TOKEN,
            "pad_token": self.pad_token,
            "model_max_length": self.max_length,
            "added_tokens_decoder": {
                str(i): {
                    "content": t,
                    "lstrip": False,
                    "normalized": norm,
                    "rstrip": False,
                    "single_word": False,
                    "special": True,
                }
                for t, (i, norm) in sorted(self.special_tokens.items(), key=lambda item: item[1][0])
            },
        }
        (folder / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )

    # -- ids -------------------------------------------------------------------------

    @property
    def bos_token_id(self) -> int:
        return self.special_tokens[BOS_TOKEN][0]

    @property
    def eos_token_id(self) -> int:
        return self.special_tokens[EOS_TOKEN][0]

    @property
    def pad_token_id(self) -> int:
        return self.special_tokens[self.pad_token][0]

    def _bpe(self, word: str) -> tuple[int, ...]:
        """Merge one pre-tokenized word: always the lowest-ranked adjacent pair next."""
        chars = [self.byte_encoder[b] for b in word.encode("utf-8")]
        symbols = chars[:-1] + [chars[-1] + END_OF_WORD]
        while len(symbols) > 1:
            ranked = [(self.ranks.get(pair, len(self.ranks)), pair) for pair in zip(symbols, symbols[1:])]
            rank, (first, second) = min(ranked, key=lambda item: item[0])
            if rank == len(self.ranks):
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        unk = self.eos_token_id  # CLIP's unknown token; unreachable with the byte-level vocabulary
        return tuple(self.vocab.get(s, unk) for s in symbols)

    @staticmethod
    def _split_specials(text: str, specials: dict[str, int]) -> list[str | int]:
        """Cut `text` at the leftmost-longest occurrences of `specials`, which become their ids."""
        if not specials:
            return [text] if text else []
        # Longest first, so at one position the alternation prefers the longest token.
        pattern = "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True))
        pieces = re.split(f"({pattern})", text)
        # re.split puts the captured specials at the odd positions.
        return [specials[p] if k % 2 else p for k, p in enumerate(pieces) if p]

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text`, without BOS/EOS and untruncated."""
        ids: list[int] = []
        for raw in self._split_specials(text, self._raw_specials):
            for piece in (
                [raw] if isinstance(raw, int) else self._split_specials(normalize(raw), self._normalized_specials)
            ):
                if isinstance(piece, int):
                    ids.append(piece)
                else:
                    for word in pre_tokenize(piece):
                        ids += self._word_ids(word)
        return ids

    def __call__(self, prompts: str | list[str]) -> torch.LongTensor:
        """[B, max_length] ids: BOS + ids + EOS, the ids cut to fit, padded with the pad id."""
        if isinstance(prompts, str):
            prompts = [prompts]
        rows = torch.full((len(prompts), self.max_length), self.pad_token_id, dtype=torch.long)
        for row, prompt in zip(rows, prompts):
            ids = [self.bos_token_id, *self.encode(prompt)[: self.max_length - 2], self.eos_token_id]
            row[: len(ids)] = torch.tensor(ids)
        return rows

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Ids back to text (lowercased, normalized spacing): for tests and debugging."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        specials = {i for i, _ in self.special_tokens.values()}
        tokens = [self.id_to_token[i] for i in ids if not (skip_special_tokens and i in specials)]
        data = bytes(self.byte_decoder[c] for c in "".join(tokens))
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip("".join(WHITESPACE))


def find_bpe_gz() -> Path:
    """OpenAI's BPE file inside an installed package, located without importing the package."""
    for package in ("clip", "open_clip"):  # openai-clip and clip-anytorch install `clip`
        spec = importlib.util.find_spec(package)
        for location in (spec.submodule_search_locations or []) if spec else []:
            if (Path(location) / BPE_GZ_NAME).is_file():
                return Path(location) / BPE_GZ_NAME
    raise FileNotFoundError(
        f"CLIP's BPE vocabulary ({BPE_GZ_NAME}) was not found: install the "
        "`openai-clip` package (pip install openai-clip==1.0.1), or pass its path"
    )


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_entry(value: str | dict) -> tuple[str, bool]:
    """A special token as configs write it: "text", or an AddedToken dict with flags."""
    if isinstance(value, str):
        return value, False
    if value.get("lstrip") or value.get("rstrip") or value.get("single_word"):
        raise ValueError(f"special token {value['content']!r}: lstrip/rstrip/single_word are not supported")
    return value["content"], bool(value.get("normalized", False))


def _vocab_id(vocab: dict[str, int], text: str, folder: Path) -> int:
    if text not in vocab:
        raise ValueError(f"{folder}: special token {text!r} is not in the vocabulary")
    return vocab[text]
