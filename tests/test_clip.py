"""CLIP text encoder: parity with transformers' CLIPTextModel, and the key layouts
(transformers, OpenCLIP) against the names diffusers' own converter expects."""

from __future__ import annotations

import json

import pytest
import torch
from parity import TOL, max_err

from diffuse.checkpoints import clip_layout
from diffuse.models.clip import CLIPTextEncoder
from diffuse.models.configs import SD1, TextEncoderConfig
from diffuse.runtime import prepare

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "",
    "an oil painting of a lighthouse at dusk, " * 12,  # longer than 77 tokens: truncated
]


def tokenize(tokenizer, prompts: list[str] = PROMPTS) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def build_ours(
    cfg: TextEncoderConfig, transformers_state: dict[str, torch.Tensor], prepared: bool = True
) -> CLIPTextEncoder:
    """Ours with the given weights, prepared for inference as the loader does unless `prepared`
    is False (the plain network training uses)."""
    with torch.device("meta"):
        model = CLIPTextEncoder(cfg)
    model.load_state_dict(clip_layout.from_transformers(transformers_state), assign=True)  # strict: names must match
    return prepare(model.eval(), "cpu", torch.float32) if prepared else model.eval()


@pytest.fixture(scope="module")
def encoders(reference_pipes, reference_folders):
    """Per style: (reference CLIPTextModel, ours loaded from its folder config and weights, token ids)."""
    result = {}
    for style, pipe in reference_pipes.items():
        config = json.loads((reference_folders[style] / "text_encoder" / "config.json").read_text())
        ours = build_ours(clip_layout.config_from_transformers(config), pipe.text_encoder.state_dict())
        result[style] = (pipe.text_encoder, ours, tokenize(pipe.tokenizer))
    return result


@pytest.fixture(scope="module")
def plain_encoders(encoders):
    """Per style: ours as `encoders` has it, but the plain network training uses (not prepared)."""
    return {
        style: build_ours(ours.cfg, reference.state_dict(), prepared=False)
        for style, (reference, ours, _) in encoders.items()
    }


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "plain"])
@pytest.mark.parametrize("clip_skip", [1, 2, 3])
def test_hidden_states_match_transformers(encoders, plain_encoders, style, clip_skip, prepared):
    reference, ours, ids = encoders[style]
    ours = ours if prepared else plain_encoders[style]
    with torch.no_grad():
        out = reference(ids, output_hidden_states=True)
        # What diffusers does for clip skip: an earlier layer's output through the final layer norm.
        expected = reference.final_layer_norm(out.hidden_states[-clip_skip])
        if clip_skip == 1:
            assert torch.equal(expected, out.last_hidden_state)
        got = ours(ids, clip_skip=clip_skip)
    assert got.shape == (len(PROMPTS), 77, ours.cfg.width)
    err = max_err(got, expected)
    print(f"{style} clip_skip={clip_skip}: max abs err {err:.2e}")
    assert err <= TOL


def test_pooled_matches_transformers(encoders, style):
    reference, ours, ids = encoders[style]
    with torch.no_grad():
        expected = reference(ids).pooler_output
        got = ours.pooled(ours(ids), ids)
    assert max_err(got, expected) <= TOL


def test_config_from_weights_matches_folder_config(encoders, style):
    _, ours, _ = encoders[style]
    head_dim = ours.cfg.width // ours.cfg.heads
    detected = clip_layout.config_from_weights(ours.state_dict(), activation=ours.cfg.activation, head_dim=head_dim)
    assert detected == ours.cfg


# ---------------------------------------------------------------- layouts


def transformers_layout(reference) -> dict[str, torch.Tensor]:
    """The "text_model.*" layout of SD1 single files and transformers 4 (transformers 5 writes it unprefixed)."""
    return {"text_model." + k.removeprefix("text_model."): v for k, v in reference.state_dict().items()}


def test_transformers_round_trip_is_bitwise(encoders, style):
    reference, _, _ = encoders[style]
    state = transformers_layout(reference)
    back = clip_layout.to_transformers(clip_layout.from_transformers(state))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_from_transformers_reads_both_layouts_and_drops_unused(encoders, style):
    reference, ours, _ = encoders[style]
    state = transformers_layout(reference)
    # Unprefixed (older SD1 single files, transformers 5), with a saved position-id buffer.
    unprefixed = {k.removeprefix("text_model."): v for k, v in state.items()}
    unprefixed["embeddings.position_ids"] = torch.arange(77)[None]
    with_head = {
        **state,
        "text_model.embeddings.position_ids": torch.arange(77)[None],
        "text_projection.weight": torch.randn(8, ours.cfg.width),
        "logit_scale": torch.tensor(4.6),
    }
    expected = clip_layout.from_transformers(state)
    assert expected.keys() == ours.state_dict().keys()
    for variant in (unprefixed, with_head):
        converted = clip_layout.from_transformers(variant)
        assert converted.keys() == expected.keys()
        assert all(torch.equal(converted[k], expected[k]) for k in expected)


