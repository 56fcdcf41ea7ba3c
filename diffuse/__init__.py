"""diffuse: Stable Diffusion from its parts.

import diffuse
pipe = diffuse.load_pipeline("path/to/model.safetensors")   # or a diffusers folder; dtype="auto": bf16
                                                            # where the CPU has it, "float32" is exact
result = pipe.txt2img("a red circle above a blue square", steps=20, seed=42)
result.images[0].save("out.png")                            # result.seeds, result.info, result.infotexts
request = diffuse.GenerationRequest("a red circle", image="in.png", strength=0.6, seed=42)
result = pipe.generate(request)                             # txt2img, img2img and inpaint alike
context = pipe.encode_prompt("a photo of a cat")             # the parts: [1, 77, 768] text conditioning
noise = pipe.unet(latents, timesteps, context)               # noise prediction
images = pipe.vae.decode(latents / pipe.config.vae.scaling_factor)
"""

from diffuse.checkpoints.errors import CheckpointError, UnsafeCheckpointError
from diffuse.loader import load_pipeline
from diffuse.models.configs import PipelineConfig
from diffuse.pipeline import Pipeline, Result, Step
from diffuse.request import GenerationRequest
from diffuse.samplers import SAMPLER_NAMES
from diffuse.speedups import Speedups

__all__ = [
    "SAMPLER_NAMES",
    "CheckpointError",
    "GenerationRequest",
    "Pipeline",
    "PipelineConfig",
    "Result",
    "Speedups",
    "Step",
    "UnsafeCheckpointError",
    "load_pipeline",
]
