"""A1111 infotext written and parsed exactly, PNG text chunks, atomic saves, model hashes, file numbering."""

from __future__ import annotations

import hashlib
import io
import random
import struct
import zlib

import pytest
from PIL import Image

import diffuse.hashes
from diffuse.metadata import (
    PngTextError,
    atomic_write,
    escape_newlines,
    info_from_infotext,
    infotext,
    model_hash,
    model_hashes,
    numbered_path,
    parse_infotext,
    read_parameters,
    save_png,
    sha256_file,
    unescape_newlines,
)
from diffuse.pngtext import MAX_TEXT, MAX_TEXT_CHUNK

BASE = {
    "prompt": "a photo of a cat",
    "negative_prompt": "blurry, lowres",
    "steps": 20,
    "sampler": "DPM++ 2M",
    "schedule_type": "Karras",
    "cfg_scale": 7.0,
    "seed": 123,
    "width": 512,
    "height": 768,
    "model_hash": "6ce0161689",
    "model": "v1-5-pruned-emaonly",
    "clip_skip": 1,
    "denoising_strength": None,
    "version": "diffuse 0.1.0",
}


# ---- writing infotext --------------------------------------------------------------------------


def test_txt2img_infotext_with_negative_prompt():
    assert infotext(BASE) == (
        "a photo of a cat\n"
        "Negative prompt: blurry, lowres\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 512x768, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: diffuse 0.1.0"
    )


def test_no_negative_line_no_schedule_and_fractional_cfg():
    info = {
        **BASE,
        "negative_prompt": "",
        "schedule_type": None,
        "cfg_scale": 7.5,
        "model_hash": None,
        "model": None,
        "version": None,
        "sampler": "Euler a",
        "width": 64,
        "height": 64,
        "unknown": "x",
    }
    assert infotext(info) == "a photo of a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 123, Size: 64x64"


def test_values_with_comma_colon_or_newline_are_json_quoted():
    info = {**BASE, "negative_prompt": "", "model": "my model, v2: 猫", "version": "line\nbreak"}
    assert infotext(info).splitlines()[-1] == (
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 512x768, "
        'Model hash: 6ce0161689, Model: "my model, v2: 猫", Version: "line\\nbreak"'
    )


def test_img2img_strength_clip_skip_and_mask_blur_in_a1111_order():
    info = {**BASE, "clip_skip": 2, "denoising_strength": 0.75, "mask_blur": 4, "cfg_scale": 5}
    assert infotext(info).splitlines()[-1] == (
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5, Seed: 123, Size: 512x768, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.75, Clip skip: 2, "
        "Mask blur: 4, Version: diffuse 0.1.0"
    )


def test_multiline_prompts_are_written_on_one_line_each_and_empty_prompt():
    info = {
        **BASE,
        "prompt": "line one\nline two",
        "negative_prompt": "bad\r\nworse",
        "model_hash": None,
        "model": None,
        "version": None,
    }
    assert infotext(info) == (
        "line one\\nline two\nNegative prompt: bad\\r\\nworse\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, "
        "Size: 512x768"
    )
    assert infotext({**info, "prompt": "", "negative_prompt": ""}).startswith("Steps: 20, ")


# ---- newline escaping --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, written",
    [
        ("a cat, \\(literal parentheses\\), (big:1.2)", "a cat, \\(literal parentheses\\), (big:1.2)"),
        ("a\nb", "a\\nb"),  # newline: one backslash and n
        ("a\\nb", "a\\\\nb"),  # a literal backslash-n: its backslash doubled
        ("a\\\nb", "a\\\\\\nb"),  # one backslash then a newline: 2k+1 = 3 backslashes
        ("C:\\dir\\x\rend\\", "C:\\dir\\x\\rend\\"),  # backslashes before other letters stay as they are
        ("nnn rrr", "nnn rrr"),
    ],
)
def test_escaping_writes_newlines_as_backslash_letters(raw, written):
    assert escape_newlines(raw) == written and unescape_newlines(written) == raw


