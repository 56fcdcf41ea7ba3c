"""The weight change (ΔW) each LoRA / LyCORIS module type stands for, before the user's multiplier.

A patch holds one module's tensors from the file under canonical names (see lora_keys.PARAMS)
and says which type it is. `delta` rebuilds ΔW in float32 exactly as the reference formulas
(kohya / A1111 / LyCORIS) state them; `contribution` folds in the multiplier, and DoRA's
re-normalisation, which needs the original weight. The same functions run on meta tensors
to check shapes before anything is merged.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

# Which tensors make each type; the first type whose marker tensor is present wins (A1111's order).
KINDS: dict[str, tuple[str, ...]] = {
    "lora": ("down", "up"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "lokr": (),  # lokr_w1 or lokr_w1_a/_b, and lokr_w2 or lokr_w2_a/_b: checked in `_lokr_factor`
    "full": ("diff",),
}
OPTIONAL: dict[str, tuple[str, ...]] = {
    "lora": ("mid",),
    "loha": ("hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "full": ("diff_b",),
}
COMMON = ("alpha", "scale", "dora_scale")


@dataclass(eq=False)
class Patch:
    """One module's change: `network` ("unet", "text_encoder") and `target` (the module's name as
    the file spells it, dots and underscores alike turned into underscores) locate it; `keys` are
    the file's keys that made it, for error messages."""

    network: str
    target: str
    kind: str
    tensors: dict[str, Tensor]
    keys: list[str] = field(default_factory=list)
    default_alpha: float | None = None  # PEFT files: lora_alpha from the file's metadata
    # A patch read lazily (adapters.lora.read_lora): its large tensors are on the meta device and
    # `source` (an adapters.files.SafetensorsFile) reads them by `file_keys` (canonical name -> key).
    source: Any = None
    file_keys: dict[str, str] = field(default_factory=dict)

    def loaded(self) -> Patch:
        """This patch with every tensor in memory (itself when it has no source)."""
        lazy = [name for name, tensor in self.tensors.items() if tensor.is_meta]
        if self.source is None or not lazy:
            return self
        read = self.source.read([self.file_keys[name] for name in lazy])
        tensors = {name: read[self.file_keys[name]] if name in lazy else t for name, t in self.tensors.items()}
        return replace(self, tensors=tensors, source=None)

    @property
    def rank(self) -> int | None:
        t = self.tensors
        if self.kind == "lora":
            return t["down"].shape[0]
        if self.kind == "loha":
            return t["hada_w1_b"].shape[0]
        if self.kind == "lokr":
            for name in ("lokr_w1_b", "lokr_w2_b"):
                if name in t:
                    return t[name].shape[0]
        return None  # full, and LoKr stored whole: alpha means nothing

    @property
    def scale(self) -> float:
        """A per-module `scale` tensor wins; else alpha / rank; else 1 (no alpha, or nothing decomposed)."""
        if "scale" in self.tensors:
            return float(self.tensors["scale"].float().item())
        alpha = float(self.tensors["alpha"].float().item()) if "alpha" in self.tensors else self.default_alpha
        rank = self.rank
        return 1.0 if alpha is None or rank is None else alpha / rank


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.float32)


