"""`load_pipeline`: any supported checkpoint path → a ready Pipeline.

A diffusers folder or an original single-file checkpoint (.safetensors or .ckpt,
format decided from the bytes); a folder's vae/latent_rgb.json, where diffuse wrote one,
sets the step-preview matrix. Networks are built on the meta device and filled
strictly, so a bad file fails with a CheckpointError naming it and the tensor,
and nothing half-loaded is ever returned.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from diffuse.adapters.library import AddonLibrary
from diffuse.checkpoints.diffusers_folder import (
    check_tokenizer_files,
    is_diffusers_folder,
    read_diffusers_folder,
    read_json,
    read_preview_matrix,
    read_scheduler_config,
)
from diffuse.checkpoints.errors import CheckpointError
from diffuse.checkpoints.fill import build_and_fill
from diffuse.checkpoints.reader import read_state_dict
from diffuse.checkpoints.single_file import detect_family, sidecar_prediction_type, split_single_file
from diffuse.models.clip import CLIPTextEncoder
from diffuse.models.configs import PipelineConfig, check_pipeline
from diffuse.models.unet import UNet
from diffuse.models.vae import AutoencoderKL
from diffuse.pipeline import Pipeline
from diffuse.runtime import check_quantize, inference_layout, keep_freed_memory, prepare, resolve_device, resolve_dtype
from diffuse.tokenizer import CLIPTokenizer


def load_pipeline(
    path: str | Path,
    dtype: torch.dtype | str | None = "auto",
    device: str | torch.device = "cpu",
    config: PipelineConfig | None = None,
    lora_dirs: Iterable[str | Path] = (),
    embedding_dirs: Iterable[str | Path] = (),
    quantize: str | None = None,
) -> Pipeline:
    """Load a Stable Diffusion 1.x/2.x model from a diffusers folder or a single-file checkpoint.

    `dtype` "auto" runs the networks in bfloat16 where the CPU (or GPU) computes it
    natively, else float32 (diffuse.runtime, whose prepare() makes each network fast for
    inference once its weights are in); "float32" (or None) is the exact path that
    matches the reference implementations. `config` overrides architecture detection for
    single-file checkpoints (head counts and v-prediction are not stored in the weights).

    `quantize` "int8" runs the networks' chosen layers on 8-bit integers (diffuse.runtime.prepare
    decides which, per network; it needs bfloat16 on the CPU); None (the default) leaves them in
    `dtype`. `pipe.quantize` says which, and every image's parameters record it. Any other value,
    or int8 with another dtype or device, is a one-line ValueError before anything is read.

    `lora_dirs` and `embedding_dirs` are the folders whose add-ons the prompts may name
    (`<lora:NAME:0.8>`, an embedding's file name); `pipe.loras()` and `pipe.embeddings()` list
    what they hold and `pipe.refresh_addons()` looks again. A folder that does not exist is a
    ValueError before anything is read.

    Anything wrong with the files raises CheckpointError and nothing is kept: a caller that
    holds a pipeline already (the server) can go on using it.
    """
    path = Path(path).expanduser()
    lora_dirs, embedding_dirs = list(lora_dirs), list(embedding_dirs)
    addons = AddonLibrary(lora_dirs, embedding_dirs) if lora_dirs or embedding_dirs else None
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    check_quantize(quantize, device, dtype)
    if device.type == "cpu":
        keep_freed_memory()
    try:
        pipe = _load(path, dtype, device, config, quantize)
    except CheckpointError:
        raise
    except (
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        RuntimeError,
        OSError,
        RecursionError,
        MemoryError,
    ) as e:
        # Each known fault has its own message; this keeps the promise above for an unforeseen one.
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(path, f"could not be loaded: {type(e).__name__}: {detail[:300]}") from e
    if addons is not None:
        pipe.addons = addons
        pipe.refresh_addons()  # the embeddings read for this model's text-encoder width
    return pipe


@dataclass
class _Read:
    """What a model's files hold before any network is built: the tensors per network in diffuse's
    layout (popped as each network is filled, so each is held once), and what goes with them."""

    config: PipelineConfig
    states: dict[str, dict[str, torch.Tensor]]
    files: dict[str, Path]
    tokenizer: CLIPTokenizer | None  # None: the SDXL refiner, which has the second alone
    tokenizer_2: CLIPTokenizer | None = None  # SDXL's second tokenizer (bigG's)
    scheduler_config: dict = field(default_factory=dict)  # {}: Stable Diffusion's defaults
    preview_matrix: torch.Tensor | None = None  # None: SD's
    probe_v: bool = False  # whether to ask the UNet if it predicts v (SD2 single files)
    zeros_for_empty_prompt: bool = True


def _read_folder(path: Path, config: PipelineConfig | None) -> _Read:
    if not is_diffusers_folder(path):
        raise CheckpointError(
            path, "a folder, but not a diffusers model folder (no model_index.json or unet/config.json)"
        )
    # SDXL's second tokenizer (bigG's); its pad id is its own (0 in the SDXL folders). The refiner has it alone.
    tokenizer_2 = read_tokenizer(path / "tokenizer_2") if (path / "tokenizer_2").is_dir() else None
    tokenizer = (
        None if tokenizer_2 is not None and not (path / "tokenizer").exists() else read_tokenizer(path / "tokenizer")
    )
    pad = {} if tokenizer is None else {"pad_token_id": tokenizer.pad_token_id}
    pad_2 = {} if tokenizer_2 is None else {"pad_token_id_2": tokenizer_2.pad_token_id}
    detected, weights = read_diffusers_folder(path, **pad, **pad_2)
    config = config or detected
    return _Read(
        config=config,
        states={name: state for name, (state, _) in weights.items()},
        files={name: file for name, (_, file) in weights.items()},
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler_config=read_scheduler_config(path),
        preview_matrix=read_preview_matrix(path, config.vae.latent_channels),
        zeros_for_empty_prompt=read_zeros_for_empty_prompt(path),
    )


def _read_single_file(path: Path, config: PipelineConfig | None) -> _Read:
    state = read_state_dict(path)
    # SD2 weights do not say whether they predict noise (512-base) or v (768-v).
    probe = config is None and detect_family(state, path) == "sd2" and sidecar_prediction_type(path) is None
    config, states = split_single_file(state, path, config)
    del state  # `states` alone holds the tensors now: filling releases them one by one
    tokenizer = CLIPTokenizer.from_bpe_gz(pad_token_id=config.pad_token_id) if config.text_encoder else None
    # SDXL's bigG reads the same vocabulary, padded with its own id (the refiner has it alone).
    tokenizer_2 = CLIPTokenizer.from_bpe_gz(pad_token_id=config.pad_token_id_2) if config.text_encoder_2 else None
    return _Read(config, states, dict.fromkeys(states, path), tokenizer, probe_v=probe, tokenizer_2=tokenizer_2)


def _load(
    path: Path, dtype: torch.dtype, device: torch.device, config: PipelineConfig | None, quantize: str | None
) -> Pipeline:
    if not path.exists():
        raise CheckpointError(path, "no such file or folder")
    read = _read_folder(path, config) if path.is_dir() else _read_single_file(path, config)
    config = read.config
    try:
        check_pipeline(config)  # before anything is built from it
    except ValueError as e:
        raise CheckpointError(path, f"unusable architecture: {e}") from None
    if len({config.text_encoder_2 is not None, read.tokenizer_2 is not None, "text_encoder_2" in read.states}) != 1:
        raise CheckpointError(path, "an SDXL model needs its text_encoder_2 config, weights and tokenizer_2 together")
    if len({config.text_encoder is not None, read.tokenizer is not None, "text_encoder" in read.states}) != 1:
        raise CheckpointError(
            path, "the text_encoder config, weights and tokenizer must be there together or not at all"
        )

    def fill(name, make):
        # Laid out while filling, so each weight is copied once; prepare() then finds it in place.
        module = build_and_fill(
            make, read.states.pop(name), read.files[name], name, dtype=dtype, device=device, layout=inference_layout
        )
        return prepare(module, device, dtype, quantize=quantize)

    unet = fill("unet", lambda: UNet(config.unet))
    if read.probe_v and predicts_v(unet):
        config = replace(config, prediction_type="v_prediction")
    text_encoder = text_encoder_2 = None
    if config.text_encoder is not None:
        text_encoder = fill("text_encoder", lambda: CLIPTextEncoder(config.text_encoder))
    if config.text_encoder_2 is not None:
        text_encoder_2 = fill("text_encoder_2", lambda: CLIPTextEncoder(config.text_encoder_2))
    return Pipeline(
        tokenizer=read.tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        vae=fill("vae", lambda: AutoencoderKL(config.vae)),
        config=config,
        source=path,
        scheduler_config=read.scheduler_config,
        preview_matrix=read.preview_matrix,
        tokenizer_2=read.tokenizer_2,
        text_encoder_2=text_encoder_2,
        zeros_for_empty_prompt=read.zeros_for_empty_prompt,
        quantize=quantize,
    )


def read_tokenizer(folder: Path) -> CLIPTokenizer:
    """A folder's tokenizer; any fault in its files is a CheckpointError naming the folder."""
    check_tokenizer_files(folder)
    try:
        return CLIPTokenizer.from_folder(folder)
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError) as e:
        raise CheckpointError(folder, f"unreadable tokenizer files: {type(e).__name__}: {str(e)[:300]}") from None


