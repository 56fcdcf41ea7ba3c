"""Prompt handling as AUTOMATIC1111 does it: emphasis parsing, 75-token chunks, weighted encoding."""

from __future__ import annotations

import pytest
import torch

from diffuse.models.clip import CLIPTextEncoder
from diffuse.models.configs import TextEncoderConfig
from diffuse.prompts import encode_chunks, encode_prompt_pair, encode_prompts, parse_attention, prompt_chunks
from diffuse.tokenizer import CLIPTokenizer

BOS, EOS, COMMA = 49406, 49407, 267  # CLIP's ids for <|startoftext|>, <|endoftext|>, ","
PAD = {"sd1": EOS, "sd2": 0}  # SD2 pads with "!" (id 0) after the EOS


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, CLIPTokenizer]:
    return {style: CLIPTokenizer.from_bpe_gz(pad_token_id=pad) for style, pad in PAD.items()}


@pytest.fixture(scope="module")
def encoder() -> CLIPTextEncoder:
    torch.manual_seed(0)
    model = CLIPTextEncoder(TextEncoderConfig(width=32, layers=2, heads=4, mlp_width=64)).eval()
    with torch.no_grad():  # move the norms off 1/0 so every parameter matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def words(word: str, count: int) -> str:
    return " ".join([word] * count)


# ---------------------------------------------------------------- parse_attention


@pytest.mark.parametrize(
    "text, expected",
    [  # the examples in A1111's parse_prompt_attention docstring
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        (r"\(literal\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ],
        ),
    ],
)
def test_parse_matches_a1111_examples(text, expected):
    assert parse_attention(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"\(a\) \[b\] \\", [("(a) [b] \\", 1.0)]),
        (r"(a\)b)", [("a)b", 1.1)]),  # an escaped bracket does not close the span
        (r"a\b", [("ab", 1.0)]),  # a lone backslash is dropped
        (r"\\(a)", [("\\", 1.0), ("a", 1.1)]),  # an escaped backslash leaves the bracket active
    ],
)
def test_parse_escapes(text, expected):
    assert parse_attention(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", [("", 1.0)]),
        ("()", [("", 1.0)]),
        ("unbalanced)", [("unbalanced)", 1.0)]),  # closes nothing: literal text
        ("a ] b", [("a ] b", 1.0)]),
        ("a:1.2) b", [("a:1.2) b", 1.0)]),  # an explicit factor with no open bracket is text too
        ("(a:1.3", [("a:1.3", 1.1)]),  # the factor needs its ")"; the open bracket applies 1.1 to the end
        ("[a", [("a", 1 / 1.1)]),
        ("(a [b", [("a ", 1.1), ("b", 1.1 * (1 / 1.1))]),  # left open: round ones apply first, then square
        ("[a:1.3]", [("a:1.3", 1 / 1.1)]),  # explicit factors only close round brackets
        ("((a:2))", [("a", 2.0 * 1.1)]),
        ("[[a]]", [("a", (1 / 1.1) * (1 / 1.1))]),
        ("(a:-0.5) (b:+2) (c:.5)", [("a", -0.5), (" ", 1.0), ("b", 2.0), (" ", 1.0), ("c", 0.5)]),
        ("a: b (c:1) d", [("a: b c d", 1.0)]),  # lone colons are text; equal weights merge
    ],
)
def test_parse_brackets_and_weights(text, expected):
    assert parse_attention(text) == expected


def test_parse_rejects_a_malformed_weight():
    for text in ("(a:1.2.3)", "(a:.)"):
        with pytest.raises(ValueError, match="not a number"):
            parse_attention(text)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("a BREAK BREAK b", [("a", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("a BREAKfast, a break", [("a BREAKfast, a break", 1.0)]),  # only the upper-case whole word
        ("(a) BREAK (b)", [("a", 1.1), ("", 1.0), ("BREAK", -1.0), ("", 1.0), ("b", 1.1)]),
        ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),  # scaled like any segment (A1111 too)
    ],
)
def test_parse_break(text, expected):
    assert parse_attention(text) == expected


# ---------------------------------------------------------------- chunks


def framed(style: str, ids: list[int]) -> list[int]:
    """BOS + ids + EOS, then the style's padding to 77."""
    return [BOS, *ids, EOS] + [PAD[style]] * (75 - len(ids))


@pytest.mark.parametrize("style", ["sd1", "sd2"])
@pytest.mark.parametrize(
    "prompt", ["a photograph of an astronaut riding a horse", "", words("cat", 75), "a (red:1.5) car, [blurry]"]
)
def test_single_chunk_ids_match_the_tokenizer(tokenizers, style, prompt):
    tokenizer = tokenizers[style]
    chunks = prompt_chunks(tokenizer, prompt)
    assert len(chunks) == 1
    plain = prompt.replace("(red:1.5)", "red").replace("[blurry]", "blurry")
    assert list(chunks[0].ids) == tokenizer([plain])[0].tolist()


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_chunk_boundaries(tokenizers, style):
    tokenizer = tokenizers[style]
    cat, dog = tokenizer.encode("cat")[0], tokenizer.encode("dog")[0]
    assert [list(c.ids) for c in prompt_chunks(tokenizer, "")] == [framed(style, [])]
    assert [list(c.ids) for c in prompt_chunks(tokenizer, words("cat", 75))] == [framed(style, [cat] * 75)]
    two = [framed(style, [cat] * 75), framed(style, [cat])]
    assert [list(c.ids) for c in prompt_chunks(tokenizer, words("cat", 76))] == two
    long = prompt_chunks(tokenizer, words("cat", 150) + " dog")
    assert [list(c.ids) for c in long] == [framed(style, [cat] * 75)] * 2 + [framed(style, [dog])]
    assert all(len(c.ids) == len(c.weights) == 77 for c in long)


