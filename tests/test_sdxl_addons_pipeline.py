"""SDXL add-ons through the pipeline: a LoRA tag and an embedding's name in the prompt, against
diffusers with the LoRA fused and the embedding loaded into both encoders."""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import save_file
from test_sdxl_addons import NETWORKS, assert_bit_exact, kohya_sdxl_lora, sdxl_embedding_file, snapshot
from test_sdxl_pipeline import assert_same_images

import diffuse


def test_a_lora_tag_and_an_embedding_on_sdxl_draw_as_diffusers_with_both(tmp_path, sdxl_folder):
    """`<lora:NAME:W>` and an embedding's name in an SDXL prompt; the weights are the model's own afterwards."""
    from diffusers import StableDiffusionXLPipeline

    reference = StableDiffusionXLPipeline.from_pretrained(sdxl_folder, add_watermarker=False).to(torch.float32)
    (tmp_path / "loras").mkdir()
    (tmp_path / "embeddings").mkdir()
    state = kohya_sdxl_lora(reference, seed=5)
    save_file(state, tmp_path / "loras" / "xlstyle.safetensors", {"ss_base_model_version": "sdxl_base_v1-0"})
    halves = sdxl_embedding_file(tmp_path / "embeddings", "sksobj", 2, seed=7)
    pipe = diffuse.load_pipeline(
        sdxl_folder, dtype="float32", lora_dirs=[tmp_path / "loras"], embedding_dirs=[tmp_path / "embeddings"]
    )
    assert list(pipe.embeddings()[0]) == ["sksobj"]
    fresh = snapshot(pipe)
    reference.load_lora_weights({k: v.clone() for k, v in state.items()}, adapter_name="xlstyle")
    reference.fuse_lora(components=list(NETWORKS), lora_scale=0.8, adapter_names=["xlstyle"])
    for half, encoder, tokenizer in (
        ("clip_l", reference.text_encoder, reference.tokenizer),
        ("clip_g", reference.text_encoder_2, reference.tokenizer_2),
    ):
        reference.load_textual_inversion(halves[half], token="sksobj", text_encoder=encoder, tokenizer=tokenizer)
    settings = dict(negative_prompt="blurry", steps=6, guidance_scale=5.0, sampler="Euler", seed=11)
    expected = reference(
        "a photo of sksobj ",  # the tag taken out, as A1111 takes it out
        negative_prompt="blurry",
        num_inference_steps=6,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(11),
    ).images
    result = pipe.txt2img("a photo of sksobj <lora:xlstyle:0.8>", **settings)
    assert_same_images(result.images, expected)
    assert 'Lora hashes: "xlstyle: ' in result.infotexts[0] and 'TI hashes: "sksobj: ' in result.infotexts[0]
    # Either add-on alone draws another picture: the comparison above sees both.
    for prompt in ("a photo of sksobj", "a photo of thing <lora:xlstyle:0.8>"):
        other = np.asarray(pipe.txt2img(prompt, **settings).images[0], dtype=np.int16)
        assert np.abs(other - np.asarray(expected[0], dtype=np.int16)).max() > 8
    pipe.txt2img("a photo", steps=1, seed=1)
    assert_bit_exact(pipe, fresh)
