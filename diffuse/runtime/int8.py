"""The UNet's and the VAE decoder's products in 8-bit integers: quantize="int8".

Each chosen linear layer and convolution keeps its bf16 weight (so LoRA merges, state
dicts and the float32 retry see the plain layer), moved to a file on disk
(diffuse.runtime.weights_on_disk), and in memory an int8 copy, one scale per output
channel, packed for oneDNN. Its input is quantized as it arrives, one scale (and
zero point) for the whole tensor, by the C kernel in diffuse.kernels; oneDNN multiplies
the bytes, accumulating in int32, and writes bf16 with the bias added. AVX-512 VNNI and
AMX do twice as many int8 multiply-adds per instruction as bf16 ones.

Chosen are the products inside the UNet's blocks: the ResBlocks' convolutions, the
downsampling convolutions, the transformers' projections, attention's queries, keys and
values of the image and its output, and the feed-forward layers. Left in bf16: the first
and last convolutions (4 channels, where one scale for all would cost the most), the
timestep and vector embeddings (one row each), the keys and values computed from the
text (77 rows), the folded upsampling convolutions, and everything that is not a product:
norms, softmax, attention's own products. In the VAE decoder: its ResnetBlocks' and its
attention's convolutions, again without the first and last (4 and 3 channels) and the
upsampling. The text encoders and the VAE encoder stay bf16.

Around the products, the transformer blocks quantize their LayerNorms' outputs and the ResBlocks
their GroupNorm-SiLUs' as the norms are computed (C kernels), and residuals are added in the
products' epilogues as they write their outputs (Int8TransformerBlock, Int8SpatialTransformer,
Int8ResBlock), so neither is written out in bf16 first. The VAE decoder's ResnetBlocks do the same
(Int8DecoderResnetBlock).

A layer falls back to its bf16 (or float32) forward outside bf16 CPU inference, and for an
input holding a NaN or an infinity, which bf16 carries on to the pipeline's checks. The
int8 copy is made again if the weight changes (a LoRA merged or taken out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffuse import kernels
from diffuse.models import unet, vae
from diffuse.runtime.attention import attention
from diffuse.runtime.device import cpu_has_vnni, give_back_freed_memory
from diffuse.runtime.layers import ChunkedAttention, OneDNNLinear
from diffuse.runtime.weights_on_disk import WeightsOnDisk

QUANTIZE_CHOICES = ("int8",)

# The UNet's parts whose products go int8 (the module docstring says which stay bf16 and why).
BLOCKS = ("input_blocks.", "middle_block.", "output_blocks.")
KEEP_BF16 = ("input_blocks.0.0", "emb_layers.1", "attn2.to_k", "attn2.to_v")
# Self-attention runs its queries, keys and values as one stacked product (Int8Attention); the
# three layers themselves run only where it falls back, so they get no int8 copy of their own.
STACKED = ("attn1.to_q", "attn1.to_k", "attn1.to_v")
# Likewise the feed-forward's GEGLU projection runs as its two halves inside Int8FeedForward.
IN_FEED_FORWARD = ("ff.net.0.proj",)


def check_quantize(quantize: str | None, device: torch.device | str, dtype: torch.dtype) -> str | None:
    """quantize itself where it can run with this device and dtype; a one-line ValueError otherwise."""
    if quantize is None:
        return None
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)} or None, not {quantize!r}")
    if torch.device(device).type != "cpu" or dtype != torch.bfloat16:
        raise ValueError(
            f"quantize={quantize!r} runs on the CPU with dtype bfloat16, not {torch.device(device).type} {dtype}"
        )
    # Refused rather than quietly run in bf16, since the images record that they were made in int8.
    if not cpu_has_vnni():
        raise ValueError(f"quantize={quantize!r} needs a CPU with AVX512-VNNI; on this one int8 is slower than bf16")
    if not kernels.quantize_available():
        raise ValueError(f"quantize={quantize!r} needs diffuse's C quantize kernel: {kernels.quantize_status()}")
    return quantize


def int8_ready(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.bfloat16 and not torch.is_grad_enabled() and x.numel() > 0


def weight_key(weights: tuple[Tensor, ...]) -> tuple:
    """What identifies the values of these weights: an in-place change moves the version on,
    a new tensor has another address."""
    return tuple((w._version, w.data_ptr(), w.dtype, tuple(w.shape)) for w in weights)


def per_channel(weight: Tensor) -> tuple[Tensor, Tensor]:
    """weight [out, ...] as int8 with one float32 scale per output channel, symmetric. A bf16 weight
    goes through the C kernel (the same bytes, without float32 copies of the whole weight)."""
    if weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and weight.dim() >= 2:
        layout = torch.channels_last if weight.dim() == 4 else torch.contiguous_format
        made = kernels.quantize_rows_bf16(weight.detach().contiguous(memory_format=layout))
        if made is not None:
            return made
    rows = weight.detach().float().flatten(1)
    scales = (rows.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(weight.detach().float() / scales.view(-1, *[1] * (weight.dim() - 1))).clamp_(-127, 127)
    return q.to(torch.int8), scales


@dataclass
class Packed:
    """An int8 weight packed for oneDNN, with what its products need beside it."""

    key: tuple
    weight: Tensor
    scales: Tensor
    zero_points: Tensor
    bias: Tensor | None


def pack_linear(weights: tuple[Tensor, ...], biases: tuple[Tensor | None, ...]) -> Packed:
    """The linear layers' weights stacked by output rows (one product for them all)."""
    q, scales = per_channel(torch.cat(weights) if len(weights) > 1 else weights[0])
    bias = None if all(b is None for b in biases) else torch.cat([b.float() for b in biases])
    packed = torch.ops.onednn.qlinear_prepack(q, None)
    return Packed(weight_key(weights), packed, scales, torch.zeros_like(scales, dtype=torch.int64), bias)