def test_comma_backtrack(tokenizers):
    tokenizer = tokenizers["sd1"]
    cat, dog = tokenizer.encode("cat")[0], tokenizer.encode("dog")[0]

    def chunk_ids(prompt: str) -> list[list[int]]:
        return [list(c.ids) for c in prompt_chunks(tokenizer, prompt)]

    # Comma 20 tokens before the end of the full chunk: the chunk ends after it.
    prompt = words("cat", 55) + ", " + words("dog", 25)
    assert chunk_ids(prompt) == [framed("sd1", [cat] * 55 + [COMMA]), framed("sd1", [dog] * 25)]
    # 21 tokens back is too far: the chunk is cut at 75 tokens.
    prompt = words("cat", 54) + ", " + words("dog", 26)
    assert chunk_ids(prompt) == [framed("sd1", [cat] * 54 + [COMMA] + [dog] * 20), framed("sd1", [dog] * 6)]
    # A comma arriving as token 76 opens the next chunk.
    prompt = words("cat", 75) + ", dog"
    assert chunk_ids(prompt) == [framed("sd1", [cat] * 75), framed("sd1", [COMMA, dog])]
    # Moved tokens keep their weights.
    chunks = prompt_chunks(tokenizer, words("cat", 60) + ", (" + words("dog", 20) + ":1.5)")
    assert list(chunks[1].ids) == framed("sd1", [dog] * 20)
    assert chunks[1].weights == (1.0, *[1.5] * 20, *[1.0] * 56)
    assert chunks[0].weights == (1.0,) * 77


def test_break_starts_a_new_chunk(tokenizers):
    tokenizer = tokenizers["sd2"]
    a, b, brk = tokenizer.encode("a")[0], tokenizer.encode("b")[0], tokenizer.encode("break")[0]

    def chunk_ids(prompt: str) -> list[list[int]]:
        return [list(c.ids) for c in prompt_chunks(tokenizer, prompt)]

    assert chunk_ids("a BREAK b") == [framed("sd2", [a]), framed("sd2", [b])]
    assert chunk_ids("BREAK a") == [framed("sd2", []), framed("sd2", [a])]  # an empty first chunk, as in A1111
    assert chunk_ids("a BREAK") == [framed("sd2", [a])]
    assert chunk_ids("a BREAK BREAK b") == [framed("sd2", [a]), framed("sd2", []), framed("sd2", [b])]
    assert chunk_ids("(a BREAK b)") == [framed("sd2", [a, brk, b])]  # inside brackets it is a word


def test_weights_follow_tokens(tokenizers):
    tokenizer = tokenizers["sd1"]
    (chunk,) = prompt_chunks(tokenizer, "a (red:1.5) car, [blurry]")
    assert list(chunk.ids[:7]) == [BOS, *tokenizer.encode("a red car, blurry"), EOS]
    assert chunk.weights[:7] == (1.0, 1.0, 1.5, 1.0, 1.0, 1 / 1.1, 1.0)
    assert set(chunk.weights[6:]) == {1.0}


def test_sd2_pads_after_the_first_end_of_text(tokenizers):
    # A literal <|endoftext|> in the prompt is the first EOS: A1111 pads everything after it.
    (sd1,) = prompt_chunks(tokenizers["sd1"], "a <|endoftext|> b")
    (sd2,) = prompt_chunks(tokenizers["sd2"], "a <|endoftext|> b")
    a, b = tokenizers["sd1"].encode("a")[0], tokenizers["sd1"].encode("b")[0]
    assert list(sd1.ids[:5]) == [BOS, a, EOS, b, EOS] and set(sd1.ids[4:]) == {EOS}
    assert list(sd2.ids[:5]) == [BOS, a, EOS, 0, 0] and set(sd2.ids[3:]) == {0}


# ---------------------------------------------------------------- encoding


@pytest.mark.parametrize("style", ["sd1", "sd2"])
@pytest.mark.parametrize("clip_skip", [1, 2])
def test_plain_prompts_encode_exactly_like_the_encoder(tokenizers, encoder, style, clip_skip):
    tokenizer = tokenizers[style]
    prompts = ["a photograph of an astronaut riding a horse", "", words("cat", 75)]
    with torch.no_grad():
        for prompt in prompts:
            got = encode_prompts(tokenizer, encoder, [prompt], clip_skip=clip_skip)
            assert torch.equal(got, encoder(tokenizer([prompt]), clip_skip=clip_skip)), prompt
        assert torch.equal(
            encode_prompts(tokenizer, encoder, prompts, clip_skip=clip_skip),
            encoder(tokenizer(prompts), clip_skip=clip_skip),
        )


