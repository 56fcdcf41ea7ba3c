"""diffuse's CLIP tokenizer against transformers' CLIPTokenizer (the tokenizer diffusers
pipelines use), on generated prompts, every assigned Unicode character, and saved folders."""

from __future__ import annotations

import json
import random
import shutil
import unicodedata

import pytest
import torch
from conftest import reference_tokenizer

from diffuse.tokenizer import CLIPTokenizer, find_bpe_gz

PAD_ID = {"sd1": 49407, "sd2": 0}

WORDS = [
    "a",
    "photo",
    "of",
    "the",
    "cat",
    "Portrait",
    "LANDSCAPE",
    "masterpiece",
    "best",
    "quality",
    "highly",
    "detailed",
    "octane",
    "render",
    "trending",
    "on",
    "artstation",
    "by",
    "greg",
    "rutkowski",
    "with",
    "and",
    "hdr",
    "bokeh",
    "photorealistic",
    "Unreal",
    "Engine",
    "cyberpunk",
    "McDonald",
    "iPhone",
    "x",
    "I",
    "supercalifragilistic",
    "café",
    "naïve",
    "résumé",
    "Zürich",
    "straße",
    "ÆON",
    "œuvre",
    "İstanbul",
    "ΣΟΦΊΑ",
    "ὈΔΥΣΣΕΎΣ",
    "Москва",
    "привет",
    "ЁЖИК",
    "القاهرة",
    "שלום",
    "東京",
    "猫",
    "可爱的猫咪",
    "고양이",
    "ねこ",
    "カタカナ",
    "हिन्दी",
    "ภาษาไทย",
]
PIECES = {
    "numbers": [
        "1,000",
        "3.14",
        "2x",
        "1024x768",
        "-5",
        "+3",
        "0.5",
        "10%",
        "1e-4",
        "2023-01-01",
        "42",
        "٣٤",
        "५",
        "Ⅻ",
        "²",
        "½",
        "¹⁰",
        "①",
        "0x1F",
        "x2",
        "v1.5",
        "4k",
        "8K",
        "f/1.8",
        "35mm",
    ],
    "punctuation": [
        "!",
        "!!",
        "...",
        "?!",
        ",",
        ";",
        ":",
        "--",
        "—",
        "…",
        "***",
        "#",
        "@",
        "$",
        "&",
        "|",
        "<",
        ">",
        "<<>>",
        "~",
        "^",
        "`",
        "\\",
        "/",
        '"',
        "“",
        "”",
        "«",
        "»",
        "'",
        "''",
        "’",
        "!?!?",
        ",,",
        "._.",
        "€",
    ],
    "contractions": [
        "it's",
        "IT'S",
        "don't",
        "DON'T",
        "we're",
        "WE'RE",
        "I've",
        "I'VE",
        "I'm",
        "I'M",
        "you'll",
        "YOU'LL",
        "he'd",
        "HE'D",
        "it’s",
        "don’t",
        "'s",
        "'",
        "rock'n'roll",
        "''s",
        "o'clock",
        "'t'",
        "l'amour",
        "'sup",
        "'LL",
        "'d'",
        "!'s",
        "'re'",
        "cats'",
    ],
    "a1111": [
        "(masterpiece:1.2)",
        "[blurry]",
        "{x}",
        "((best quality))",
        "(red hair:0.8)",
        "[cat|dog]",
        "[a:b:0.5]",
        "<lora:foo_v2:0.7>",
        "\\(escaped\\)",
        "BREAK",
        "AND",
        "(((eyes)))",
        "[[[low]]]",
        "{a|b|c}",
    ],
    "emoji": ["😀", "🐱‍👤", "👍🏽", "🇫🇷", "❤️", "✨", "🔥🔥", "😀😀😀", "©", "™", "→", "♪"],
    "unicode": [
        "e\u0301",
        "n\u0303o",
        "A\u030a",
        "Å",
        "ﬁ",
        "Ω",
        "K",
        "İ",
        "ß",
        "ẞ",
        "ǅ",
        "ΐ",
        "Ꭰ",
        "a\u0308\u0323",
        "\u0301",
        "\u1100\u1161",
        "\u200b",
        "\u200d",
        "\ufeff",
        "\u00ad",
        "\x00",
        "\x1c",
        "\x7f",
        "ㄱ",
        "Σ",
        "ΌΣ",
        "ᾼ",
        "ﬀ",
        "ǈ",
        "\u0130i",
        "\U0001d400",
        "\ue000",
    ],
    "whitespace": [
        " ",
        "  ",
        "\t",
        "\n",
        "\r\n",
        "\u3000",
        "\u00a0",
        "\u2003",
        "\x0b",
        "\x0c",
        "\x85",
        "\u2028",
        "\u180e",
        " \t \n ",
    ],
    "html": ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;", "&nbsp;", "&#x27;", "a&amp;b"],
    "special": [
        "<|startoftext|>",
        "<|endoftext|>",
        "<|EndOfText|>",
        "<|endoftext",
        "<|startoftext|><|endoftext|>",
        "x<|endoftext|>y",
        "<<|endoftext|>>",
        "!<|endoftext|>",
        "<|ENDOFTEXT|>!",
    ],
}
SEPARATORS = ["", " ", " ", " ", ", ", "  ", "\t", "\n", ",", " | "]