def pack_conv(conv: nn.Conv2d, weight: Tensor, bias: Tensor | None) -> Packed:
    """`weight` (the convolution's, or the input channels of it that one part reads) packed."""
    q, scales = per_channel(weight)
    # Packed as the products will read it, so that oneDNN does not repack a copy of the weight at every
    # call: for inputs with a zero point (any nonzero one stands for the one each call brings), which
    # puts the sums its correction needs beside the weights; and a 1x1 convolution for an example
    # input shape, without which its packed layout was not the one its products took (a 3x3 one's
    # was, and an example shape changed it for some).
    example_input = [1, weight.shape[1] * conv.groups, 8, 8] if conv.kernel_size == (1, 1) else None
    packed = torch.ops.onednn.qconv_prepack(
        q, scales, 1.0, 128, list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups, example_input
    )
    bias = None if bias is None else bias.detach().float()
    return Packed(weight_key((conv.weight,)), packed, scales, torch.zeros_like(scales, dtype=torch.int64), bias)


def quantized(x: Tensor, asymmetric: bool) -> tuple[Tensor, float, int] | None:
    return kernels.quantize_bf16(x if x.is_contiguous() else x.contiguous(), asymmetric)


def linear_product(
    q: tuple[Tensor, float, int],
    packed: Packed,
    then: str = "none",
    onto: Tensor | None = None,
    into: bool = False,
) -> Tensor:
    """The packed linear layers applied to the quantized input, bf16 out ("gelu" applies the exact
    one); `onto` (a contiguous bf16 tensor shaped as the output) is added as the output is written,
    which spares a residual addition its own pass over memory: into a new tensor, or with `into`
    into onto itself (for a residual its caller made and reads no more; oneDNN's sum reads and
    writes one buffer, which ran faster)."""
    qx, scale, zero_point = q
    if onto is not None:
        return torch.ops.onednn.qlinear_pointwise.binary(
            qx, scale, zero_point, packed.weight, packed.scales, packed.zero_points, onto, packed.bias,
            1.0, 0, torch.bfloat16, 1.0, 0, "sum" if into else "add", 1.0, "none", [], "",
        )  # fmt: skip
    return torch.ops.onednn.qlinear_pointwise(
        qx, scale, zero_point, packed.weight, packed.scales, packed.zero_points, packed.bias,
        1.0, 0, torch.bfloat16, then, [], "none" if then == "gelu" else "",
    )  # fmt: skip