def emphasized(z: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """A1111's emphasis on one chunk [77, D], written out in float32."""
    scaled = z.float() * torch.tensor(weights)[:, None]
    return scaled * (z.float().mean() / scaled.mean())


def test_weights_scale_their_rows_and_keep_the_mean(tokenizers, encoder):
    tokenizer = tokenizers["sd1"]
    with torch.no_grad():
        plain = encoder(tokenizer(["a red car, blurry"]))[0]
        got = encode_prompts(tokenizer, encoder, ["a (red:1.5) car, [blurry]"])[0]
    weights = [1.0, 1.0, 1.5, 1.0, 1.0, 1 / 1.1] + [1.0] * 71
    assert (got - emphasized(plain, weights)).abs().max().item() <= 1e-6
    # Every row is the plain row times one common rescale, times its own weight.
    ratio = (got / plain).mean(dim=1)
    rescale = ratio[0].item()
    assert abs(rescale - 1.0) > 1e-4  # the rescale is really there
    assert torch.allclose(ratio / rescale, torch.tensor(weights), atol=1e-5)
    assert abs(got.mean().item() - plain.mean().item()) <= 1e-6


def test_weights_are_applied_in_float32(tokenizers, encoder):
    tokenizer = tokenizers["sd1"]
    half = CLIPTextEncoder(encoder.cfg).to(torch.bfloat16)
    half.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        plain = half(tokenizer(["a red car"]))[0]
        got = encode_prompts(tokenizer, half, ["a (red:1.5) car"])[0]
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, emphasized(plain, [1.0, 1.0, 1.5] + [1.0] * 74).to(torch.bfloat16))


def test_long_prompts_give_more_context(tokenizers, encoder):
    tokenizer = tokenizers["sd2"]
    prompt = words("cat", 100)
    with torch.no_grad():
        context = encode_prompts(tokenizer, encoder, [prompt, words("dog", 160)])
        chunks = prompt_chunks(tokenizer, prompt)
        assert context.shape == (2, 231, 32)
        assert encode_prompts(tokenizer, encoder, [prompt]).shape == (1, 154, 32)
        # Each 77-token block is its chunk encoded on its own (own positions 0..76).
        alone = encoder(torch.tensor([c.ids for c in chunks]))
        assert (context[0, :154] - alone.reshape(154, 32)).abs().max().item() <= 1e-6
        # The shorter prompt is filled up with the empty prompt's encoding.
        empty = encoder(tokenizer([""]))[0]
        assert (context[0, 154:] - empty).abs().max().item() <= 1e-6


def test_repeated_prompts_get_identical_rows(tokenizers, encoder):
    with torch.no_grad():
        context = encode_prompts(tokenizers["sd1"], encoder, ["(cat:1.2)", "dog", "(cat:1.2)"])
    assert torch.equal(context[0], context[2]) and not torch.equal(context[0], context[1])


@pytest.mark.parametrize("long_side", ["prompt", "negative"])
def test_pair_is_padded_to_the_same_length(tokenizers, encoder, long_side):
    tokenizer = tokenizers["sd1"]
    long, short = words("cat", 80), "(dog:1.3)"
    prompts, negatives = ([long, short], ["", short]) if long_side == "prompt" else ([short, short], [long, ""])
    with torch.no_grad():
        cond, uncond = encode_prompt_pair(tokenizer, encoder, prompts, negatives)
        assert cond.shape == uncond.shape == (2, 154, 32)
        alone = encode_prompts(tokenizer, encoder, prompts)  # 154 or 77 tokens: cond starts with it
        assert (cond[:, : alone.shape[1]] - alone).abs().max().item() <= 1e-6
        empty = encoder(tokenizer([""]))[0]
        padded = uncond[1] if long_side == "prompt" else cond[0]
        assert (padded[77:] - empty).abs().max().item() <= 1e-6
        stacked = torch.cat([uncond, cond])  # what classifier-free guidance feeds the UNet
        assert stacked.shape == (4, 154, 32)


def test_encode_chunks_leaves_unweighted_chunks_untouched(tokenizers, encoder):
    tokenizer = tokenizers["sd2"]
    chunks = prompt_chunks(tokenizer, "a (b:2) BREAK c")
    with torch.no_grad():
        out = encode_chunks(encoder, chunks)
        raw = encoder(torch.tensor([c.ids for c in chunks]))
    assert torch.equal(out[1], raw[1]) and not torch.equal(out[0], raw[0])


def test_bad_prompt_lists_are_rejected(tokenizers, encoder):
    tokenizer = tokenizers["sd1"]
    with pytest.raises(ValueError, match="negative prompts"):
        encode_prompt_pair(tokenizer, encoder, ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="prompts must be a non-empty list"):
        encode_prompts(tokenizer, encoder, [])
    with pytest.raises(ValueError, match="negative_prompts must be"):
        encode_prompt_pair(tokenizer, encoder, ["a"], [None])