def test_escaping_round_trips_any_prompt_exactly():
    rng = random.Random(20)
    alphabet = ["\\", "n", "r", "\n", "\r", "a", ":", ",", "(", "Steps: 1", "Negative prompt: x"]
    for _ in range(3000):
        prompt = "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
        negative = "".join(rng.choice(alphabet) for _ in range(rng.randrange(8)))
        if prompt.startswith("Negative prompt:"):  # the one prompt A1111's layout cannot tell from a negative
            prompt = "a" + prompt
        assert unescape_newlines(escape_newlines(prompt)) == prompt
        text = infotext({**BASE, "prompt": prompt, "negative_prompt": negative})
        # the prompt, the negative prompt and the parameters: one line each
        assert len(text.split("\n")) == 1 + bool(prompt) + bool(negative) and "\r" not in text
        back = info_from_infotext(text)
        assert (back["prompt"], back["negative_prompt"], back["seed"]) == (prompt, negative, 123)


def test_a_prompt_cannot_forge_parameter_lines():
    forged = "cat\nNegative prompt: x\nSteps: 99, Sampler: Euler, Seed: 1"
    text = infotext({**BASE, "prompt": forged, "negative_prompt": ""})
    assert text.count("\nSteps:") == 1 and "\nNegative prompt:" not in text
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == forged and parsed["Negative prompt"] == ""
    assert (parsed["Steps"], parsed["Seed"], parsed["Sampler"]) == ("20", "123", "DPM++ 2M")
    negative = infotext({**BASE, "negative_prompt": "ok\nSteps: 99, Sampler: Euler, Seed: 1"})
    assert info_from_infotext(negative)["steps"] == 20


def test_raw_multiline_a1111_prompts_parse_as_before():
    text = "line one\nline two\nNegative prompt: bad\nworse\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5"
    parsed = parse_infotext(text)
    assert (parsed["Prompt"], parsed["Negative prompt"]) == ("line one\nline two", "bad\nworse")


# ---- parsing A1111 text ------------------------------------------------------------------------


def test_parse_a1111_docstring_example():
    text = (
        "girl with an artist's beret, determined, blue eyes, desert scene, ((eyeshadow)), (coquettish)\n"
        "Negative prompt: ugly, fat, (((deformed))), [blurry], bad anatomy\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"
    )
    parsed = parse_infotext(text)
    assert parsed == {
        "Prompt": "girl with an artist's beret, determined, blue eyes, desert scene, ((eyeshadow)), (coquettish)",
        "Negative prompt": "ugly, fat, (((deformed))), [blurry], bad anatomy",
        "Steps": "20",
        "Sampler": "Euler a",
        "CFG scale": "7",
        "Seed": "965400086",
        "Size-1": "512",
        "Size-2": "512",
        "Model hash": "45dee52b",
        "Clip skip": "1",
        "RNG": "GPU",
        "Schedule type": "Automatic",
    }


def test_parse_recent_a1111_line_with_quoted_hashes_and_hires():
    text = (
        "masterpiece, 1girl, <lora:add_detail:0.8>\n"
        "Negative prompt: easynegative\n"
        "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.5, Seed: 42, Size: 832x1216, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.4, Clip skip: 2, "
        "Hires resize: 1024x1536, Hires upscaler: Latent, "
        'Lora hashes: "add_detail: 7c6bad76eb54, film: 2a9b4c5d6e7f", TI hashes: "easynegative: c74b4e810b03", '
        "Version: v1.10.1"
    )
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "masterpiece, 1girl, <lora:add_detail:0.8>"
    assert parsed["Lora hashes"] == "add_detail: 7c6bad76eb54, film: 2a9b4c5d6e7f"
    assert parsed["TI hashes"] == "easynegative: c74b4e810b03"
    assert (parsed["Hires resize-1"], parsed["Hires resize-2"]) == ("1024", "1536")
    assert (parsed["Schedule type"], parsed["Clip skip"], parsed["Version"]) == ("Karras", "2", "v1.10.1")
    assert info_from_infotext(text) == {
        "prompt": "masterpiece, 1girl, <lora:add_detail:0.8>",
        "negative_prompt": "easynegative",
        "steps": 30,
        "sampler": "DPM++ 2M",
        "schedule_type": "Karras",
        "cfg_scale": 5.5,
        "seed": 42,
        "width": 832,
        "height": 1216,
        "model_hash": "6ce0161689",
        "model": "v1-5-pruned-emaonly",
        "denoising_strength": 0.4,
        "clip_skip": 2,
        "lora_hashes": "add_detail: 7c6bad76eb54, film: 2a9b4c5d6e7f",
        "ti_hashes": "easynegative: c74b4e810b03",
        "version": "v1.10.1",
    }


