"""LoRAs merged into a pipeline's weights, and the weights brought back bit for bit.

LoraMerge owns the add-on state of one pipeline's networks. `apply(selection)` checks every
patch of every LoRA against the model first (each key matched to a module, each change shaped
as its weight, the LoRA made for this base) and refuses with the reason before touching
anything; then, one weight at a time, it adds the sum of multiplier x ΔW (computed in float32
from the original weight) once and casts back, in place, so the weight keeps its tensor, its
memory layout and its dtype, and its version counter moves on (runtime/upsample's folded
kernels are cached on it). The LoRA's own tensors are read module by module as they are merged
(Patch.loaded), so a large file is never in memory whole. Only the touched weights' originals are
kept, in memory up to `spill_above` bytes, past that in an unnamed temporary file on disk
(spill_folder), so a LoRA on SD 1.5 costs no second copy of its attention weights in RAM; that
file is kept for the next apply, which rewrites only weights changed since. `restore()` copies
them back; a failure midway restores what was touched before it re-raises.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from diffuse.adapters.lora import Lora, LoraError, listing
from diffuse.adapters.lora_keys import SINGLE_ENCODER_PREFIX, module_index
from diffuse.adapters.lora_math import DELTAS, Patch, bias_contribution, contribution
from diffuse.models.configs import UNetConfig
from diffuse.numerics import all_finite
from diffuse.runtime.weights_on_disk import spill_folder

# Originals of the touched weights stay in memory up to this many bytes in all (a few LoRA'd
# layers of a small model); beyond, they go to a temporary file, since for SD 1.5 an attention
# LoRA touches hundreds of MB of weights and keeping them would grow the process by as much.
SPILL_ABOVE = 16 << 20


_WIDENED_IN_ADD = (torch.float16, torch.bfloat16, torch.float32)

# A checked patch: (its module, the patch, its multiplier, the file it came from).
Planned = tuple[nn.Module, Patch, float, "str | Path"]


def _state(param: Tensor) -> tuple | None:
    """What identifies a parameter's current values: its version counter (moved by every in-place
    change), storage and dtype; None for an inference tensor, which keeps no version."""
    try:
        return (param._version, param.data_ptr(), param.dtype, tuple(param.shape))
    except RuntimeError:
        return None


class _Originals:
    """The original values of the weights an apply touched, to copy back on restore.

    The spill file outlives a restore: the weights it holds are the ones just put back, so the
    next apply writes a weight again only if it has changed since (its version counter says)."""

    def __init__(self, spill_above: int):
        self.spill_above, self.in_memory = spill_above, 0
        self.saved: list[tuple[Tensor, Tensor | tuple[int, int]]] = []
        self.file = None
        # id(param) -> (param, its _state when the file's copy was last true, offset, nbytes); holding
        # the param keeps its id from being reused by another tensor.
        self.on_file: dict[int, tuple[Tensor, tuple | None, int, int]] = {}

    def keep(self, param: Tensor) -> None:
        nbytes = param.numel() * param.element_size()
        if self.in_memory + nbytes <= self.spill_above:
            self.saved.append((param, param.detach().clone()))
            self.in_memory += nbytes
            return
        self.saved.append((param, self._spilled(param, nbytes)))

    def _spilled(self, param: Tensor, nbytes: int) -> tuple[int, int]:
        if self.file is None:
            # Unlinked at once: private to this process, and gone when it closes or exits.
            self.file = tempfile.TemporaryFile(prefix="diffuse-lora-", dir=spill_folder())
        known = self.on_file.get(id(param))
        if known is not None and known[1] is not None and known[1] == _state(param):
            return known[2], known[3]
        offset = known[2] if known is not None and known[3] == nbytes else self.file.seek(0, 2)
        self.file.seek(offset)
        self.file.write(memoryview(param.detach().contiguous().view(-1).view(torch.uint8).numpy()))
        self.on_file[id(param)] = (param, None, offset, nbytes)  # true again once restored
        return offset, nbytes

    @torch.no_grad()
    def put_back(self) -> None:
        for param, original in reversed(self.saved):
            if isinstance(original, tuple):
                offset, nbytes = original
                raw = torch.empty(nbytes, dtype=torch.uint8)
                self.file.seek(offset)
                self.file.readinto(memoryview(raw.numpy()))
                param.copy_(raw.view(param.dtype).view(param.shape))  # same tensor: layout stays, version moves on
                self.on_file[id(param)] = (param, _state(param), offset, nbytes)
            else:
                param.copy_(original)
        self.saved.clear()
        self.in_memory = 0


def model_base(networks: Mapping[str, nn.Module]) -> str:
    """The model's base: "SDXL" (a second text encoder, or a UNet reading the vector y), "SD 2.x" or "SD 1.x"."""
    cfg = getattr(networks.get("unet"), "cfg", None)
    if "text_encoder_2" in networks or (isinstance(cfg, UNetConfig) and cfg.adm_in_channels):
        return "SDXL"
    return "SD 2.x" if isinstance(cfg, UNetConfig) and cfg.use_linear_projection else "SD 1.x"


