"""A model folder -> the three finished training stages it is made of: assembling, run backwards.

    out/vae    final.*                the autoencoder
    out/clip   final.*                the text encoder (the tokenizer's pad id in its extra)
               final_image_tower.*    the model folder's image tower, when it has one
    out/unet   final.*                the noise predictor (prediction type, latent sample size, the
                                      sha256 of the two stages above as the ones it works with; its
                                      noise schedule as trained_with.schedule, from the folder's
                                      scheduler config)

So a finished model can be trained further: a stage's `init_from` starts from one of these
folders instead of from random weights (fine-tuning), and `diffuse assemble` puts any mix of
unpacked and newly trained stages back together. Assembling the three unpacked stages as they
are gives back the same networks.

Weights are written in float32, whatever the folder stores (the shipped model: float16), so
training continues from exactly the values the folder generates with.
"""

from __future__ import annotations

from pathlib import Path

from diffuse.loader import load_pipeline
from diffuse.pipeline import Pipeline
from diffuse.samplers.schedule import NoiseSchedule
from diffuse.train.components import FINAL_INFO, IMAGE_TOWER_DIR, final_files, load_final, save_final, weights_sha256

STAGE_DIRS = {"vae": "vae", "text_encoder": "clip", "unet": "unet"}  # component -> its stage folder under out


def unpack(model: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write the model folder's components as finished stages under `out_dir`; returns {component: folder}."""
    model, out_dir = Path(model), Path(out_dir)
    folders = {component: out_dir / name for component, name in STAGE_DIRS.items()}
    for folder in folders.values():
        if (folder / FINAL_INFO).exists():
            raise ValueError(f"{folder} already holds a finished stage; unpack into a new folder")
    pipe = load_pipeline(model, dtype="float32")
    provenance = {"unpacked_from": pipe.model_name, "model_hash": pipe.model_hash}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    save_final(folders["vae"], "vae", pipe.vae.eval(), pipe.config.vae, provenance)
    # The tower first: the text encoder's final.json is what marks the stage finished.
    tower_folder = model / IMAGE_TOWER_DIR
    if final_files(tower_folder, "image_tower")[1].is_file():
        tower, tower_config, _ = load_final(tower_folder, "image_tower")
        save_final(folders["text_encoder"], "image_tower", tower, tower_config, provenance)
    save_final(
        folders["text_encoder"],
        "text_encoder",
        pipe.text_encoder.eval(),
        pipe.config.text_encoder,
        provenance,
        extra={"pad_token_id": pipe.config.pad_token_id},
    )
    # The UNet records the two stages beside it as the ones it was trained on, as a trained
    # UNet stage does: assembling it with a text encoder trained further is then refused.
    save_final(
        folders["unet"],
        "unet",
        pipe.unet.eval(),
        pipe.config.unet,
        {**provenance, "schedule": noise_schedule(pipe)},
        extra={
            "prediction_type": pipe.config.prediction_type,
            "sample_size": pipe.config.sample_size,
            "vae_sha256": weights_sha256(folders["vae"], "vae"),
            "text_encoder_sha256": weights_sha256(folders["text_encoder"], "text_encoder"),
        },
    )
    return folders


def noise_schedule(pipe: Pipeline) -> dict:
    """The forward-diffusion settings in the folder's scheduler config (SD's defaults where it says nothing)."""
    defaults = NoiseSchedule()
    settings = {
        name: pipe.scheduler_config.get(name, getattr(defaults, name))
        for name in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
    }
    return {**settings, "prediction_type": pipe.config.prediction_type}