class Int8Linear(OneDNNLinear):
    """A linear layer whose product runs in int8 (the module docstring); where it falls back, the
    layer computes what a prepared bf16 or float32 one does."""

    packed: Packed | None = None

    def int8_weight(self) -> Packed:
        if self.packed is None or self.packed.key != weight_key((self.weight,)):
            self.packed = pack_linear((self.weight,), (self.bias,))
        return self.packed

    def forward(self, x: Tensor) -> Tensor:
        q = quantized(x, asymmetric=True) if int8_ready(x) else None
        if q is None:
            return super().forward(x)
        return linear_product(q, self.int8_weight())

    def add_onto(self, x: Tensor, residual: Tensor, into: bool = False) -> Tensor:
        """self(x) + residual, the sum made as the int8 product is written where it can be (with
        `into`, possibly in residual's memory: the caller no longer needs residual)."""
        q = quantized(x, asymmetric=True) if int8_ready(x) and fits_onto(residual, x.shape[:-1]) else None
        if q is None:
            return self(x) + residual
        return linear_product(q, self.int8_weight(), onto=residual, into=into)


def fits_onto(residual: Tensor, rows: torch.Size) -> bool:
    """Whether a linear layer's output over `rows` can be added onto `residual` as it is written."""
    return residual.dtype == torch.bfloat16 and residual.is_contiguous() and residual.shape[:-1] == rows


class Int8Conv2d(nn.Conv2d):
    """A convolution whose product runs in int8 on a channels-last input (the module docstring).

    Where its input joins two maps along the channels (`split`: the up path's skip connections,
    whose features span other ranges than the path's own), each part is quantized with a scale
    of its own and convolved with its own input channels of the weight, the second product
    added onto the first as it is written: the same sum, with one range per part."""

    packed: tuple[Packed, ...] | None = None
    split: int | None = None

    def int8_weight(self) -> tuple[Packed, ...]:
        if self.packed is None or self.packed[0].key != weight_key((self.weight,)):
            if self.split is None:
                self.packed = (pack_conv(self, self.weight, self.bias),)
            else:
                first, second = self.weight[:, : self.split], self.weight[:, self.split :]
                self.packed = pack_conv(self, first, self.bias), pack_conv(self, second, None)
        return self.packed

    def forward(self, x: Tensor) -> Tensor:
        if not int8_ready(x) or x.dim() != 4:
            return super().forward(x)
        x = x.contiguous(memory_format=torch.channels_last)
        if self.split is None:
            parts = [kernels.quantize_bf16(x, asymmetric=True)]
        else:
            ranges = ((0, self.split), (self.split, x.shape[1]))
            parts = [kernels.quantize_bf16(x, asymmetric=True, channels=channels) for channels in ranges]
        if any(part is None for part in parts):
            return super().forward(x)
        out = None
        for part, packed in zip(parts, self.int8_weight(), strict=True):
            out = self.product(part, packed, onto=out)
        return out

    def product(self, q: tuple[Tensor, float, int], packed: Packed, onto: Tensor | None = None) -> Tensor:
        """The packed convolution of the quantized input, bf16 out, added onto `onto` if given."""
        qx, scale, zero_point = q
        shape = list(self.stride), list(self.padding), list(self.dilation), self.groups
        if onto is None:
            return torch.ops.onednn.qconv_pointwise(
                qx, scale, zero_point, packed.weight, packed.scales, packed.zero_points, packed.bias, *shape,
                1.0, 0, torch.bfloat16, "none", [], "",
            )  # fmt: skip
        return torch.ops.onednn.qconv2d_pointwise.binary(
            qx, scale, zero_point, packed.weight, packed.scales, packed.zero_points, onto, packed.bias, *shape,
            1.0, 0, torch.bfloat16, 1.0, 0, "sum", 1.0, "none", [], "",
        )  # fmt: skip

    def product_onto_skip(self, q: tuple[Tensor, float, int], skip: Tensor, block_input: Tensor) -> Tensor:
        """A residual block's last product plus its skip branch: summed into `skip` as the product is
        written where that is a fresh channels-last map, else added after into the product's own fresh
        output (the block's own input, which its caller still holds, is never written into)."""
        packed = self.int8_weight()[0]
        if skip is block_input or not skip.is_contiguous(memory_format=torch.channels_last):
            return self.product(q, packed).add_(skip)
        return self.product(q, packed, onto=skip)