def _tucker(core: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """einsum('i j k l, j r, i p -> p r k l', core, wb, wa): wa [r, out], wb [r, in]."""
    return torch.einsum("ijkl,jr,ip->prkl", core, wb, wa)


def _lora(t: dict[str, Tensor]) -> Tensor:
    up, down = _f32(t["up"]), _f32(t["down"])
    up2d = up.flatten(1)
    if "mid" in t:  # CP/Tucker LoCon: down and up are 1x1, mid carries the kernel
        return torch.einsum("nmkl,in,mj->ijkl", _f32(t["mid"]), up2d, down.flatten(1))
    delta = up2d @ down.flatten(1)
    return delta.reshape(up.shape[0], *down.shape[1:]) if down.dim() == 4 else delta


def _loha(t: dict[str, Tensor]) -> Tensor:
    def factor(n: int) -> Tensor:
        wa, wb = _f32(t[f"hada_w{n}_a"]), _f32(t[f"hada_w{n}_b"])
        if f"hada_t{n}" in t:  # Tucker: wa is stored [r, out]
            return _tucker(_f32(t[f"hada_t{n}"]), wa, wb)
        return (wa @ wb.flatten(1)).reshape(wa.shape[0], *wb.shape[1:])

    if ("hada_t1" in t) != ("hada_t2" in t):
        raise ValueError("LoHa Tucker needs both hada_t1 and hada_t2")
    return factor(1) * factor(2)


def _lokr_factor(t: dict[str, Tensor], n: int) -> Tensor:
    if f"lokr_w{n}" in t:
        return _f32(t[f"lokr_w{n}"])
    if f"lokr_w{n}_a" not in t or f"lokr_w{n}_b" not in t:
        raise ValueError(f"LoKr needs lokr_w{n} or both lokr_w{n}_a and lokr_w{n}_b")
    wa, wb = _f32(t[f"lokr_w{n}_a"]), _f32(t[f"lokr_w{n}_b"])
    if n == 2 and "lokr_t2" in t:  # Tucker on the second factor: wa [r, out_k], wb [r, in_n]
        return _tucker(_f32(t["lokr_t2"]), wa, wb)
    return (wa @ wb.flatten(1)).reshape(wa.shape[0], *wb.shape[1:])


def _lokr(t: dict[str, Tensor]) -> Tensor:
    w1, w2 = _lokr_factor(t, 1), _lokr_factor(t, 2)
    if w2.dim() == 4:  # a convolution: w2 carries the kernel, w1 scales whole kernels
        w1 = w1[:, :, None, None]
    return torch.kron(w1.contiguous(), w2.contiguous())  # kron views its inputs; einsum's output may not allow it


DELTAS = {"lora": _lora, "loha": _loha, "lokr": _lokr, "full": lambda t: _f32(t["diff"])}


def fit(delta: Tensor, shape: torch.Size, what: str) -> Tensor:
    """ΔW laid out as the weight: a Linear change on a 1x1 conv (or back) is reshaped, and a
    4-channel conv_in change on a 9-channel inpainting conv_in is zero-padded, as A1111 does."""
    if delta.shape == shape:
        return delta
    if delta.numel() == shape.numel() and [d for d in delta.shape if d != 1] == [d for d in shape if d != 1]:
        return delta.reshape(shape)
    if len(shape) == 4 and delta.dim() == 4 and shape[1] == 9 and delta.shape[1] == 4 and shape[2:] == delta.shape[2:]:
        return torch.nn.functional.pad(delta, (0, 0, 0, 0, 0, 5))
    raise ValueError(f"{what}: the change has shape {list(delta.shape)}, the weight {list(shape)}")


def delta(patch: Patch, shape: torch.Size) -> Tensor:
    """scale x ΔW in float32, laid out as a weight of `shape`."""
    return fit(DELTAS[patch.kind](patch.tensors), shape, patch.target) * patch.scale


def _dora(patch: Patch, weight: Tensor, change: Tensor) -> Tensor:
    """dora_scale ⊙ W'/‖W'‖ with W' = W + change; the norm runs per output row when dora_scale
    is [out, 1, ...] (LyCORIS's default) and per input column when it is [1, in, ...] (A1111)."""
    magnitude = _f32(patch.tensors["dora_scale"])
    merged = weight + change
    out, inp = weight.shape[0], weight.shape[1]
    ones = [1] * (weight.dim() - 2)
    if tuple(magnitude.shape) == (out, 1, *ones) and (out != 1 or inp == 1):
        norm = merged.reshape(out, -1).norm(dim=1).reshape(out, 1, *ones)
    elif tuple(magnitude.shape) == (1, inp, *ones):
        norm = merged.transpose(0, 1).reshape(inp, -1).norm(dim=1).reshape(1, inp, *ones)
    else:
        raise ValueError(
            f"{patch.target}: dora_scale has shape {list(magnitude.shape)}, expected "
            f"{[out, 1, *ones]} or {[1, inp, *ones]}"
        )
    return magnitude * merged / norm


def contribution(patch: Patch, weight: Tensor, multiplier: float) -> Tensor:
    """What `patch` at `multiplier` adds to `weight` (float32, the original): m x scale x ΔW, or
    with DoRA m x (DoRA(W + scale x ΔW) - W), as A1111 and ComfyUI apply the multiplier."""
    change = delta(patch, weight.shape)
    if "dora_scale" in patch.tensors:
        return (_dora(patch, weight, change) - weight) * multiplier
    return change * multiplier


def bias_contribution(patch: Patch, multiplier: float) -> Tensor | None:
    """A Full patch's bias change (`diff_b`) times the multiplier; None for every other patch."""
    if "diff_b" not in patch.tensors:
        return None
    return _f32(patch.tensors["diff_b"]) * multiplier