def test_addon_hashes_are_written_as_a1111_quotes_them_and_read_back():
    from diffuse.metadata import format_addon_hashes, parse_addon_hashes

    value = format_addon_hashes([("add:detail", "7c6bad76eb54"), ("a,b", "2a9b4c5d6e7f")])
    assert value == "adddetail: 7c6bad76eb54, ab: 2a9b4c5d6e7f"
    assert format_addon_hashes([]) is None
    text = infotext({"prompt": "x <lora:adddetail:1>", "steps": 2, "sampler": "Euler", "seed": 1, "lora_hashes": value})
    assert 'Lora hashes: "adddetail: 7c6bad76eb54, ab: 2a9b4c5d6e7f"' in text
    assert parse_addon_hashes(info_from_infotext(text)["lora_hashes"]) == [
        ("adddetail", "7c6bad76eb54"),
        ("ab", "2a9b4c5d6e7f"),
    ]
    with pytest.raises(ValueError, match="not 'name: hash'"):
        parse_addon_hashes("nohash")


def test_a_last_line_with_fewer_than_three_params_is_prompt():
    parsed = parse_infotext("a cat\n  Steps: 20, Sampler: Euler  ")
    assert parsed["Prompt"] == "a cat\nSteps: 20, Sampler: Euler"
    assert "Steps" not in parsed and parsed["Negative prompt"] == ""


def test_bad_typed_value_is_a_clear_error():
    with pytest.raises(ValueError, match="Steps"):
        info_from_infotext("x\nSteps: many, Sampler: Euler, CFG scale: 7")


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"prompt": "line one\nline two, (big:1.2)", "negative_prompt": "bad\nworse: very"},
        {"negative_prompt": "", "cfg_scale": 7.5, "model": "name, with: colon", "clip_skip": 2},
        {"prompt": "猫の写真", "denoising_strength": 0.35, "mask_blur": 4, "seed": 4294967295},
    ],
)
def test_round_trip_info_to_text_to_info(changes):
    info = {k: v for k, v in {**BASE, **changes}.items() if v is not None}
    back = info_from_infotext(infotext(info))
    assert {k: back[k] for k in info} == info
    assert type(back["cfg_scale"]) is float and type(back["steps"]) is int


DIFFUSE_FIELDS = {
    "init_image_hash": "ab" * 32,
    "mask_hash": "cd" * 32,
    "keep_unmasked": False,
    "nan_fallback": "UNet float32",
    "batch_size": 4,
    "batch_pos": 3,
    "model_sha256": "ef" * 32,
    "dtype": "bfloat16",
    "device": "cpu",
    "sampler_settings": "num_train_timesteps=1000 beta_start=0.00085 timestep_spacing=leading",
    "guidance_cutoff": 0.5,
    "deep_cache": "3/1",
    "token_merging_ratio": 0.25,
}


def test_diffuse_fields_come_after_a1111s_and_before_version():
    info = {**BASE, "denoising_strength": 0.5, **DIFFUSE_FIELDS}
    text = infotext(info)
    last = text.splitlines()[-1]
    assert last.startswith("Steps: 20, Sampler: DPM++ 2M, ") and last.endswith(", Version: diffuse 0.1.0")
    assert (
        "Token merging ratio: 0.25, Init image hash: " + "ab" * 32 + ", Guidance cutoff: 0.5, Deep cache: 3/1, "
        "NaN fallback: UNet float32, Mask hash: " + "cd" * 32 + ", Keep unmasked: False, Batch size: 4, "
        "Batch pos: 3, Model sha256: " + "ef" * 32 + ", Dtype: bfloat16, Device: cpu, Sampler settings: "
        "num_train_timesteps=1000 beta_start=0.00085 timestep_spacing=leading, Version"
    ) in last
    parsed = parse_infotext(text)  # A1111's parser finds every one of them
    assert (parsed["Batch pos"], parsed["Dtype"], parsed["NaN fallback"]) == ("3", "bfloat16", "UNet float32")
    back = info_from_infotext(text)
    assert {k: back[k] for k in DIFFUSE_FIELDS} == DIFFUSE_FIELDS


