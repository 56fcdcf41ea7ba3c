"""SDXL LoRAs and embeddings against diffusers 0.42 + peft on its tiny random SDXL base.

A kohya-format SDXL LoRA (LDM UNet names as sd-scripts writes them, `lora_te1_` for CLIP-L and
`lora_te2_` for bigG) and a PEFT one (`unet.`, `text_encoder.`, `text_encoder_2.`) go through
diffusers' `load_lora_weights` + `fuse_lora`; its fused weights, renamed to diffuse's modules,
must equal ours after LoraMerge.apply on the three networks, and restore bit for bit. An SDXL
embedding ({"clip_l", "clip_g"}) gives each encoder its half, as diffusers' load_textual_inversion
called once per encoder does.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from test_lora import TEXT_TARGETS, UNET_TARGETS, _factors, _targets
from test_lora_restore import random_lora

import diffuse
from diffuse.adapters import LoraError, LoraMerge, lora_from_state_dict
from diffuse.adapters.embeddings import (
    SDXL_HALVES,
    EmbeddingError,
    embeddings_used,
    load_sdxl_embeddings,
    per_encoder,
    read_sdxl_embedding,
)
from diffuse.adapters.merge import model_base
from diffuse.checkpoints.clip_layout import from_transformers
from diffuse.checkpoints.unet_layout import config_from_diffusers, from_diffusers
from diffuse.prompts import apply_weights, prompt_chunks, token_vectors
from diffuse.server.addon_routes import embedding_entry

WEIGHT_TOL = 2e-5
ATTENTION_TARGETS = UNET_TARGETS[:12]  # attention, feed-forward and the transformers' proj_in / proj_out
LOCON_TARGETS = (*UNET_TARGETS, "add_embedding.linear_1", "add_embedding.linear_2", "time_embedding.linear_1")
NETWORKS = ("unet", "text_encoder", "text_encoder_2")


@pytest.fixture
def reference(sdxl_folder):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(sdxl_folder, add_watermarker=False).to(torch.float32)


@pytest.fixture(scope="module")
def ours(sdxl_folder):
    return diffuse.load_pipeline(sdxl_folder, dtype="float32")


def networks(pipe) -> dict[str, torch.nn.Module]:
    return {name: getattr(pipe, name) for name in NETWORKS}


def kohya_sdxl_lora(
    reference, seed: int, targets: tuple[str, ...] = ATTENTION_TARGETS, ldm_names: bool = True
) -> dict[str, torch.Tensor]:
    """A random SDXL LoRA named as sd-scripts names it: the UNet's modules by their LDM names (or,
    as some other trainers write them, by diffusers' names)."""
    gen = torch.Generator().manual_seed(seed)
    unet = _targets(reference.unet, targets)
    names = {f"{n}.weight": n for n in unet}
    if ldm_names:
        names = from_diffusers(names, config_from_diffusers(dict(reference.unet.config)))
    layers = {f"lora_unet_{key.removesuffix('.weight')}": unet[n] for key, n in names.items()}
    for prefix, encoder in (("lora_te1_", reference.text_encoder), ("lora_te2_", reference.text_encoder_2)):
        layers |= {prefix + n: m for n, m in _targets(encoder, TEXT_TARGETS).items()}
    rank = 2 + seed % 3
    state = {}
    for name, layer in layers.items():
        name = name.replace(".", "_")
        state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = _factors(layer, rank, gen)
        state[f"{name}.alpha"] = torch.tensor(float(rank) * 1.5 + 0.25)
    return state


def peft_sdxl_lora(reference, seed: int) -> dict[str, torch.Tensor]:
    """A random diffusers / PEFT SDXL LoRA (no alphas: scale 1) over attention and both encoders."""
    gen = torch.Generator().manual_seed(seed)
    layers = {f"unet.{n}": m for n, m in _targets(reference.unet, UNET_TARGETS[:10]).items()}
    for prefix in ("text_encoder", "text_encoder_2"):
        layers |= {f"{prefix}.{n}": m for n, m in _targets(getattr(reference, prefix), TEXT_TARGETS).items()}
    state = {}
    for name, layer in layers.items():
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = _factors(layer, 3, gen)
    return state