class Int8Attention(ChunkedAttention):
    """Self-attention's queries, keys and values as one int8 product of the input quantized once
    (the three weights stacked). Cross-attention keeps its class: its queries and output are
    Int8Linear layers, its keys and values from the text stay bf16."""

    packed: Packed | None = None

    def int8_weight(self) -> Packed:
        weights = (self.to_q.weight, self.to_k.weight, self.to_v.weight)
        if self.packed is None or self.packed.key != weight_key(weights):
            self.packed = pack_linear(weights, (None, None, None))
        return self.packed

    def qkv(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        q = quantized(x, asymmetric=True) if context is None and int8_ready(x) else None
        if q is None:
            return super().qkv(x, context)
        return self.stacked_qkv(q)

    def stacked_qkv(self, q: tuple[Tensor, float, int]) -> tuple[Tensor, Tensor, Tensor]:
        stacked = linear_product(q, self.int8_weight()).unflatten(-1, (3, self.heads, -1))
        return tuple(stacked[..., i, :, :].transpose(1, 2) for i in range(3))

    def attend(self, q: tuple[Tensor, float, int], onto: Tensor) -> Tensor:
        """self(x) + onto for x given quantized (Int8TransformerBlock)."""
        out = attention(*self.stacked_qkv(q))
        return self.to_out[0].add_onto(out.transpose(1, 2).flatten(2), onto)


class Int8CrossAttention(ChunkedAttention):
    """Cross-attention as ChunkedAttention computes it (its queries and output are Int8Linear layers,
    its keys and values from the text bf16), which can also start from its input quantized
    beforehand and add the residual as its output is written (Int8TransformerBlock)."""

    def attend(self, q: tuple[Tensor, float, int], context: Tensor, onto: Tensor, into: bool = False) -> Tensor:
        """self(x, context) + onto for x given quantized (with `into`, possibly in onto's memory)."""
        queries = linear_product(q, self.to_q.int8_weight())
        heads = (
            t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (queries, self.to_k(context), self.to_v(context))
        )
        out = attention(*heads)
        return self.to_out[0].add_onto(out.transpose(1, 2).flatten(2), onto, into)


class Int8FeedForward(unet.FeedForward):
    """GEGLU and the output projection from one quantized input: the gate's product applies the
    gelu as it is written, and the value times the gate is quantized straight from the two
    products (diffuse.kernels), never written in bf16, for the output layer's int8 product."""

    packed: tuple[Packed, Packed] | None = None

    def int8_weight(self) -> tuple[Packed, Packed]:
        value_w, gate_w = self.net[0].proj.weight.chunk(2)
        value_b, gate_b = self.net[0].proj.bias.chunk(2)
        # The halves are views of one weight, sharing its version and storage: one key tells both.
        if self.packed is None or self.packed[0].key != weight_key((value_w,)):
            self.packed = pack_linear((value_w,), (value_b,)), pack_linear((gate_w,), (gate_b,))
        return self.packed

    def forward(self, x: Tensor) -> Tensor:
        q = quantized(x, asymmetric=True) if int8_ready(x) else None
        if q is None:
            return super().forward(x)
        return self.feed(q)

    def feed(self, q: tuple[Tensor, float, int], onto: Tensor | None = None, into: bool = False) -> Tensor:
        """self(x) for x given quantized, plus `onto` (as linear_product takes it, `into` too) if given."""
        value, gate = self.int8_weight()
        value, gate = linear_product(q, value), linear_product(q, gate, then="gelu")
        hidden = kernels.quantize_bf16(value, True, "product", gate)
        if hidden is None:
            out = self.net[2](value.mul_(gate))
            return out if onto is None else out + onto
        return linear_product(hidden, self.net[2].int8_weight(), onto=onto, into=into)


class Int8ResBlock(unet.ResBlock):
    """The ResBlock as unet.ResBlock computes it, with each GroupNorm and SiLU quantized as they are
    computed for the convolution after them (one C kernel; the second norm also adds the timestep
    embedding first), and the residual added onto the skip convolution's fresh output as the second
    convolution writes: the activations in between are never written out in bf16."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        first, second = self.in_layers[2], self.out_layers[3]
        if not self.runs_int8(x):
            return super().forward(x, emb)
        q = None if first.split is not None else norm_silu_quantized(self.in_layers[0], x)
        h = first(self.in_layers[1](self.in_layers[0](x))) if q is None else first.product(q, first.int8_weight()[0])
        shift = self.emb_layers(emb)
        q = norm_silu_quantized(self.out_layers[0], h, shift)
        skip = self.skip_connection(x)
        if q is None:
            return skip + self.out_layers(h + shift[:, :, None, None])
        return second.product_onto_skip(q, skip, x)

    def runs_int8(self, x: Tensor) -> bool:
        return (
            int8_ready(x)
            and unet.memory_format_of(x) == torch.channels_last
            and isinstance(self.in_layers[1], nn.SiLU)
            and isinstance(self.out_layers[1], nn.SiLU)
            and isinstance(self.in_layers[2], Int8Conv2d)
            and isinstance(self.out_layers[3], Int8Conv2d)
            and self.out_layers[3].split is None
        )


class Int8DecoderResnetBlock(vae.ResnetBlock):
    """The VAE decoder's ResnetBlock as vae.ResnetBlock computes it, with each GroupNorm and SiLU
    quantized as they are computed for the convolution after them (one C kernel) and the residual
    added onto the shortcut convolution's fresh output as the second convolution writes: at the
    decoder's full-resolution levels, the largest maps of an image's making are never written out
    in bf16 between the norms and the convolutions."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.runs_int8(x):
            return super().forward(x)
        q = norm_silu_quantized(self.norm1, x)
        h = self.conv1(F.silu(self.norm1(x))) if q is None else self.conv1.product(q, self.conv1.int8_weight()[0])
        q = norm_silu_quantized(self.norm2, h)
        skip = self.nin_shortcut(x)
        if q is None:
            return skip + self.conv2(F.silu(self.norm2(h)))
        return self.conv2.product_onto_skip(q, skip, x)

    def runs_int8(self, x: Tensor) -> bool:
        return (
            int8_ready(x)
            and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last)
            and isinstance(self.conv1, Int8Conv2d)
            and isinstance(self.conv2, Int8Conv2d)
        )