def read_zeros_for_empty_prompt(root: Path) -> bool:
    """model_index.json's `force_zeros_for_empty_prompt` (SDXL; diffusers' default True when absent)."""
    index = root / "model_index.json"
    value = read_json(index).get("force_zeros_for_empty_prompt", True) if index.is_file() else True
    if not isinstance(value, bool):
        raise CheckpointError(index, f"force_zeros_for_empty_prompt={value!r}: must be true or false")
    return value


@torch.no_grad()
def predicts_v(unet: UNet) -> bool:
    """A1111's test for SD2 v-models: at the last timestep, given a flat grey latent, a noise
    predictor answers with something like the latent itself, while a v-predictor answers with
    roughly minus the clean image, far below it (mean difference under -1)."""
    param = next(unet.parameters())
    x = torch.full((1, unet.cfg.in_channels, 8, 8), 0.5, dtype=param.dtype, device=param.device)
    context = torch.full((1, 2, unet.cfg.context_dim), 0.5, dtype=param.dtype, device=param.device)
    out = unet(x, torch.tensor([999], device=param.device), context)
    return (out.float() - x[:, : out.shape[1]].float()).mean().item() < -1


CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


def model_paths(folder: Path) -> list[Path]:
    """The models in a folder, one level deep: .safetensors and .ckpt files and diffusers folders, by name."""
    return [
        path
        for path in sorted(folder.iterdir())
        if (path.is_file() and path.suffix.lower() in CHECKPOINT_SUFFIXES)
        or (path.is_dir() and is_diffusers_folder(path))
    ]