def generated_prompts(count: int = 600, seed: int = 0) -> list[str]:
    """Deterministic, varied prompts (plus a few fixed edge cases)."""
    rng = random.Random(seed)
    kinds = list(PIECES)
    prompts = ["", " ", "\n\t ", "a photo of a cat", "  leading and trailing  ", "!", "!!!", "ǅungla"]
    prompts += [" ".join(rng.choices(WORDS, k=n)) for n in (40, 80, 150)]  # longer than 75 tokens: truncation
    prompts += ["(masterpiece:1.2), " * 30, "🔥" * 100, "东京" * 100, "1,000 " * 60]
    while len(prompts) < count:
        parts = []
        for _ in range(rng.randint(1, 12)):
            parts.append(rng.choice(WORDS) if rng.random() < 0.4 else rng.choice(PIECES[rng.choice(kinds)]))
            parts.append(rng.choice(SEPARATORS))
        text = "".join(parts)
        roll = rng.random()
        if roll < 0.1:
            text = text.upper()
        elif roll < 0.2:
            text = "".join(c.upper() if rng.random() < 0.5 else c for c in text)
        elif roll < 0.3:
            text = unicodedata.normalize("NFD", text)  # decomposed input must compose back (NFC)
        elif roll < 0.35:
            text = unicodedata.normalize("NFKD", text)
        if rng.random() < 0.2:
            text = rng.choice(SEPARATORS) + text + rng.choice(SEPARATORS)
        prompts.append(text)
    return prompts


PROMPTS = generated_prompts()


@pytest.fixture(scope="module")
def ours() -> dict[str, CLIPTokenizer]:
    return {name: CLIPTokenizer.from_bpe_gz(pad_token_id=pad) for name, pad in PAD_ID.items()}


@pytest.fixture(scope="module")
def refs(clip_vocab_dir):
    return {name: reference_tokenizer(clip_vocab_dir, name) for name in PAD_ID}


def reference_ids(ref, prompts: list[str]) -> torch.Tensor:
    return ref(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def assert_same_rows(ours_ids: torch.Tensor, ref_ids: torch.Tensor, prompts: list[str]) -> None:
    assert ours_ids.shape == ref_ids.shape == (len(prompts), 77)
    differ = [(p, a.tolist(), b.tolist()) for p, a, b in zip(prompts, ours_ids, ref_ids) if not torch.equal(a, b)]
    assert not differ, f"{len(differ)} of {len(prompts)} prompts differ; first: {differ[:3]}"


def test_known_ids(ours):
    ids = [49406, 320, 1125, 539, 320, 2368, 49407]
    for name, pad in PAD_ID.items():
        tok = ours[name]
        assert tok.encode("a photo of a cat") == ids[1:-1]
        assert tok("a photo of a cat").tolist() == [ids + [pad] * 70]
        assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.max_length) == (49406, 49407, pad, 77)
        assert tok.decode(tok("A  Photo of a CAT")[0], skip_special_tokens=True) == "a photo of a cat"


def test_generated_prompts_match_transformers(ours, refs):
    assert len(PROMPTS) >= 500
    for name in PAD_ID:
        assert_same_rows(ours[name](PROMPTS), reference_ids(refs[name], PROMPTS), PROMPTS)
        # encode: the ids alone, untruncated (special tokens typed in the text still count).
        expected = refs[name](PROMPTS, add_special_tokens=False).input_ids
        differ = [p for p, want in zip(PROMPTS, expected) if ours[name].encode(p) != want]
        assert not differ, f"{name}: encode differs on {len(differ)} of {len(PROMPTS)} prompts: {differ[:5]}"
    long = [p for p in PROMPTS if len(ours["sd1"].encode(p)) > 75]
    assert len(long) >= 5  # truncation was exercised
    assert all(row[-1] == 49407 for row in ours["sd1"](long))


def test_every_assigned_character_matches_transformers(ours, refs):
    """Each character Python's Unicode database knows, alone, in letter runs and next to
    digits/punctuation, exercises NFC, the whitespace set, lowercasing and \\p{L}/\\p{N}.
    (Characters newer than that database are classified by the reference's newer tables.)"""
    chars = [chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) not in ("Cn", "Cs", "Co")]
    chunks = ["".join(chars[i : i + 48]) for i in range(0, len(chars), 48)]
    texts = [f"{c}a{c}1{c}{c}!{c}" for c in chars[::7]] + [" ".join(chunk) for chunk in chunks] + chunks
    expected = refs["sd1"](texts, add_special_tokens=False).input_ids
    differ = [t for t, want in zip(texts, expected) if ours["sd1"].encode(t) != want]
    assert not differ, f"{len(differ)} of {len(texts)} texts differ: {[ascii(t) for t in differ[:5]]}"


