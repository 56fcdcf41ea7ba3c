"""SDXL base against diffusers' StableDiffusionXLPipeline on the same tiny random weights.

The reference is diffusers' own tiny SDXL pipeline (its test_stable_diffusion_xl.py
get_dummy_components), with the real CLIP vocabulary, two text encoders of different widths
(so that the context's two halves cannot be swapped unnoticed) and every weight perturbed
(so that no zero-initialised tensor hides a wrong mapping). It is saved as a diffusers folder
that diffuse's loader reads.
"""

from __future__ import annotations

import pytest
import torch
from conftest import reference_tokenizer

import diffuse
from diffuse.conditioning_xl import size_conditioning

PIXEL_TOL = 2  # out of 255
SIZE = 64  # the model's own size: sample_size 32 x the tiny VAE's 2
PROMPT = "A painting of a squirrel eating a burger"
NEGATIVE = "blurry, green"


def build_sdxl_reference(vocab_dir, seed: int = 0):
    """diffusers' tiny SDXL base: UNet and VAE as its tests build them, text encoders on CLIP's vocabulary."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(2, 4),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=24 + 6 * 8,  # pooled width + six 8-wide size sinusoids
        cross_attention_dim=32 + 40,  # the two encoders' widths side by side
        norm_num_groups=1,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear", timestep_spacing="leading"
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=128,
    )
    torch.manual_seed(seed)
    common = dict(
        bos_token_id=49406,
        eos_token_id=49407,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_act="gelu",
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, pad_token_id=49407, **common))
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(hidden_size=40, intermediate_size=52, projection_dim=24, pad_token_id=0, **common)
    )
    with torch.no_grad():
        for module in (unet, vae, text_encoder, text_encoder_2):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.05)
            module.eval()
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=reference_tokenizer(vocab_dir, "sd1"),  # pads with EOS, as CLIP-L's
        tokenizer_2=reference_tokenizer(vocab_dir, "sd2"),  # pads with "!" (id 0), as bigG's
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory, clip_vocab_dir):
    folder = tmp_path_factory.mktemp("tiny_sdxl")
    build_sdxl_reference(clip_vocab_dir).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def reference_pipe(sdxl_folder):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(sdxl_folder, add_watermarker=False).to(torch.float32)


@pytest.fixture(scope="module")
def ours(sdxl_folder):
    return diffuse.load_pipeline(sdxl_folder, dtype="float32")


def test_size_conditioning_matches_diffusers_time_ids(reference_pipe):
    """diffusers turns add_time_ids (original h, w, crop top, left, target h, w) into sinusoids
    with the UNet's add_time_proj; ours must give the same numbers in the same order."""
    unet = reference_pipe.unet
    time_ids = reference_pipe._get_add_time_ids(
        (48, 80), (0, 0), (48, 80), dtype=torch.float32, text_encoder_projection_dim=24
    )
    expected = unet.add_time_proj(time_ids.flatten()).reshape(1, -1)
    ours_y = size_conditioning(2, 48, 80, 8)
    assert ours_y.shape == (2, 48)
    torch.testing.assert_close(ours_y, expected.expand(2, -1), atol=1e-6, rtol=0)