def open_clip_names(layers: int) -> set[str]:
    block = [
        "ln_1.weight",
        "ln_1.bias",
        "attn.in_proj_weight",
        "attn.in_proj_bias",
        "attn.out_proj.weight",
        "attn.out_proj.bias",
        "ln_2.weight",
        "ln_2.bias",
        "mlp.c_fc.weight",
        "mlp.c_fc.bias",
        "mlp.c_proj.weight",
        "mlp.c_proj.bias",
    ]
    return {"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias"} | {
        f"transformer.resblocks.{i}.{name}" for i in range(layers) for name in block
    }


def test_to_open_clip_names_and_shapes(encoders, style):
    _, ours, _ = encoders[style]
    cfg = ours.cfg
    open_clip = clip_layout.to_open_clip(ours.state_dict())
    assert open_clip.keys() == open_clip_names(cfg.layers)
    assert open_clip["positional_embedding"].shape == (cfg.max_length, cfg.width)
    assert open_clip["transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * cfg.width, cfg.width)
    assert open_clip["transformer.resblocks.0.attn.in_proj_bias"].shape == (3 * cfg.width,)
    assert open_clip["transformer.resblocks.0.mlp.c_fc.weight"].shape == (cfg.mlp_width, cfg.width)


def test_to_open_clip_converts_back_with_diffusers(encoders, style):
    """diffusers' SD2 single-file converter reads our OpenCLIP output into the reference's exact state dict."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    reference, ours, _ = encoders[style]
    prefix = "cond_stage_model.model."
    checkpoint = {prefix + k: v for k, v in clip_layout.to_open_clip(ours.state_dict()).items()}
    # It needs the target model only for config.hidden_size (the q/k/v split size).
    converted = convert_open_clip_checkpoint(reference, checkpoint, prefix=prefix)
    expected = transformers_layout(reference)
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], expected[k]) for k in expected)


def test_open_clip_round_trip_drops_sd2s_unused_final_block(encoders, style):
    _, ours, _ = encoders[style]
    state = ours.state_dict()
    layers = ours.cfg.layers
    open_clip = clip_layout.to_open_clip(state)
    assert clip_layout.sd2_layers(open_clip) == layers  # a converted file holds only the blocks in use
    # What an original SD2 file carries on top: the never-used last block and the contrastive head.
    generator = torch.Generator().manual_seed(0)
    last = f"transformer.resblocks.{layers - 1}."
    original = dict(open_clip)
    for key in [k for k in open_clip if k.startswith(last)]:
        extra = key.replace(last, f"transformer.resblocks.{layers}.")
        original[extra] = torch.randn(open_clip[key].shape, generator=generator)
    original["text_projection"] = torch.randn(ours.cfg.width, ours.cfg.width, generator=generator)
    original["logit_scale"] = torch.tensor(4.6052)
    assert clip_layout.open_clip_layers(original) == layers + 1
    assert clip_layout.sd2_layers(original) == layers

    for source in (open_clip, original):
        back = clip_layout.from_open_clip(source, layers=layers)
        assert back.keys() == state.keys()
        assert all(torch.equal(back[k], state[k]) for k in state)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("clip_skip", [0, 4])
def test_clip_skip_out_of_range(encoders, clip_skip):
    _, ours, ids = encoders["sd1"]
    with pytest.raises(ValueError, match="clip_skip must be between 1 and 3"):
        ours(ids, clip_skip=clip_skip)


def test_unsupported_hidden_act(reference_folders):
    config = json.loads((reference_folders["sd1"] / "text_encoder" / "config.json").read_text())
    with pytest.raises(ValueError, match="unsupported text encoder hidden_act 'gelu_new'"):
        clip_layout.config_from_transformers({**config, "hidden_act": "gelu_new"})


def test_config_from_weights_rejects_width_not_multiple_of_head_dim(encoders):
    _, ours, _ = encoders["sd1"]  # width 32
    with pytest.raises(ValueError, match="width 32 is not a multiple of the head size 64"):
        clip_layout.config_from_weights(ours.state_dict(), activation="quick_gelu")


def test_from_open_clip_rejects_more_layers_than_blocks(encoders):
    _, ours, _ = encoders["sd1"]
    with pytest.raises(ValueError, match="cannot keep 4 layers of an OpenCLIP tower with 3 blocks"):
        clip_layout.from_open_clip(clip_layout.to_open_clip(ours.state_dict()), layers=4)


# ---------------------------------------------------------------- full size


@pytest.mark.slow
def test_full_sd1_text_encoder(reference_pipes):
    """OpenAI CLIP ViT-L/14's text tower at full size, random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    reference = CLIPTextModel(config).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    state = clip_layout.from_transformers(reference.state_dict())
    cfg = clip_layout.config_from_weights(state, activation="quick_gelu")
    assert cfg == SD1.text_encoder
    ours = build_ours(cfg, reference.state_dict())

    ids = tokenize(reference_pipes["sd1"].tokenizer, PROMPTS[:2])
    with torch.no_grad():
        out = reference(ids, output_hidden_states=True)
        err = max_err(ours(ids), out.last_hidden_state)
        err_skip = max_err(ours(ids, clip_skip=2), reference.final_layer_norm(out.hidden_states[-2]))
    print(f"full SD1 CLIP-L: max abs err {err:.2e}, clip_skip=2 {err_skip:.2e}")
    assert err <= TOL and err_skip <= TOL