def test_decode_matches_transformers(ours, refs):
    for name in PAD_ID:
        ids = ours[name](PROMPTS[:100])
        for row in ids:
            for skip in (False, True):
                assert ours[name].decode(row, skip_special_tokens=skip) == refs[name].decode(
                    row.tolist(), skip_special_tokens=skip
                )


def test_from_folder_reference_pipelines(reference_folders, refs):
    from transformers import CLIPTokenizer as HFTokenizer

    for name, folder in reference_folders.items():
        assert (folder / "tokenizer" / "tokenizer.json").is_file()
        tok = CLIPTokenizer.from_folder(folder / "tokenizer")
        assert (tok.pad_token_id, tok.max_length) == (PAD_ID[name], 77)
        hf = HFTokenizer.from_pretrained(folder / "tokenizer")
        assert_same_rows(tok(PROMPTS), reference_ids(hf, PROMPTS), PROMPTS)


def legacy_configs() -> dict[str, tuple[dict, dict | None]]:
    """tokenizer_config.json / special_tokens_map.json as older SD1/SD2 folders write them."""

    def added(content: str, normalized: bool) -> dict:
        return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}

    old_style = {
        k: {"__type": "AddedToken", **added(t, True)}
        for k, t in (("bos_token", "<|startoftext|>"), ("eos_token", "<|endoftext|>"), ("unk_token", "<|endoftext|>"))
    }
    token_map = {
        k: added(t, True)
        for k, t in (("bos_token", "<|startoftext|>"), ("eos_token", "<|endoftext|>"), ("unk_token", "<|endoftext|>"))
    }
    decoder = {
        "0": {**added("!", False), "special": True},
        "49406": {**added("<|startoftext|>", False), "special": True},
        "49407": {**added("<|endoftext|>", False), "special": True},
    }
    return {
        "none": ({}, None),
        "sd1_old": (
            {**old_style, "pad_token": "<|endoftext|>", "model_max_length": 77},
            {**token_map, "pad_token": "<|endoftext|>"},
        ),
        "sd2_map_overrides": (
            {**old_style, "pad_token": "<|endoftext|>", "model_max_length": 77},
            {**token_map, "pad_token": "!"},
        ),
        "sd2_decoder": (
            {
                "added_tokens_decoder": decoder,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "!",
                "unk_token": "<|endoftext|>",
                "model_max_length": 77,
            },
            None,
        ),
    }


@pytest.mark.parametrize("case", list(legacy_configs()))
def test_from_folder_vocab_and_merges(case, clip_vocab_dir, tmp_path):
    from transformers import CLIPTokenizer as HFTokenizer

    config, token_map = legacy_configs()[case]
    for file in ("vocab.json", "merges.txt"):
        shutil.copy(clip_vocab_dir / file, tmp_path / file)
    if config:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if token_map:
        (tmp_path / "special_tokens_map.json").write_text(json.dumps(token_map))
    tok, hf = CLIPTokenizer.from_folder(tmp_path), HFTokenizer.from_pretrained(tmp_path)
    assert tok.pad_token_id == hf.pad_token_id and tok.max_length == 77
    prompts = PROMPTS[:150] + ["<|StartOfText|> x <|EndOfText|>", "a!!b", "!", "<|endoftext|>!"]
    assert_same_rows(tok(prompts), reference_ids(hf, prompts), prompts)


@pytest.mark.parametrize("name", list(PAD_ID))
def test_save_reloads_both_ways(name, ours, tmp_path):
    from transformers import CLIPTokenizer as HFTokenizer

    ours[name].save(tmp_path)
    again, hf = CLIPTokenizer.from_folder(tmp_path), HFTokenizer.from_pretrained(tmp_path)
    assert (again.pad_token_id, hf.pad_token_id, again.max_length, hf.model_max_length) == (PAD_ID[name],) * 2 + (
        77,
    ) * 2
    expected = ours[name](PROMPTS)
    assert torch.equal(again(PROMPTS), expected)
    assert_same_rows(expected, reference_ids(hf, PROMPTS), PROMPTS)


def test_bpe_gz_paths(tmp_path, monkeypatch):
    path = find_bpe_gz()
    assert path.name == "bpe_simple_vocab_16e6.txt.gz"
    tok = CLIPTokenizer.from_bpe_gz(path)
    assert len(tok.vocab) == 49408 and tok.vocab["<|endoftext|>"] == 49407
    with pytest.raises(FileNotFoundError, match="not found"):
        CLIPTokenizer.from_bpe_gz(tmp_path / "missing.txt.gz")
    # No package provides the file: the error says what to install.
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None)
    with pytest.raises(FileNotFoundError, match="openai-clip"):
        CLIPTokenizer.from_bpe_gz()


def test_a_pickled_tokenizer_tokenizes_the_same(ours):
    """Training's data workers receive the tokenizer pickled; its word cache is rebuilt there."""
    import pickle

    prompts = ["a red circle above a blue square", "a castle on a hill, (sunset:1.3)"]
    for tokenizer in ours.values():
        copy = pickle.loads(pickle.dumps(tokenizer))
        assert torch.equal(copy(prompts), tokenizer(prompts))