def fused_weights(reference, state: dict[str, torch.Tensor], weight: float) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers' fused weights of the three networks under diffuse's names."""
    reference.load_lora_weights({k: v.clone() for k, v in state.items()}, adapter_name="a0")
    reference.fuse_lora(components=list(NETWORKS), lora_scale=weight, adapter_names=["a0"])

    def plain(module):
        return {k.replace(".base_layer", ""): v for k, v in module.state_dict().items() if ".lora_" not in k}

    cfg = config_from_diffusers(dict(reference.unet.config))
    return {
        "unet": from_diffusers(plain(reference.unet), cfg),
        "text_encoder": from_transformers(plain(reference.text_encoder)),
        "text_encoder_2": from_transformers(plain(reference.text_encoder_2), with_projection=True),
    }


def snapshot(pipe) -> dict[str, torch.Tensor]:
    return {f"{net}.{k}": v.detach().clone() for net, m in networks(pipe).items() for k, v in m.state_dict().items()}


def assert_weights_match(pipe, expected: dict[str, dict[str, torch.Tensor]]) -> None:
    for network in NETWORKS:
        state = getattr(pipe, network).state_dict()
        assert set(state) == set(expected[network]), network
        worst = max((state[k].float() - v.float()).abs().max().item() for k, v in expected[network].items())
        assert worst < WEIGHT_TOL, f"{network}: max weight difference {worst}"


def assert_bit_exact(pipe, before: dict[str, torch.Tensor]) -> None:
    after = snapshot(pipe)
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


LORAS = {
    "kohya": kohya_sdxl_lora,
    # LoCon: every resnet conv, the samplers, time_emb_proj, and the time and label embeddings too.
    "kohya-locon": lambda reference, seed: kohya_sdxl_lora(reference, seed, targets=LOCON_TARGETS),
    "kohya-diffusers-names": lambda reference, seed: kohya_sdxl_lora(reference, seed, ldm_names=False),
    "peft": peft_sdxl_lora,
}


@pytest.mark.parametrize("style", list(LORAS))
def test_an_sdxl_lora_merges_as_diffusers_fuses_it_and_restores_exactly(style, ours, reference):
    state = LORAS[style](reference, seed=1)
    weight = 0.75
    lora = lora_from_state_dict(state, style)
    assert {patch.network for patch in lora.patches} == set(NETWORKS)
    before = snapshot(ours)
    merge = LoraMerge(networks(ours))
    assert model_base(merge.networks) == "SDXL"
    merge.apply([(lora, weight, weight)])
    try:
        assert_weights_match(ours, fused_weights(reference, state, weight))
        changed = [k for k, v in snapshot(ours).items() if not torch.equal(v, before[k])]
        assert {k.split(".")[0] for k in changed} == set(NETWORKS)
    finally:
        merge.restore()
    assert_bit_exact(ours, before)


def test_the_kohya_unet_keys_are_ldm_names_of_levels_with_attention(ours, reference):
    """The tiny SDXL's first level has no transformer, its second two per block: the LDM names that
    sd-scripts writes reach input_blocks 4/5, middle_block 1 and output_blocks 0-2 only."""
    lora = lora_from_state_dict(kohya_sdxl_lora(reference, seed=2), "kohya")
    targets = {p.target for p in lora.patches if p.network == "unet"}
    blocks = {t.split("_transformer_blocks")[0].removesuffix("_proj_in").removesuffix("_proj_out") for t in targets}
    assert blocks == {
        "input_blocks_4_1",
        "input_blocks_5_1",
        "middle_block_1",
        *(f"output_blocks_{i}_1" for i in range(3)),
    }
    assert "input_blocks_4_1_transformer_blocks_1_attn2_to_k" in targets  # the second layer of a depth-2 level


def test_an_sd1_lora_on_sdxl_is_refused_with_the_reason(ours, reference_folders):
    sd1 = diffuse.load_pipeline(reference_folders["sd1"], dtype="float32")
    lora = lora_from_state_dict(random_lora(sd1, 3), "sd1_lora")
    before = snapshot(ours)
    with pytest.raises(LoraError, match=r"sd1_lora: made for SD 1.x / 2.x \(its key lora_te_text_model_.*SDXL"):
        LoraMerge(networks(ours)).apply([(lora, 1.0, 1.0)])
    unet_only = {k: v for k, v in random_lora(sd1, 3).items() if k.startswith("lora_unet_")}
    with pytest.raises(LoraError, match=r"match no module of this model \(SDXL\)|reads 768-wide text, this model's"):
        LoraMerge(networks(ours)).apply([(lora_from_state_dict(unet_only, "unet_only"), 1.0, 1.0)])
    tagged = lora_from_state_dict(unet_only, "tagged", metadata={"ss_v2": "False"})
    with pytest.raises(LoraError, match=r"made for SD 1.x \(its metadata says so\), this model is SDXL"):
        LoraMerge(networks(ours)).apply([(tagged, 1.0, 1.0)])
    assert_bit_exact(ours, before)


def test_an_sdxl_lora_on_sd1_is_refused_with_the_reason(reference, reference_folders):
    sd1 = diffuse.load_pipeline(reference_folders["sd1"], dtype="float32")
    sd1_networks = {"unet": sd1.unet, "text_encoder": sd1.text_encoder}
    lora = lora_from_state_dict(kohya_sdxl_lora(reference, seed=3), "xl_lora")
    with pytest.raises(LoraError, match=r"xl_lora: made for SDXL \(it changes a second text encoder: lora_te2_"):
        LoraMerge(sd1_networks).apply([(lora, 1.0, 1.0)])
    tagged = lora_from_state_dict(
        {k: v for k, v in kohya_sdxl_lora(reference, seed=3).items() if k.startswith("lora_unet_")},
        "tagged",
        metadata={"ss_base_model_version": "sdxl_base_v1-0"},
    )
    with pytest.raises(LoraError, match=r"made for SDXL \(its metadata says so\), this model is SD 1.x"):
        LoraMerge(sd1_networks).apply([(tagged, 1.0, 1.0)])


# ---- embeddings -----------------------------------------------------------------------------------


def sdxl_embedding_file(folder, name: str, count: int, widths=(32, 40), seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    halves = {key: torch.randn(count, width, generator=gen) * 0.3 for key, width in zip(SDXL_HALVES, widths)}
    save_file(halves, str(folder / f"{name}.safetensors"))
    return halves


def encode_with_embeddings(pipe, texts: list[str], embeddings) -> tuple[torch.Tensor, torch.Tensor]:
    """Context and pooled vector as conditioning_xl gives them, each encoder reading its half."""
    contexts, pooled = [], None
    for n, table in enumerate(per_encoder(embeddings)):
        tokenizer, encoder = (pipe.tokenizer, pipe.text_encoder) if n == 0 else (pipe.tokenizer_2, pipe.text_encoder_2)
        chunks = [chunk for text in texts for chunk in prompt_chunks(tokenizer, text, table)]
        ids = torch.tensor([chunk.ids for chunk in chunks])
        vectors = token_vectors(encoder, ids, chunks, table)
        hidden, pooled = encoder.sdxl_outputs(ids, tokenizer.eos_token_id, token_embeddings=vectors)
        contexts.append(apply_weights(hidden, chunks))
    return torch.cat(contexts, dim=-1), pooled


@pytest.mark.parametrize("count", [1, 3])
def test_an_sdxl_embedding_conditions_as_diffusers_loads_it_into_both_encoders(count, ours, reference, tmp_path):
    halves = sdxl_embedding_file(tmp_path, "sksobj", count, seed=count)
    loaded, skipped = load_sdxl_embeddings([tmp_path], (32, 40))
    assert list(loaded) == ["sksobj"] and not skipped
    entry = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 72, "vectors": count}
    assert loaded["sksobj"].api_entry() == entry == embedding_entry(loaded["sksobj"])  # A1111's listing
    assert embeddings_used(ours.tokenizer, ["x, SKSOBJ!", "y"], loaded) == ["sksobj"]
    for half, encoder, tokenizer in (
        ("clip_l", reference.text_encoder, reference.tokenizer),
        ("clip_g", reference.text_encoder_2, reference.tokenizer_2),
    ):
        reference.load_textual_inversion(halves[half], token="sksobj", text_encoder=encoder, tokenizer=tokenizer)
    prompt = "a photo of sksobj on a table"
    with torch.no_grad():
        expected, _, expected_pooled, _ = reference.encode_prompt(
            prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        context, pooled = encode_with_embeddings(ours, [prompt], loaded)
        plain, plain_pooled = encode_with_embeddings(ours, [prompt], {})
    torch.testing.assert_close(context, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(pooled, expected_pooled, atol=1e-4, rtol=0)
    # The embedding changed both halves of the context, and the pooled vector bigG gives.
    assert (context - plain)[..., :32].abs().max() > 1e-3 and (context - plain)[..., 32:].abs().max() > 1e-3
    assert (pooled - plain_pooled).abs().max() > 1e-3


def test_sdxl_embeddings_need_both_halves_of_the_encoders_widths(tmp_path):
    sdxl_embedding_file(tmp_path, "good", 2)
    sdxl_embedding_file(tmp_path, "wide", 2, widths=(32, 48))
    save_file({"clip_l": torch.ones(2, 32)}, str(tmp_path / "half.safetensors"))
    save_file({"clip_l": torch.ones(2, 32), "clip_g": torch.ones(3, 40)}, str(tmp_path / "uneven.safetensors"))
    save_file({"emb_params": torch.ones(2, 32)}, str(tmp_path / "sd1.safetensors"))
    loaded, skipped = load_sdxl_embeddings([tmp_path], (32, 40))
    assert list(loaded) == ["good"]
    assert set(skipped) == {"wide", "half", "uneven", "sd1"}
    assert "wide.safetensors: its clip_g vectors are 48 wide; this model's encoder takes 40" in skipped["wide"]
    assert "it lacks clip_g" in skipped["half"] and "lacks clip_l and clip_g (keys: emb_params)" in skipped["sd1"]
    assert "clip_l has 2 vectors and clip_g 3" in skipped["uneven"]
    with pytest.raises(EmbeddingError, match=r"half.safetensors: an SDXL embedding needs clip_l and clip_g"):
        read_sdxl_embedding(tmp_path / "half.safetensors", (32, 40))
    # The refiner has bigG alone: clip_l is not checked against an encoder it lacks.
    sdxl_embedding_file(tmp_path, "other_l", 2, widths=(24, 40))
    assert "its clip_l vectors are 24 wide" in load_sdxl_embeddings([tmp_path], (32, 40))[1]["other_l"]
    assert set(load_sdxl_embeddings([tmp_path], (None, 40))[0]) == {"good", "other_l"}
    first, second = per_encoder(loaded)
    assert first["good"].width == 32 and second["good"].width == 40 and first["good"].name == "good"


def test_the_text_encoder_weight_moves_both_encoders_and_the_unet_weight_the_unet(ours, reference):
    """`<lora:NAME:TE:UNET>`: A1111's te multiplier reaches both of SDXL's encoders."""
    lora = lora_from_state_dict(kohya_sdxl_lora(reference, seed=4), "split")
    before = snapshot(ours)
    merge = LoraMerge(networks(ours))
    for te_weight, unet_weight, moved in ((0.0, 1.0, {"unet"}), (1.0, 0.0, {"text_encoder", "text_encoder_2"})):
        merge.apply([(lora, te_weight, unet_weight)])
        changed = {k.split(".")[0] for k, v in snapshot(ours).items() if not torch.equal(v, before[k])}
        assert changed == moved
    merge.restore()
    assert_bit_exact(ours, before)


def sgm_attention_blocks() -> dict[str, int]:
    """SDXL base's transformers as sd-scripts names them (sgm layout, reference 1.1): block -> depth."""
    blocks = {f"input_blocks_{i}_1": 2 for i in (4, 5)} | {f"input_blocks_{i}_1": 10 for i in (7, 8)}
    blocks["middle_block_1"] = 10
    return blocks | {f"output_blocks_{i}_1": 10 for i in (0, 1, 2)} | {f"output_blocks_{i}_1": 2 for i in (3, 4, 5)}


