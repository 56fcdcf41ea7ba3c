"""A1111's <lora:...> prompt syntax: tags taken out of the text and read into names and weights."""

from __future__ import annotations

import pytest

from diffuse.adapters.prompt_tags import LoraTag, names_lora, rename_lora, split_lora_tags, split_lora_tags_pair


@pytest.mark.parametrize(
    "prompt, text, tags",
    [
        ("a cat", "a cat", []),
        ("a cat <lora:ink>", "a cat ", [LoraTag("ink", 1.0, 1.0)]),
        ("<lora:ink:0.6>, a cat", ", a cat", [LoraTag("ink", 0.6, 0.6)]),
        ("a cat, <lora:ink:0.5:1.25>, sketch", "a cat, , sketch", [LoraTag("ink", 0.5, 1.25)]),
        ("<lora:ink:te=0.3>", "", [LoraTag("ink", 0.3, 0.3)]),
        ("<lora:ink:unet=0.2>", "", [LoraTag("ink", 1.0, 0.2)]),
        ("<lora:ink:0.7:unet=-0.5>", "", [LoraTag("ink", 0.7, -0.5)]),
        ("<lora:ink:0.7:te=0.1>", "", [LoraTag("ink", 0.1, 0.1)]),  # named te wins; unet follows it
        ("<lora:ink:0.9:0.4:te=0.2>", "", [LoraTag("ink", 0.2, 0.4)]),
        ("<lyco:Hatch Style v2:1e-1>", "", [LoraTag("Hatch Style v2", 0.1, 0.1, kind="lyco")]),
        (
            "(a <lora:ink:0.5> cat:1.2) <lora:Ink:.8>,<lora:ink:0.5>",
            "(a  cat:1.2) ,",
            [LoraTag("ink", 0.5, 0.5), LoraTag("Ink", 0.8, 0.8), LoraTag("ink", 0.5, 0.5)],
        ),
        ("a <b> c, x < y > z, <lora:>", "a <b> c, x < y > z, <lora:>", []),  # not tags by A1111's pattern
    ],
)
def test_tags_are_read_and_removed(prompt, text, tags):
    assert split_lora_tags(prompt) == (text, tags)


def test_negative_prompt_tags_count_too():
    text, negative, tags = split_lora_tags_pair("a cat <lora:ink:0.6>", "blurry, <lora:blur:-1>")
    assert (text, negative) == ("a cat ", "blurry, ")
    assert tags == [LoraTag("ink", 0.6, 0.6), LoraTag("blur", -1.0, -1.0)]


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("a <lora:ink:strong> cat", r"prompt tag '<lora:ink:strong>': weight 'strong' is not a number"),
        ("<lora:ink:0.5:x>", "weight 'x' is not a number"),
        ("<lora:ink:te=>", "weight '' is not a number"),
        ("<lora:ink:nan>", "weight 'nan' is not a finite number"),
        ("<lora:ink:inf>", "not a finite number"),
        ("<lora::0.5>", "names no LoRA"),
        ("<lora:te=0.5>", "names no LoRA"),
        ("<lora:ink:1:1:8>", "DyLoRA rank slicing"),
        ("<lora:ink:1:dyn=8>", "DyLoRA rank slicing"),
        ("<lora:ink:scale=2>", "unknown argument 'scale'"),
        ("a <hypernet:anime:1> cat", "unsupported add-on kind 'hypernet'"),
    ],
)
def test_malformed_tags_are_one_line_errors_naming_the_tag(prompt, message):
    with pytest.raises(ValueError, match=message) as caught:
        split_lora_tags(prompt)
    assert "\n" not in str(caught.value) and "prompt tag '<" in str(caught.value)


def test_rename_keeps_each_tag_and_its_kind():
    prompt = "<lora:old:0.5> a cat <lyco:old:1:0.2>, <lora:older:1> <lora:old> <hypernet:old:1>"
    renamed = rename_lora(prompt, "old", "new")
    assert renamed == "<lora:new:0.5> a cat <lyco:new:1:0.2>, <lora:older:1> <lora:new> <hypernet:old:1>"
    assert names_lora(prompt, "old") and names_lora("x <lyco:old>", "old")
    assert not names_lora(prompt, "ol") and not names_lora("<hypernet:old:1>", "old")