def test_defaults_are_left_out_as_a1111_does():
    text = infotext({**BASE, "keep_unmasked": True, "batch_size": 1, "batch_pos": 0})
    assert "Keep unmasked" not in text and "Batch" not in text
    assert info_from_infotext(text).get("keep_unmasked") is None


def test_a_value_starting_with_a_quote_stays_itself():
    text = infotext({**BASE, "model": '"quoted"'})
    assert info_from_infotext(text)["model"] == '"quoted"'
    with pytest.raises(ValueError, match="Keep unmasked.*True or False"):
        info_from_infotext("x\nSteps: 1, Sampler: Euler, Keep unmasked: maybe")


# ---- PNG text chunks ---------------------------------------------------------------------------


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        chunks.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


def small_image() -> Image.Image:
    return Image.new("RGB", (8, 6), (200, 30, 90))


@pytest.mark.parametrize("prompt,chunk", [("a café, 1.5×", b"tEXt"), ("猫の写真, 🐱", b"iTXt")])
def test_parameters_round_trip_through_png(tmp_path, prompt, chunk):
    text = infotext({**BASE, "prompt": prompt})
    path = save_png(small_image(), tmp_path / "a" / "b" / "out.png", text)
    assert path == tmp_path / "a" / "b" / "out.png"
    kinds = {kind: body for kind, body in png_chunks(path.read_bytes()) if kind in (b"tEXt", b"iTXt", b"zTXt")}
    assert list(kinds) == [chunk] and kinds[chunk].startswith(b"parameters\0")
    assert read_parameters(path) == text
    with Image.open(path) as image:
        assert read_parameters(image) == text and image.size == (8, 6)
    assert info_from_infotext(read_parameters(path))["prompt"] == prompt


def test_parameters_after_the_pixel_data_are_found(tmp_path):
    buffer = io.BytesIO()
    small_image().save(buffer, format="PNG")
    data = buffer.getvalue()
    body = b"parameters\0late text\nSteps: 1, Sampler: Euler, CFG scale: 7"
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
    iend = data.rindex(b"IEND") - 4
    (tmp_path / "late.png").write_bytes(data[:iend] + chunk + data[iend:])
    assert read_parameters(tmp_path / "late.png") == body.split(b"\0", 1)[1].decode()


def test_no_parameters_reads_as_none(tmp_path):
    save_png(small_image(), tmp_path / "plain.png", None)
    assert read_parameters(tmp_path / "plain.png") is None


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_with(*chunks: bytes, width: int = 8, height: int = 6) -> bytes:
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    pixels = chunk(b"IDAT", zlib.compress(b"\0" * (1 + 3 * width) * min(height, 6)))
    return b"\x89PNG\r\n\x1a\n" + header + b"".join(chunks) + pixels + chunk(b"IEND", b"")