def test_every_module_a_full_size_sdxl_kohya_lora_names_is_found():
    """sd-scripts' 722 UNet, 72 CLIP-L and 192 bigG modules of SDXL base, named from its layout
    rather than from our modules, all resolve on the full-size networks (built on meta)."""
    from diffuse.adapters.lora_keys import module_index, parse_key
    from diffuse.models.clip import CLIPTextEncoder
    from diffuse.models.configs import SDXL
    from diffuse.models.unet import UNet

    with torch.device("meta"):
        full = {
            "unet": UNet(SDXL.unet),
            "text_encoder": CLIPTextEncoder(SDXL.text_encoder),
            "text_encoder_2": CLIPTextEncoder(SDXL.text_encoder_2),
        }
    layer = ["attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0", *[f"attn2_{p}" for p in ("to_q", "to_k")]]
    layer += ["attn2_to_v", "attn2_to_out_0", "ff_net_0_proj", "ff_net_2"]
    unet = [
        f"lora_unet_{block}_{part}"
        for block, depth in sgm_attention_blocks().items()
        for part in ["proj_in", "proj_out", *[f"transformer_blocks_{d}_{p}" for d in range(depth) for p in layer]]
    ]
    text = [f"self_attn_{p}_proj" for p in ("q", "k", "v", "out")] + ["mlp_fc1", "mlp_fc2"]
    te1 = [f"lora_te1_text_model_encoder_layers_{i}_{p}" for i in range(12) for p in text]
    te2 = [f"lora_te2_text_model_encoder_layers_{i}_{p}" for i in range(32) for p in text]
    assert (len(unet), len(te1), len(te2)) == (722, 72, 192)
    index = module_index(full)
    for name in unet + te1 + te2:
        network, target, _, _ = parse_key(f"{name}.lora_down.weight")
        assert (network, target) in index, name
    cross = full["unet"].get_submodule(index[("unet", "middle_block_1_transformer_blocks_9_attn2_to_k")])
    assert cross.in_features == 2048
    assert model_base(full) == "SDXL"
