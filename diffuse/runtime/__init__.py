"""How the networks run on this machine: the device and precision chosen for them, and
prepare(), which makes them fast for inference at load time so the model files stay
plain PyTorch.

- dtype "auto" (the default of `load_pipeline`) is bfloat16 on a CPU with native bf16
  dot products (AVX512-BF16 or AMX; oneDNN reports it) and on a CUDA GPU that has it,
  float16 on an older GPU, float32 otherwise. bf16 keeps float32's range, so the
  networks need no overflow care; the sampler's arithmetic and the latents stay float32
  whatever the networks use (the pipeline converts at the network boundary).
- prepare(module, device, dtype) (diffuse.runtime.preparation) lays convolution weights out
  channels-last on the CPU and swaps in: float32 linear layers as oneDNN 1x1 convolutions,
  bf16 attention as explicit chunked matmuls with a C softmax (diffuse.kernels) where the
  CPU has no AMX (PyTorch's fused kernel where it has), the
  2x upsample folded into 2x2 convolutions at the low resolution (diffuse.runtime.upsample),
  and the VAE's SiLU and residual add in place.
- prepare(..., quantize="int8") also runs the UNet's and the VAE decoder's products in 8-bit integers
  (diffuse.runtime.int8), for bf16 on the CPU.
- On Linux with glibc, freed memory is kept for the next allocation (keep_freed_memory), and
  its pages go back to the kernel before each VAE decode (give_back_freed_memory).
"""

from diffuse.runtime.device import auto_dtype, cpu_has_bf16, keep_freed_memory, resolve_device, resolve_dtype
from diffuse.runtime.int8 import QUANTIZE_CHOICES, check_quantize
from diffuse.runtime.layers import inference_layout
from diffuse.runtime.preparation import prepare

__all__ = [
    "QUANTIZE_CHOICES",
    "check_quantize",
    "auto_dtype",
    "cpu_has_bf16",
    "inference_layout",
    "keep_freed_memory",
    "prepare",
    "resolve_device",
    "resolve_dtype",
]