def norm_silu_quantized(norm: nn.GroupNorm, x: Tensor, shift: Tensor | None = None) -> tuple[Tensor, float, int] | None:
    """silu(norm(x + shift per image and channel)) quantized as Int8Conv2d quantizes its input, by
    one C kernel (diffuse.kernels); None where the kernel declines or the norm is not an affine bf16 one."""
    if norm.weight is None or norm.bias is None or norm.weight.dtype != torch.bfloat16:
        return None
    return kernels.group_norm_silu_quantize_bf16(x, norm.weight, norm.bias, norm.num_groups, norm.eps, True, shift)


class Int8TransformerBlock(unet.BasicTransformerBlock):
    """The block as BasicTransformerBlock computes it, with its three norms quantized as they are
    computed (each feeds only int8 products) and each residual added as the product before it is
    written: neither the norms' outputs nor the sublayers' are written out in bf16 on their own."""

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        if not self.runs_int8(x):
            return super().forward(x, context)
        q = normalized(self.norm1, x)
        x = self.attn1(self.norm1(x)) + x if q is None else self.attn1.attend(q, onto=x)
        q = normalized(self.norm2, x)
        # From here x is the block's own tensor, so the residual sums may write into it.
        x = self.attn2(self.norm2(x), context) + x if q is None else self.attn2.attend(q, context, onto=x, into=True)
        q = normalized(self.norm3, x)
        return self.ff(self.norm3(x)) + x if q is None else self.ff.feed(q, onto=x, into=True)

    def runs_int8(self, x: Tensor) -> bool:
        return (
            int8_ready(x)
            and x.is_contiguous()
            and isinstance(self.attn1, Int8Attention)
            and isinstance(self.attn2, Int8CrossAttention)
            and isinstance(self.attn2.to_q, Int8Linear)
            and isinstance(self.ff, Int8FeedForward)
        )


def normalized(norm: nn.LayerNorm, x: Tensor) -> tuple[Tensor, float, int] | None:
    """norm(x) quantized as Int8Linear quantizes its input, by one C kernel (diffuse.kernels);
    None where the kernel declines (a NaN or an infinity) or the norm is not an affine bf16 one."""
    affine = norm.weight is not None and norm.bias is not None and norm.weight.dtype == torch.bfloat16
    if not affine or norm.normalized_shape != (x.shape[-1],):
        return None
    return kernels.layer_norm_quantize_bf16(x, norm.weight, norm.bias, norm.eps, asymmetric=True)


class Int8SpatialTransformer(unet.SpatialTransformer):
    """With linear projections on a channels-last map, the output projection adds the residual as
    its product is written: the positions-by-channels rows are the map's memory, so neither side
    is copied back into a map."""

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        channels_last = unet.memory_format_of(x) == torch.channels_last
        if not (self.linear and channels_last and int8_ready(x) and isinstance(self.proj_out, Int8Linear)):
            return super().forward(x, context)
        b, c, h, w = x.shape
        rows = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c))
        for block in self.transformer_blocks:
            rows = block(rows, context)
        out = self.proj_out.add_onto(rows, x.permute(0, 2, 3, 1).reshape(b, h * w, c))
        return out.reshape(b, h, w, c).permute(0, 3, 1, 2)


