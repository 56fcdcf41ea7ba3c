"""Assembling the shipped model: three finished training stages -> one diffusers model folder.

    vae_dir   final.*                the autoencoder (its measured scaling factor is in its config)
    clip_dir  final.*                the text encoder (the tokenizer's pad id in its extra)
              final_image_tower.*    the image side it was trained against (optional)
    unet_dir  final.*                the noise predictor (prediction type, latent sample size, and the
                                     folders of the two stages it was trained on, in its extra)

`assemble` loads the three, checks that they belong together, builds the Pipeline a user
gets back from `load_pipeline`, and writes it with save_diffusers_folder (fp16 by default)
together with two things of diffuse's own, in the same staging folder, so the model folder
appears complete or not at all:

    vae/latent_rgb.json   the step-preview matrix fitted to this VAE (SD's table is only right
                          for SD's VAE); the loader reads it into Pipeline.preview_matrix
    image_tower/          the CLIP stage's final_image_tower.* as they are, to score the text
                          encoder by caption retrieval (diffuse.shapes.evaluate); the loader and
                          diffusers never read it

What must agree, and what happens when it does not:
  - the UNet's in/out channels and the VAE's latent channels, the UNet's context_dim and the
    text encoder's width, the image tower's text width and the text encoder's: errors, since
    the networks could not run together;
  - the VAE and text encoder given and the ones the UNet run recorded: the sha256 of the
    weights it trained on must match (a UNet trained on another latent space or other text
    states would run and draw noise, so a mismatch is an error, also when the stage was
    retrained in the same folder). UNet stages from before that record only the folders
    (vae_dir, text_encoder_dir, relative to where training ran): the same folder, or one
    holding the same weights and config, is fine, another is an error, and a recorded folder
    that is gone cannot be checked: an AssemblyWarning.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch

from diffuse.checkpoints.export import save_diffusers_folder, scheduler_config
from diffuse.models.configs import PipelineConfig, VAEConfig
from diffuse.models.vae import AutoencoderKL
from diffuse.pipeline import Pipeline
from diffuse.preview import fit_preview_matrix
from diffuse.runtime import prepare
from diffuse.samplers.schedule import NoiseSchedule
from diffuse.tokenizer import CLIPTokenizer
from diffuse.train.components import IMAGE_TOWER_DIR, final_files, load_final, read_final_info, weights_sha256
from diffuse.train.config_files import config_from_dict, world_data_from_dict
from diffuse.train.worlds import DEFAULT_DATA, WorldData, make_dataset

PREVIEW_SAMPLES = 256  # dataset images the preview matrix is fitted on
PREVIEW_DATA_SEED = 0  # which images of the world: any will do, the fit is of the VAE, not of the data


class AssemblyWarning(UserWarning):
    """Something about the stages that could not be checked, or that leaves the model without a part."""


def assemble(
    vae_dir: str | Path,
    clip_dir: str | Path,
    unet_dir: str | Path,
    out_folder: str | Path,
    *,
    dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
    preview_samples: int = PREVIEW_SAMPLES,
) -> Path:
    """Write the model made of the three finished stages as a diffusers folder at `out_folder`; returns it."""
    out_folder = Path(out_folder).expanduser()
    pipe = build_pipeline(vae_dir, clip_dir, unet_dir, source=out_folder, preview_samples=preview_samples)
    extra_files = {}
    tower_files = final_files(clip_dir, "image_tower")
    if tower_files[1].is_file():
        check_image_tower(clip_dir, pipe.config)
        extra_files = {f"{IMAGE_TOWER_DIR}/{path.name}": path.read_bytes() for path in tower_files}
    else:
        warnings.warn(
            f"{clip_dir} holds no image tower ({tower_files[1].name}): the model is written without one, "
            "and `diffuse eval` will skip caption retrieval. Running the CLIP stage again with the same "
            "config and --out writes it from the last checkpoint without training further.",
            AssemblyWarning,
            stacklevel=2,
        )
    return save_diffusers_folder(pipe, out_folder, dtype=dtype, overwrite=overwrite, extra_files=extra_files)


def build_pipeline(
    vae_dir: str | Path,
    clip_dir: str | Path,
    unet_dir: str | Path,
    *,
    source: str | Path,
    preview_samples: int = PREVIEW_SAMPLES,
) -> Pipeline:
    """The float32 Pipeline of the three finished stages, checked to fit together, with a preview
    matrix fitted to its VAE. `source` is the folder it will be saved as (its name names the model)."""
    vae_dir, clip_dir, unet_dir, source = Path(vae_dir), Path(clip_dir), Path(unet_dir), Path(source)
    vae, vae_config, _ = load_final(vae_dir, "vae")
    text_encoder, text_config, text_extra = load_final(clip_dir, "text_encoder")
    unet, unet_config, unet_extra = load_final(unet_dir, "unet")
    if unet_config.in_channels != vae_config.latent_channels or unet_config.out_channels != vae_config.latent_channels:
        raise ValueError(
            f"the UNet in {unet_dir} has {unet_config.in_channels} in / {unet_config.out_channels} out "
            f"channels, but the VAE in {vae_dir} has {vae_config.latent_channels} latent channels"
        )
    if unet_config.context_dim != text_config.width:
        raise ValueError(
            f"the UNet in {unet_dir} attends to {unet_config.context_dim}-wide text states, but the text "
            f"encoder in {clip_dir} is {text_config.width} wide"
        )
    for key in ("prediction_type", "sample_size"):
        if key not in unet_extra:
            raise ValueError(f"{final_files(unet_dir, 'unet')[1]} does not record the UNet's {key}")
    if "pad_token_id" not in text_extra:
        raise ValueError(f"{final_files(clip_dir, 'text_encoder')[1]} does not record the tokenizer's pad_token_id")
    for component, given in (("vae", vae_dir), ("text_encoder", clip_dir)):
        check_recorded_stage(unet_extra, given, component, unet_dir)

    config = PipelineConfig(
        name=source.name,
        text_encoder=text_config,
        unet=unet_config,
        vae=vae_config,
        prediction_type=unet_extra["prediction_type"],
        pad_token_id=text_extra["pad_token_id"],
        sample_size=unet_extra["sample_size"],
    )
    # Prepared as the loader prepares a model, so the preview fit and the evaluation run what users run.
    text_encoder, unet, vae = (prepare(net, "cpu", torch.float32) for net in (text_encoder, unet, vae))
    pipe = Pipeline(
        tokenizer=CLIPTokenizer.from_bpe_gz(pad_token_id=config.pad_token_id),
        text_encoder=text_encoder,
        unet=unet,
        vae=vae,
        config=config,
        source=source,
        preview_matrix=fit_vae_preview(
            vae, vae_config, preview_data(unet_dir, vae_dir, config.image_size), preview_samples
        ),
    )
    pipe.scheduler_config = trained_scheduler_config(pipe, unet_dir)
    return pipe


def trained_scheduler_config(pipe: Pipeline, unet_dir: Path) -> dict:
    """SD's scheduler settings with the noise schedule the UNet was trained on (its training config's)."""
    trained_with = read_final_info(unet_dir, "unet").get("trained_with", {})
    schedule = config_from_dict(
        NoiseSchedule,
        trained_with.get("schedule", {}),
        where=f"{final_files(unet_dir, 'unet')[1]}: trained_with.schedule",
    )
    schedule = dataclasses.replace(schedule, prediction_type=pipe.config.prediction_type)
    return {**scheduler_config(pipe), **dataclasses.asdict(schedule)}


def preview_data(unet_dir: Path, vae_dir: Path, image_size: int) -> WorldData:
    """The world the UNet was trained on (or else the VAE), at PREVIEW_DATA_SEED and the model's image
    size: the preview is fitted on the colours the model draws. A stage that records no training data
    (one diffuse.train.unpack wrote) leaves the shapes world."""
    for folder, component in ((unet_dir, "unet"), (vae_dir, "vae")):
        section = read_final_info(folder, component).get("trained_with", {}).get("data")
        if isinstance(section, dict):
            where = f"{final_files(folder, component)[1]}: trained_with.data"
            data = world_data_from_dict(section, where)
            break
    else:
        data = DEFAULT_DATA
    return dataclasses.replace(data, seed=PREVIEW_DATA_SEED, image_size=image_size)


@torch.no_grad()
def fit_vae_preview(vae: AutoencoderKL, config: VAEConfig, data: WorldData, samples: int) -> torch.Tensor:
    """The latent -> RGB matrix (with bias) that best maps this VAE's latents (posterior means, UNet
    scale) to its own decodes, on `samples` images of the world `data` describes."""
    if samples < 1:
        raise ValueError(f"the preview matrix needs at least one image to be fitted on, not {samples}")
    dataset = make_dataset(data)
    latents, decodes = [], []
    for start in range(0, samples, 32):
        images, _, _ = dataset.batch(start, min(32, samples - start))
        mean = vae.encode(images).mean
        latents.append(mean * config.scaling_factor)
        decodes.append(vae.decode(mean))
    return fit_preview_matrix(torch.cat(latents), torch.cat(decodes))


def check_recorded_stage(unet_extra: dict, given: Path, component: str, unet_dir: Path) -> None:
    """Refuse a `component` other than the one the UNet was trained on; warn where that cannot be told.

    The UNet stage records the sha256 of the weights it trained on, which settles it wherever the
    folders are now. Stages trained before that record only the folder: the same folder passes
    (even if retrained since, which cannot be told), another must hold the same weights and config.
    """
    recorded_sha = unet_extra.get(f"{component}_sha256")
    if recorded_sha is not None:
        if weights_sha256(given, component) != recorded_sha:
            raise ValueError(
                f"the UNet in {unet_dir} was trained on another {component} than the one in {given} "
                f"(its weights' sha256 differs: retrained since, or another run's); assemble it with "
                f"the {component} it was trained on"
            )
        return
    recorded = unet_extra.get(f"{component}_dir")
    if recorded is None:
        warnings.warn(
            f"{unet_dir} does not record which {component} it was trained on: cannot check {given}",
            AssemblyWarning,
            stacklevel=3,
        )
        return
    recorded_dir = Path(recorded)
    if recorded_dir.resolve() == given.resolve():
        return
    if not final_files(recorded_dir, component)[1].is_file():
        warnings.warn(
            f"the UNet in {unet_dir} was trained on the {component} in {recorded}, which is not there "
            f"(from {Path.cwd()}): cannot check that {given} holds the same one",
            AssemblyWarning,
            stacklevel=3,
        )
        return
    if _fingerprint(recorded_dir, component) != _fingerprint(given, component):
        raise ValueError(
            f"the UNet in {unet_dir} was trained on the {component} in {recorded}, and {given} holds a "
            f"different one (other weights or config); assemble it with the {component} it was trained on"
        )


def _fingerprint(folder: Path, component: str) -> tuple[str, dict]:
    """What makes two finished components the same: their weights' bytes and their architecture config."""
    return weights_sha256(folder, component), read_final_info(folder, component)["config"]


def check_image_tower(clip_dir: str | Path, config: PipelineConfig) -> None:
    """The tower must read this text encoder's states; one for another image size is only a warning
    (it is used for scoring alone, and the evaluation then skips it)."""
    _, tower_config, _ = load_final(clip_dir, "image_tower")
    if tower_config.text_width != config.text_encoder.width:
        raise ValueError(
            f"the image tower in {clip_dir} projects {tower_config.text_width}-wide text states, but the "
            f"text encoder is {config.text_encoder.width} wide"
        )
    image_size = config.image_size
    if tower_config.image_encoder.image_size != image_size:
        warnings.warn(
            f"the image tower in {clip_dir} reads {tower_config.image_encoder.image_size}px images, the "
            f"model draws {image_size}px ones: caption retrieval will be skipped",
            AssemblyWarning,
            stacklevel=3,
        )