def _kept(lora: Lora) -> Lora:
    """What `applied` holds once a LoRA is merged: a file's LoRA without its tensors (restoring needs
    only the originals, and the tensors would stay in memory for as long as it is merged); one made
    in memory as it is, since only its identity tells it apart."""
    return lora if lora.path is None else replace(lora, patches=[], bundled_embeddings={})


def _same(a: Lora, b: Lora) -> bool:
    if a.path is None or b.path is None:
        return a is b
    return (a.path, a.short_hash) == (b.path, b.short_hash)


def _source(lora: Lora) -> str | Path:
    return lora.path or lora.name


def _on_meta(patch: Patch) -> Patch:
    # alpha and scale stay real: they are read as numbers, and are 0-dim anyway.
    tensors = {
        k: v if k in ("alpha", "scale") else torch.empty(v.shape, dtype=torch.float32, device="meta")
        for k, v in patch.tensors.items()
    }
    return Patch(patch.network, patch.target, patch.kind, tensors, patch.keys, patch.default_alpha)


def _why_not_fit(patch: Patch, module: nn.Module, networks: Mapping[str, nn.Module]) -> str | None:
    """None if the patch's change fits the module; else the reason, naming the base it was made for."""
    weight = module.weight
    try:
        meta = _on_meta(patch)
        contribution(meta, torch.empty(weight.shape, device="meta"), 1.0)
        if "diff_b" in patch.tensors and (module.bias is None or module.bias.shape != patch.tensors["diff_b"].shape):
            return f"module {patch.target}: diff_b does not fit the layer's bias"
        return None
    except (ValueError, RuntimeError) as e:
        generic = f"module {patch.target}: {e}".splitlines()[0]
    try:
        shape = list(DELTAS[patch.kind](_on_meta(patch).tensors).shape)
    except (ValueError, RuntimeError):
        return generic
    if patch.network != "unet":
        width = networks[patch.network].cfg.width
        return f"made for a text encoder of another width: {generic}; this model's {patch.network} is {width} wide"
    if patch.target.endswith(("attn2_to_k", "attn2_to_v")) and len(shape) == 2:
        context = networks["unet"].cfg.context_dim
        return (
            f"made for another base: its cross-attention reads {shape[1]}-wide text, this model's "
            f"({model_base(networks)}) reads {context}-wide ({patch.target})"
        )
    return generic


def _base_refusal(lora: Lora, networks: Mapping[str, nn.Module]) -> str | None:
    """Why the LoRA was made for another base, from its metadata or from which text encoders its
    keys name; None if neither tells it apart from this model."""
    base, model = lora.base, model_base(networks)
    if base is not None and base != model:
        return f"made for {base} (its metadata says so), this model is {model}"
    keys = [k for p in lora.patches for k in p.keys]
    second = next((k for p in lora.patches if p.network == "text_encoder_2" for k in p.keys), None)
    if second is not None and model != "SDXL":
        return f"made for SDXL (it changes a second text encoder: {second}), this model is {model}"
    single = next((k for k in keys if k.startswith(SINGLE_ENCODER_PREFIX)), None)
    if single is not None and model == "SDXL":
        return f"made for SD 1.x / 2.x (its key {single} names their one text encoder), this model is SDXL"
    return None