def int8_class(name: str, layer: nn.Module, parent: nn.Module) -> type[nn.Module] | None:
    """The int8 class a UNet layer becomes under quantize="int8", or None to keep it."""
    if (
        not name.startswith(BLOCKS)
        or name.endswith(KEEP_BF16 + STACKED + IN_FEED_FORWARD)
        or isinstance(parent, unet.Upsample)
    ):
        return None
    if isinstance(layer, unet.Attention):
        return Int8Attention if name.endswith("attn1") else Int8CrossAttention
    if isinstance(layer, unet.FeedForward):
        return Int8FeedForward
    if isinstance(layer, unet.BasicTransformerBlock):
        return Int8TransformerBlock
    if isinstance(layer, unet.SpatialTransformer):
        return Int8SpatialTransformer
    if isinstance(layer, unet.ResBlock):
        return Int8ResBlock
    if isinstance(layer, nn.Linear):
        return Int8Linear
    if isinstance(layer, nn.Conv2d):
        return Int8Conv2d
    return None


def decoder_int8_class(name: str, layer: nn.Module, parent: nn.Module) -> type[nn.Module] | None:
    """The int8 class a VAE decoder layer becomes: its ResnetBlocks (Int8DecoderResnetBlock) and
    their and the mid attention's convolutions; the first and last convolutions (4 and 3 channels)
    and the folded upsampling stay bf16."""
    if isinstance(layer, vae.ResnetBlock):
        return Int8DecoderResnetBlock
    if not isinstance(layer, nn.Conv2d) or name in ("conv_in", "conv_out") or isinstance(parent, vae.Upsample):
        return None
    return Int8Conv2d


INT8_LAYERS = (Int8Linear, Int8Conv2d, Int8Attention, Int8FeedForward)


def packed_from(layer: nn.Module) -> tuple[Tensor, ...]:
    """The weights an int8 layer's copies are made from."""
    if isinstance(layer, Int8Attention):
        return layer.to_q.weight, layer.to_k.weight, layer.to_v.weight
    if isinstance(layer, Int8FeedForward):
        return (layer.net[0].proj.weight,)
    return (layer.weight,)


def use_int8(module: nn.Module) -> WeightsOnDisk:
    """Every UNet and VAE decoder in `module` with its chosen products in int8 (the module
    docstring), in place. The int8 weights are made now, so the memory they take shows at load
    time, and the bf16 weights they are made from go to disk (WeightsOnDisk, where the spill
    folder has room), layer by layer, their pages dropped from memory once its copy is packed."""
    nets = [(m, int8_class) for m in module.modules() if isinstance(m, unet.UNet)]
    nets += [(m.decoder, decoder_int8_class) for m in module.modules() if isinstance(m, vae.AutoencoderKL)]
    layers = []
    for net, choose in nets:
        parents = {name: layer for name, layer in net.named_modules()}
        for name, layer in list(net.named_modules()):
            new_class = choose(name, layer, parents[name.rpartition(".")[0]])
            if new_class is not None:
                layer.__class__ = new_class
        if isinstance(net, unet.UNet):
            mark_skip_joins(net)
        layers += [layer for layer in net.modules() if isinstance(layer, INT8_LAYERS)]
    weights = [w for layer in layers for w in packed_from(layer) if w.device.type == "cpu"]
    on_disk = WeightsOnDisk(weights)
    for layer in layers:
        on_disk.move(packed_from(layer))
        layer.int8_weight()
        on_disk.drop(packed_from(layer))
    give_back_freed_memory()  # the moved weights' memory, which malloc would otherwise keep
    return on_disk


def mark_skip_joins(net: unet.UNet) -> None:
    """Tell each up-path ResBlock's first convolution and skip convolution where its input's
    two maps meet: the path's own channels (the previous block's output width) come first."""
    width = net.middle_block[-1].out_layers[-1].out_channels
    for block in net.output_blocks:
        resblock = block[0]
        for conv in (resblock.in_layers[-1], resblock.skip_connection):
            if isinstance(conv, Int8Conv2d) and 0 < width < conv.in_channels:
                conv.split = width
        width = resblock.out_layers[-1].out_channels
