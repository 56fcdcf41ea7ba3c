"""load_pipeline end to end: diffusers folders and original single-file checkpoints,
compared with the reference libraries, plus the ways a checkpoint can be wrong."""

from __future__ import annotations

import shutil

import pytest
import torch
from parity import TOL
from safetensors.torch import load_file, save_file

import diffuse
from diffuse.checkpoints.single_file import join_single_file, save_single_file, split_single_file


def pipeline_state(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{k}": v
        for name in ("text_encoder", "unet", "vae")
        for k, v in getattr(pipe, name).state_dict().items()
    }


def add_unused_open_clip_head(state, layers, width):
    """What a real SD2 file carries beyond what SD2 runs: OpenCLIP-H's last block (SD2
    conditions on the penultimate layer) and its contrastive head. Written so the file is faithful."""
    prefix = "cond_stage_model.model."
    for k, v in list(state.items()):
        if k.startswith(prefix + "transformer.resblocks.0."):
            state[k.replace(".resblocks.0.", f".resblocks.{layers}.")] = torch.randn_like(v)
    state[prefix + "text_projection"] = torch.randn(width, width)
    state[prefix + "logit_scale"] = torch.tensor(4.6052)


def export_single_file(pipe, path, fmt):
    family = "sd1" if pipe.config.pad_token_id == 49407 else "sd2"
    text = pipe.text_encoder.state_dict()
    state = join_single_file(family, pipe.unet.state_dict(), pipe.vae.state_dict(), text)
    if family == "sd2":
        add_unused_open_clip_head(state, pipe.config.text_encoder.layers, pipe.config.text_encoder.width)
    return save_single_file(state, path, fmt)


@pytest.fixture(scope="module")
def loaded(reference_folders):
    return {style: diffuse.load_pipeline(folder, dtype="float32") for style, folder in reference_folders.items()}


def test_folder_pipeline_matches_reference(style, loaded, reference_pipes):
    ours, ref = loaded[style], reference_pipes[style]
    prompts = ["a photo of a cat", "an astronaut riding a horse, (masterpiece:1.2)"]
    ids = ref.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ours.tokenizer(prompts), ids)
    with torch.no_grad():
        # The raw encoder: encode_prompt would apply A1111's (word:1.2) weighting, which diffusers does not.
        context = ours.text_encoder(ids)
        assert (context - ref.text_encoder(ids)[0]).abs().max() <= TOL

        latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        t = torch.tensor([1, 900])
        noise = ours.unet(latents, t, context)
        assert (noise - ref.unet(latents, t, encoder_hidden_states=context).sample).abs().max() <= TOL

        image = ours.vae.decode(latents)
        assert (image - ref.vae.decode(latents).sample).abs().max() <= TOL
    assert ours.config.prediction_type == ref.scheduler.config.prediction_type
    assert ours.config.pad_token_id == ref.tokenizer.pad_token_id


@pytest.mark.parametrize("fmt,name", [("safetensors", "model.safetensors"), ("ckpt", "model.ckpt")])
def test_single_file_loads_bitwise_identical(style, loaded, tmp_path, fmt, name):
    folder_pipe = loaded[style]
    path = export_single_file(folder_pipe, tmp_path / name, fmt)
    single = diffuse.load_pipeline(path, config=folder_pipe.config, dtype="float32")
    expected, got = pipeline_state(folder_pipe), pipeline_state(single)
    assert expected.keys() == got.keys()
    for k in expected:
        assert torch.equal(expected[k], got[k]), k
    assert single.tokenizer.pad_token_id == folder_pipe.tokenizer.pad_token_id


def test_single_file_is_what_diffusers_reads(style, loaded, reference_folders, reference_pipes, tmp_path):
    """Our exported file, read by diffusers' own single-file loader, gives the reference weights:
    the layout we write (and therefore read) is the original one, not merely self-consistent."""
    from diffusers import StableDiffusionPipeline

    path = export_single_file(loaded[style], tmp_path / "model.safetensors", "safetensors")
    theirs = StableDiffusionPipeline.from_single_file(
        str(path), config=str(reference_folders[style]), local_files_only=True, safety_checker=None
    )
    ref = reference_pipes[style]
    for name in ("unet", "vae", "text_encoder"):
        want = getattr(ref, name).state_dict()
        have = getattr(theirs, name).state_dict()
        for k, v in want.items():
            if k.endswith("position_ids"):
                continue
            assert torch.equal(v, have[k]), f"{name}.{k}"