class LoraMerge:
    """The LoRAs merged into one pipeline's networks ({"unet": ..., "text_encoder": ...}, and
    "text_encoder_2" for SDXL)."""

    def __init__(self, networks: Mapping[str, nn.Module], spill_above: int = SPILL_ABOVE):
        self.networks = dict(networks)
        self._originals = _Originals(spill_above)
        self._applied: tuple[tuple[Lora, float, float], ...] = ()
        self._index: dict[tuple[str, str], str] | None = None

    @property
    def applied(self) -> tuple[tuple[Lora, float, float], ...]:
        """What is merged now: (lora, te multiplier, unet multiplier) in the order applied (a file's
        LoRA without its tensors)."""
        return self._applied

    def _modules(self) -> dict[tuple[str, str], str]:
        if self._index is None:
            self._index = module_index(self.networks)
        return self._index

    def _module(self, network: str, path: str) -> nn.Module:
        return self.networks[network].get_submodule(path)

    def check(self, selection: Iterable[tuple[Lora, float, float]]) -> list[Planned]:
        """Every patch matched to its module with its multiplier; raise LoraError, changing nothing,
        if any LoRA was made for another base, has keys that match no module, or does not fit."""
        index, plan = self._modules(), []
        for lora, te_weight, unet_weight in selection:
            refusal = _base_refusal(lora, self.networks)
            unmatched = [k for p in lora.patches if (p.network, p.target) not in index for k in p.keys]
            if refusal is None and unmatched:
                total = sum(len(p.keys) for p in lora.patches)
                refusal = (
                    f"{len(unmatched)} of {total} keys match no module of this model "
                    f"({model_base(self.networks)}): {listing(unmatched)}"
                )
            for patch in lora.patches if refusal is None else ():
                module = self._module(patch.network, index[(patch.network, patch.target)])
                refusal = _why_not_fit(patch, module, self.networks)
                if refusal is not None:
                    break
                plan.append((module, patch, unet_weight if patch.network == "unet" else te_weight, _source(lora)))
            if refusal is not None:
                raise LoraError(_source(lora), refusal)
        return plan

    def apply(self, selection: Iterable[tuple[Lora, float, float]]) -> None:
        """Merge `selection`, a list of (lora, te_weight, unet_weight), into the networks. The same
        selection as now applied is a no-op; another one restores the originals first. An empty
        selection just restores."""
        selection = tuple((lora, float(te), float(unet)) for lora, te, unet in selection)
        if len(selection) == len(self._applied) and all(
            _same(a[0], b[0]) and a[1:] == b[1:] for a, b in zip(selection, self._applied, strict=True)
        ):
            return
        plan = self.check(selection)  # before restoring: a refused selection leaves the current one merged
        self.restore()
        try:
            self._merge(plan)
        except BaseException:
            self._originals.put_back()
            raise
        self._applied = tuple((_kept(lora), te, unet) for lora, te, unet in selection)

    @torch.no_grad()
    def _merge(self, plan: list[Planned]) -> None:
        by_module: dict[int, tuple[nn.Module, list[Planned]]] = {}
        for planned in plan:
            if planned[2] != 0.0:
                by_module.setdefault(id(planned[0]), (planned[0], []))[1].append(planned)
        for module, planned in by_module.values():
            weight = module.weight
            patches = [(m, patch.loaded(), multiplier, source) for m, patch, multiplier, source in planned]
            # DoRA reads the original weight in float32; the plain changes need only its shape.
            dora = any("dora_scale" in p.tensors for _, p, _, _ in patches)
            original = weight.detach().to(torch.float32) if dora else torch.empty(weight.shape, device="meta")
            total = None
            for _, patch, multiplier, _ in patches:
                change = contribution(patch, original, multiplier)
                total = change if total is None else total.add_(change)
            # W + the sum in float32; a half-precision W is widened inside the add, not copied first.
            widened = weight.detach() if weight.dtype in _WIDENED_IN_ADD else weight.detach().to(torch.float32)
            self._update(weight, total.add_(widened), patches)
            biases = [b for _, p, m, _ in patches if (b := bias_contribution(p, m)) is not None]
            if biases:
                self._update(module.bias, module.bias.detach().to(torch.float32) + sum(biases), patches)

    def _update(self, param: Tensor, value: Tensor, patches: list[Planned]) -> None:
        value = value.to(param.dtype)
        if not all_finite(value):
            sources = ", ".join(dict.fromkeys(str(s) for *_, s in patches))
            raise LoraError(sources, f"merging into {patches[0][1].target} gives non-finite weights")
        self._originals.keep(param)
        param.copy_(value)

    def restore(self) -> None:
        """Bring every weight an apply touched back, bit for bit; nothing applied afterwards."""
        self._originals.put_back()
        self._applied = ()