def test_compressed_text_chunks_are_read(tmp_path):
    ztxt = chunk(b"zTXt", b"parameters\0\0" + zlib.compress(b"z text"))
    itxt = chunk(b"iTXt", b"parameters\0\1\0en\0\0" + zlib.compress("猫 text".encode()))
    (tmp_path / "z.png").write_bytes(png_with(ztxt))
    (tmp_path / "i.png").write_bytes(png_with(itxt))
    assert read_parameters(tmp_path / "z.png") == "z text"
    assert read_parameters(tmp_path / "i.png") == "猫 text"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: png_with(chunk(b"tEXt", b"parameters\0x"), width=100_000, height=100_000), "decompression bomb"),
        (lambda: png_with(chunk(b"tEXt", b"parameters\0" + b"a" * (MAX_TEXT_CHUNK + 1))), "over the"),
        (lambda: png_with(chunk(b"zTXt", b"parameters\0\0" + zlib.compress(b"a" * (MAX_TEXT + 1)))), "inflates past"),
        (lambda: png_with(chunk(b"tEXt", b"parameters\0x"))[:-20], "truncated"),
        (lambda: png_with(chunk(b"tEXt", b"parameters\0x"))[:40], "truncated"),
        (lambda: png_with(chunk(b"tEXt", b"parameters\0x")).replace(b"parameters\0x", b"parameters\0y"), "checksum"),
        (lambda: png_with(chunk(b"tEXt", b"parameters\0a"), chunk(b"tEXt", b"parameters\0b")), "two different"),
        (lambda: b"GIF89a not a png at all", "not a PNG"),
        (lambda: b"", "not a PNG"),
    ],
)
def test_unsafe_or_broken_files_are_refused_in_one_line(tmp_path, make, message):
    path = tmp_path / "bad.png"
    path.write_bytes(make())
    with pytest.raises(PngTextError, match=message) as caught:
        read_parameters(path)
    assert "\n" not in str(caught.value) and "bad.png" in str(caught.value)


def test_text_after_the_pixels_is_read_without_decoding_them(tmp_path):
    # Pixel data that no decoder could inflate: only a reader that skips it finds the text behind it.
    data = png_with()
    idat = data.index(b"IDAT") - 4
    broken = chunk(b"IDAT", b"\xff" * 64) + chunk(b"tEXt", b"parameters\0after the pixels") + chunk(b"IEND", b"")
    (tmp_path / "late.png").write_bytes(data[:idat] + broken)
    assert read_parameters(tmp_path / "late.png") == "after the pixels"


# ---- atomic writes -----------------------------------------------------------------------------


def test_save_leaves_no_temporary_files(tmp_path):
    for i in range(3):
        save_png(small_image(), tmp_path / "x.png", f"text {i}\nSteps: 1, Sampler: Euler, Seed: {i}")
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]
    assert read_parameters(tmp_path / "x.png").startswith("text 2")


def test_failed_save_keeps_the_existing_file_intact(tmp_path, monkeypatch):
    path = save_png(small_image(), tmp_path / "keep.png", "old")
    before = path.read_bytes()
    image = small_image()

    def half_written_then_fails(fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(image, "save", half_written_then_fails)
    with pytest.raises(OSError, match="disk full"):
        save_png(image, path, "new")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.png"]


def test_no_overwrite_mode_refuses_an_existing_file(tmp_path):
    path = save_png(small_image(), tmp_path / "00001-1.png", "first")
    with pytest.raises(FileExistsError):
        save_png(small_image(), path, "second", overwrite=False)
    assert read_parameters(path) == "first" and len(list(tmp_path.iterdir())) == 1
    assert atomic_write(tmp_path / "new.bin", lambda f: f.write(b"abc"), overwrite=False).read_bytes() == b"abc"


def test_save_png_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"\.png"):
        save_png(small_image(), tmp_path / "x.jpg", "text")
    with pytest.raises(ValueError, match="str"):
        save_png(small_image(), tmp_path / "x.png", {"prompt": "x"})
    assert list(tmp_path.iterdir()) == []


# ---- model hash --------------------------------------------------------------------------------


def test_model_hash_is_autov2_of_the_whole_file(tmp_path):
    data = bytes(range(256)) * 10_000 + b"tail"  # 2.4 MiB: several 1 MiB chunks plus a partial one
    (tmp_path / "model.safetensors").write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert sha256_file(tmp_path / "model.safetensors", chunk_size=4099) == expected
    assert model_hash(tmp_path / "model.safetensors") == expected[:10]


def test_model_hash_of_a_diffusers_folder_is_its_unet_file(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"bin weights")
    assert model_hash(tmp_path) == hashlib.sha256(b"bin weights").hexdigest()[:10]
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"safetensors weights")
    assert model_hash(tmp_path) == hashlib.sha256(b"safetensors weights").hexdigest()[:10]


