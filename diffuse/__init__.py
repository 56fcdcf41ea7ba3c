"""diffuse: Stable Diffusion from its parts.

    import diffuse
    pipe = diffuse.load_pipeline("path/to/model.safetensors")   # or a diffusers folder
    context = pipe.encode_prompt("a photo of a cat")             # [1, 77, 768]
    noise = pipe.unet(latents, timesteps, context)               # noise prediction
    images = pipe.vae.decode(latents / pipe.config.vae.scaling_factor)
"""

from .checkpoints.errors import CheckpointError, UnsafeCheckpointError
from .loader import load_pipeline
from .models.configs import PipelineConfig
from .pipeline import Pipeline

__all__ = ["CheckpointError", "Pipeline", "PipelineConfig", "UnsafeCheckpointError", "load_pipeline"]
