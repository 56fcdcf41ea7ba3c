"""The fast layers prepare() (diffuse.runtime.preparation) swaps in at load time.

The model files are plain PyTorch as the papers describe them. prepare() changes the
class of chosen layers in place (`layer.__class__ = FastLayer`) to subclasses that only
override forward, so every parameter, name and state-dict key stays as it was. Each fast
forward computes what the old inference code computed, operation for operation, and
falls back to the plain layer where its trick does not apply (autograd, another device
or dtype), so a prepared network still trains and still runs in float32 when
diffuse.numerics casts it up for a retry. Training builds plain networks and never
calls prepare.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffuse.models import unet, vae
from diffuse.runtime.attention import attention
from diffuse.runtime.upsample import upsample_conv


def onednn_bf16(x: Tensor) -> bool:
    """Whether x is a bf16 CPU input outside autograd, which oneDNN's fused linear ops take."""
    return x.device.type == "cpu" and x.dtype == torch.bfloat16 and not torch.is_grad_enabled()


def fused_linear(x: Tensor, weight: Tensor, bias: Tensor | None, then: str = "none") -> Tensor:
    """x W^T + b by oneDNN's matmul with the bias (and an activation, "gelu" being the exact erf
    one) applied as the product is written; PyTorch's own linear layer first fills the output
    with the bias and then adds the product into it, one more pass over the output."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, then, [], "none" if then == "gelu" else "")


class OneDNNLinear(nn.Linear):
    """x W^T + b on the CPU without autograd by oneDNN: float32 as a 1x1 convolution over the
    rows, bf16 with the bias added in the product's epilogue (fused_linear).

    PyTorch sends a float32 linear layer to MKL, which on AMD CPUs runs its AVX2 code even
    where the CPU has AVX-512, while oneDNN's convolutions pick their code by the CPU's
    features (bench/RESULTS.md). The convolution is the same product read in the same
    memory, accumulated in float32 either way: its results differ from MKL's in summation
    order only. A bf16 linear layer already goes to oneDNN's matmul, which ran faster than
    the convolution at SDXL's widths and no slower at SD's (bench/RESULTS.md).
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or torch.is_grad_enabled() or not x.numel():
            return F.linear(x, self.weight, self.bias)
        if x.dtype == torch.bfloat16 and self.bias is not None:
            return fused_linear(x, self.weight, self.bias)
        if x.dtype != torch.float32:
            return F.linear(x, self.weight, self.bias)
        # [..., in] -> [1, in, rows, 1]: a channels-last view of the rows as they lie in memory.
        rows = x.reshape(1, -1, 1, x.shape[-1]).permute(0, 3, 1, 2)
        out = F.conv2d(rows, self.weight[:, :, None, None], self.bias)
        return out.permute(0, 2, 3, 1).reshape(*x.shape[:-1], self.out_features)


class FusedGEGLU(unet.GEGLU):
    """value * gelu(gate) in bf16 as two products whose epilogues do the rest: the gate's applies
    its bias and the gelu, the value's its bias and the multiplication by the gate. The halves of
    the projection are contiguous row ranges of its weight, so nothing is copied, and the
    2x-wide projection, its gelu and its product are never written out in full."""

    def forward(self, x: Tensor) -> Tensor:
        if not onednn_bf16(x) or not x.numel():
            return super().forward(x)
        value_w, gate_w = self.proj.weight.chunk(2)
        value_b, gate_b = self.proj.bias.chunk(2)
        gate = fused_linear(x, gate_w, gate_b, then="gelu")
        return torch.ops.mkldnn._linear_pointwise(x, gate, value_w, value_b, "mul")


class ChunkedAttention(unet.Attention):
    """The UNet's attention through diffuse.runtime.attention (explicit and chunked in bf16 on the CPU)."""

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        out = attention(*self.qkv(x, context))
        return self.to_out(out.transpose(1, 2).flatten(2))


class ChunkedAttnBlock(vae.AttnBlock):
    """The VAE's single-head attention through diffuse.runtime.attention."""

    def forward(self, x: Tensor) -> Tensor:
        out = attention(*self.qkv(x))
        return x + self.proj_out(out.transpose(2, 3).reshape(x.shape))


class FoldedUNetUpsample(unet.Upsample):
    """An exact 2x upsample as four folded 2x2 convolutions at the low resolution; the 2x-1
    sizes that odd latent sides need take the plain path."""

    def forward(self, x: Tensor, size: torch.Size) -> Tensor:
        if tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1]):
            return upsample_conv(x, self.conv)
        return super().forward(x, size)


class FoldedVAEUpsample(vae.Upsample):
    """The decoder's 2x upsample as four folded 2x2 convolutions at the low resolution."""

    def forward(self, x: Tensor) -> Tensor:
        return upsample_conv(x, self.conv)


class InPlaceResnetBlock(vae.ResnetBlock):
    """Without autograd the SiLU overwrites the norm's fresh output and the residual is added
    into the convolution's, instead of allocating one more full-resolution map each time."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return super().forward(x)
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return h.add_(self.nin_shortcut(x))


class InPlaceEncoder(vae.Encoder):
    """The encoder with its last SiLU in place, as in InPlaceResnetBlock."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return super().forward(x)
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        x = self.mid(x)
        return self.conv_out(F.silu(self.norm_out(x), inplace=True))


class InPlaceDecoder(vae.Decoder):
    """The decoder with its last SiLU (on the full-resolution map) in place, as in InPlaceResnetBlock."""

    def forward(self, z: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return super().forward(z)
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x), inplace=True))


# Each plain layer class and the fast one prepare() turns it into (exact classes only, so a
# layer prepared once is left alone).
FAST_LAYERS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: OneDNNLinear,
    unet.Attention: ChunkedAttention,
    unet.GEGLU: FusedGEGLU,
    unet.Upsample: FoldedUNetUpsample,
    vae.AttnBlock: ChunkedAttnBlock,
    vae.Upsample: FoldedVAEUpsample,
    vae.ResnetBlock: InPlaceResnetBlock,
    vae.Encoder: InPlaceEncoder,
    vae.Decoder: InPlaceDecoder,
}


def inference_layout(weight: Tensor) -> Tensor:
    """A weight in the inference layout for its device: convolution kernels (4-D) on the CPU
    channels-last, everything else contiguous.

    oneDNN's convolutions read and write channels-last directly, where a standard-layout
    tensor costs a reorder on each side of every convolution, and outputs then stay
    channels-last all the way through; on a GPU cuDNN ran no faster that way
    (bench/RESULTS.md), so there weights keep the standard layout.
    """
    channels_last = weight.dim() == 4 and weight.device.type == "cpu"
    return weight.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