def test_model_hash_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match="without UNet weights"):
        model_hash(tmp_path)
    with pytest.raises(ValueError, match="missing.ckpt"):
        model_hash(tmp_path / "missing.ckpt")


def write_folder(root, files: dict[str, bytes]):
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


FOLDER = {
    "model_index.json": b'{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"], '
    b'"vae": ["diffusers", "AutoencoderKL"], "tokenizer": ["transformers", "CLIPTokenizer"], '
    b'"safety_checker": [null, null]}',
    "unet/diffusion_pytorch_model.safetensors": b"unet weights",
    "unet/config.json": b"{}",
    "vae/diffusion_pytorch_model.safetensors": b"vae weights",
    "tokenizer/vocab.json": b"{}",
}


def test_model_hashes_of_a_file_come_from_one_read(tmp_path, monkeypatch):
    (tmp_path / "m.safetensors").write_bytes(b"weights")
    reads = []
    read_whole = diffuse.hashes.sha256_file
    monkeypatch.setattr(diffuse.hashes, "sha256_file", lambda path: reads.append(path) or read_whole(path))
    hashes = model_hashes(tmp_path / "m.safetensors")
    assert hashes.sha256 == hashlib.sha256(b"weights").hexdigest() and hashes.short == hashes.sha256[:10]
    assert len(reads) == 1


def test_a_folders_sha256_covers_every_part_and_its_short_hash_stays_the_unets(tmp_path):
    base = model_hashes(write_folder(tmp_path / "a", FOLDER))
    assert base.short == hashlib.sha256(b"unet weights").hexdigest()[:10] == model_hash(tmp_path / "a")
    lines = sorted((hashlib.sha256(data).hexdigest(), name) for name, data in FOLDER.items())
    listing = "".join(f"{digest}  {name}\n" for digest, name in sorted(lines, key=lambda x: x[1]))
    assert base.sha256 == hashlib.sha256(listing.encode()).hexdigest()
    changes = {
        "vae/diffusion_pytorch_model.safetensors": b"other",
        "tokenizer/vocab.json": b'{"a": 1}',
        "model_index.json": FOLDER["model_index.json"].replace(b"StableDiffusion", b"Other"),
    }
    for name, data in changes.items():
        changed = model_hashes(write_folder(tmp_path / name.replace("/", "_"), {**FOLDER, name: data}))
        assert changed.sha256 != base.sha256 and changed.short == base.short, name
    moved = {**FOLDER, "vae/renamed.safetensors": FOLDER["vae/diffusion_pytorch_model.safetensors"]}
    del moved["vae/diffusion_pytorch_model.safetensors"]
    assert model_hashes(write_folder(tmp_path / "moved", moved)).sha256 != base.sha256  # the path counts too
    extras = {**FOLDER, "eval.json": b"scores", "image_tower/x.safetensors": b"x", "unet/.cache/lock": b"x"}
    assert model_hashes(write_folder(tmp_path / "extras", extras)).sha256 == base.sha256  # not parts of the model


# ---- numbered file names -----------------------------------------------------------------------


def test_numbered_path_continues_after_the_largest_index(tmp_path):
    assert numbered_path(tmp_path / "not-yet", 42) == tmp_path / "not-yet" / "00000-42.png"
    for name in ["00001-42.png", "00007-3.png", "grid-0031.png", "notes.txt", "00002.png", "²-1.png"]:
        (tmp_path / name).write_bytes(b"x")
    assert numbered_path(tmp_path, 5) == tmp_path / "00008-5.png"


def test_numbered_saves_never_overwrite(tmp_path):
    written = []
    for seed in [9, 9, 10, 9]:
        written.append(save_png(small_image(), numbered_path(tmp_path, seed), f"seed {seed}", overwrite=False))
    assert [p.name for p in written] == ["00000-9.png", "00001-9.png", "00002-10.png", "00003-9.png"]
    assert [read_parameters(p) for p in written] == ["seed 9", "seed 9", "seed 10", "seed 9"]