def test_full_size_architectures_are_detected():
    """Detection on the real SD1.5 / SD2 layouts, built on the meta device (shapes only, no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffuse.checkpoints import clip_layout, unet_layout, vae_layout
    from diffuse.models.configs import SD1, SD2

    with torch.device("meta"):
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
        )
        unets = {
            "sd1": UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8),
            "sd2": UNet2DConditionModel(
                cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True
            ),
        }
        texts = {
            "sd1": CLIPTextModel(
                CLIPTextConfig(
                    hidden_size=768,
                    intermediate_size=3072,
                    num_hidden_layers=12,
                    num_attention_heads=12,
                    hidden_act="quick_gelu",
                )
            ),
            "sd2": CLIPTextModel(
                CLIPTextConfig(
                    hidden_size=1024,
                    intermediate_size=4096,
                    num_hidden_layers=23,
                    num_attention_heads=16,
                    hidden_act="gelu",
                )
            ),
        }
    for family, preset in (("sd1", SD1), ("sd2", SD2)):
        unet = unet_layout.from_diffusers(unets[family].state_dict(), preset.unet)
        text = clip_layout.from_transformers(texts[family].state_dict())
        state = join_single_file(family, unet, vae_layout.from_diffusers(vae.state_dict(), preset.vae), text)
        if family == "sd2":
            add_unused_open_clip_head(state, 23, 1024)
        config, _ = split_single_file(state, diffuse.loader.Path(f"{family}.safetensors"))
        assert config.unet == preset.unet
        assert config.vae == preset.vae
        assert config.text_encoder == preset.text_encoder
        assert config.pad_token_id == preset.pad_token_id


def test_bin_weights_in_folder(reference_pipes, loaded, tmp_path):
    reference_pipes["sd1"].save_pretrained(tmp_path, safe_serialization=False)
    assert list(tmp_path.glob("unet/*.bin"))
    pipe = diffuse.load_pipeline(tmp_path, dtype="float32")
    expected, got = pipeline_state(loaded["sd1"]), pipeline_state(pipe)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_dtype_is_applied(reference_folders):
    pipe = diffuse.load_pipeline(reference_folders["sd1"], dtype="bfloat16")
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="unsupported dtype"):
        diffuse.load_pipeline(reference_folders["sd1"], dtype="int8")


# --- what can be wrong with a checkpoint, each reported with the file and the tensor ---


@pytest.fixture
def single_file(loaded, tmp_path):
    return export_single_file(loaded["sd1"], tmp_path / "broken.safetensors", "safetensors"), loaded["sd1"].config


def rewrite(path, change):
    state = load_file(path)
    change(state)
    save_file(state, path)


def test_missing_tensor_named(single_file):
    path, config = single_file
    rewrite(path, lambda s: s.pop("model.diffusion_model.out.2.weight"))
    with pytest.raises(diffuse.CheckpointError, match=r"broken\.safetensors.*out\.2\.weight"):
        diffuse.load_pipeline(path, config=config, dtype="float32")


def test_misshaped_tensor_named(single_file):
    path, config = single_file
    rewrite(path, lambda s: s.update({"first_stage_model.quant_conv.weight": torch.zeros(8, 8, 3, 3)}))
    with pytest.raises(diffuse.CheckpointError, match=r"broken\.safetensors.*quant_conv\.weight.*shape"):
        diffuse.load_pipeline(path, config=config, dtype="float32")


def test_unexpected_tensor_named(single_file):
    path, config = single_file
    rewrite(path, lambda s: s.update({"model.diffusion_model.label_emb.0.0.weight": torch.zeros(4, 4)}))
    with pytest.raises(diffuse.CheckpointError, match=r"broken\.safetensors.*label_emb"):
        diffuse.load_pipeline(path, config=config, dtype="float32")


def test_nan_weight_named(single_file):
    path, config = single_file

    def poison(s):
        s["cond_stage_model.transformer.text_model.final_layer_norm.weight"][0] = float("nan")

    rewrite(path, poison)
    with pytest.raises(diffuse.CheckpointError, match=r"broken\.safetensors.*final_layer_norm\.weight"):
        diffuse.load_pipeline(path, config=config, dtype="float32")


def test_not_a_model(tmp_path, reference_folders):
    with pytest.raises(diffuse.CheckpointError, match="no such file"):
        diffuse.load_pipeline(tmp_path / "nothing.safetensors", dtype="float32")
    with pytest.raises(diffuse.CheckpointError, match="not a diffusers model folder"):
        diffuse.load_pipeline(tmp_path, dtype="float32")
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(diffuse.CheckpointError, match=r"other\.safetensors.*no Stable Diffusion UNet"):
        diffuse.load_pipeline(tmp_path / "other.safetensors", dtype="float32")
    folder = tmp_path / "partial"
    shutil.copytree(reference_folders["sd1"], folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(diffuse.CheckpointError, match=r"unet.*no weights file"):
        diffuse.load_pipeline(folder, dtype="float32")


def test_v_prediction_probe_reads_the_models_answer_at_the_last_timestep(loaded):
    """SD2 single files without a .yaml: the probe looks at what the UNet predicts for a grey
    latent at t=999. Its last convolution is set so the answer is known."""
    import copy

    from diffuse.loader import predicts_v

    unet = copy.deepcopy(loaded["sd2"].unet)
    final = unet.out[-1]
    with torch.no_grad():
        final.weight.zero_()
        final.bias.fill_(0.4)  # answers ≈ the latent (0.5): a noise predictor
        assert not predicts_v(unet)
        final.bias.fill_(-2.0)  # answers far below it, like minus a clean image: a v-predictor
        assert predicts_v(unet)
