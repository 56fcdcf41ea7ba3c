"""`diffuse train lora`: low-rank adapters trained beside a frozen base model, written as kohya's
sd-scripts writes them, so A1111, diffusers and diffuse's own reader all take the file.

Each adapted layer W (a Linear, or a Conv2d such as SD1's 1x1 proj_in) gains a bypass

    y = W x + (alpha / rank) * up(down(x)),

down a rank-r projection of the layer's input (kaiming-uniform start), up back to its output
(zero start, so step 0 is exactly the base model). The bypass runs as a forward hook on the
base layer, so the base weights are never touched. Training uses the UNet stage's objective
(objectives.unet_loss) on a kohya image + caption folder, and the shared loop, so a run
resumes bit for bit like every other stage.

The file's names are the diffusers module names (`lora_unet_down_blocks_0_attentions_0_proj_in`),
found through diffuse.adapters.lora_keys' own map, and `lora_te_text_model_...` for the text
encoder; its metadata the `ss_*` fields sd-scripts writes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from diffuse.adapters.lora_keys import KOHYA_NETWORKS, module_index, underscored
from diffuse.train.captioned_folder import CaptionedFolder
from diffuse.train.components import is_main_process
from diffuse.train.loop import BatchRandom, LoopConfig
from diffuse.train.stages.frozen_base import (
    DEFAULT_MODEL,
    FrozenBase,
    diffusion_loss,
    load_base,
    train_beside_base,
    write_safetensors,
)
from diffuse.train.state import resumable

# Module groups a config may name -> the endings of the diffusers (UNet) and transformers (text
# encoder) module names they adapt: what sd-scripts' LoRA adapts in SD 1.x / 2.x.
MODULE_GROUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "attention": (
        tuple(f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")),
        ("q_proj", "k_proj", "v_proj", "out_proj"),
    ),
    "feed_forward": (("ff.net.0.proj", "ff.net.2"), ("fc1", "fc2")),
    "proj": (("proj_in", "proj_out"), ()),
}


@dataclass(frozen=True)
class LoraTrainConfig(LoopConfig):
    model: str = DEFAULT_MODEL  # the frozen base: a diffusers folder or a single-file checkpoint
    data: str = ""  # a folder of images, each with a caption .txt beside it
    image_size: int | None = None  # the side images are cropped to; None: the model's native size
    rank: int = 4
    alpha: float = 4.0  # the bypass is scaled by alpha / rank (kohya's network_alpha)
    modules: tuple[str, ...] = ("attention", "feed_forward", "proj")
    train_text_encoder: bool = False  # adapt the text encoder's attention and MLP as well
    caption_dropout: float = 0.0
    min_snr_gamma: float | None = None  # see objectives.unet_loss
    output_name: str | None = None  # the file's stem and ss_output_name; None: the run folder's name
    # The loop's defaults made for an adapter: few steps, a large learning rate, a small batch.
    steps: int = resumable(400)
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 20
    checkpoint_every: int = resumable(100)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank < 1 or not self.alpha > 0:
            raise ValueError(f"rank must be at least 1 and alpha positive, not {self.rank} and {self.alpha}")
        unknown = sorted(set(self.modules) - set(MODULE_GROUPS))
        if unknown or not self.modules:
            raise ValueError(f"modules must be some of {sorted(MODULE_GROUPS)}, not {list(self.modules)}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], not {self.caption_dropout}")


class LoraAdapter(nn.Module):
    """The bypass (alpha / rank) * up(down(x)) of one Linear or Conv2d layer."""

    def __init__(self, layer: nn.Module, rank: int, alpha: float):
        super().__init__()
        if isinstance(layer, nn.Conv2d):
            # down sees what the layer sees (its kernel, stride and padding); up mixes channels only.
            self.down = nn.Conv2d(
                layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, layer.dilation, bias=False
            )
            self.up = nn.Conv2d(rank, layer.out_channels, 1, bias=False)
        else:
            self.down = nn.Linear(layer.in_features, rank, bias=False)
            self.up = nn.Linear(rank, layer.out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.scale = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x)) * self.scale


class LoraNetwork(nn.Module):
    """The adapters, by kohya name, hooked onto the base layers; called as the UNet is.

    Only the adapters are submodules: the base networks stay outside, so the loop trains, moves
    and checkpoints the adapters alone while the frozen layers still pass gradients through."""

    def __init__(self, unet: nn.Module, layers: dict[str, nn.Module], rank: int, alpha: float):
        super().__init__()
        self.adapters = nn.ModuleDict({name: LoraAdapter(layer, rank, alpha) for name, layer in layers.items()})
        object.__setattr__(self, "_unet", unet)
        object.__setattr__(self, "_layers", layers)
        object.__setattr__(self, "_hooks", [])

    def attach(self) -> None:
        """Hook every adapter onto its layer (each output gains the adapter's bypass)."""
        self.detach()
        for name, layer in self._layers.items():
            adapter = self.adapters[name]
            self._hooks.append(layer.register_forward_hook(lambda _m, args, out, a=adapter: out + a(args[0])))

    def detach(self) -> None:
        """Remove the hooks: the base layers compute what they did before."""
        while self._hooks:
            self._hooks.pop().remove()

    def forward(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        return self._unet(x, t, context)

    def kohya_state(self) -> dict[str, Tensor]:
        """The adapters as sd-scripts saves them: `<name>.lora_down.weight`, `.lora_up.weight`, `.alpha`."""
        state = {}
        for name, adapter in self.adapters.items():
            state[f"{name}.lora_down.weight"] = adapter.down.weight.detach().cpu().contiguous()
            state[f"{name}.lora_up.weight"] = adapter.up.weight.detach().cpu().contiguous()
            state[f"{name}.alpha"] = adapter.alpha.detach().cpu().clone()
        return state


def _kohya_prefix(network: str) -> str:
    """(kohya prefix + the path part diffuse's module lacks) for a network, from lora_keys' table."""
    for prefix, (name, inner) in KOHYA_NETWORKS.items():
        if name == network:
            return prefix + inner
    raise ValueError(f"no kohya prefix for network {network!r}")


def target_layers(networks: dict[str, nn.Module], modules: tuple[str, ...]) -> dict[str, nn.Module]:
    """{kohya name: layer} of every layer the module groups adapt in `networks` ("unet",
    "text_encoder"), named as sd-scripts names them (the UNet in diffusers' names)."""
    index = module_index(networks)
    layers = {}
    for network, root in networks.items():
        endings = tuple(e for group in modules for e in MODULE_GROUPS[group][network == "text_encoder"])
        by_path = dict(root.named_modules())
        # lora_keys' index lists each layer under diffuse's name and, for a UNet, diffusers' too;
        # diffusers' is the one sd-scripts writes.
        diffusers_names = {
            path: name for (net, name), path in index.items() if net == network and name != underscored(path)
        }
        for path, layer in by_path.items():
            if not isinstance(layer, (nn.Linear, nn.Conv2d)) or getattr(layer, "groups", 1) != 1:
                continue
            name = diffusers_names.get(path, underscored(path))
            if endings and any(name.endswith(underscored(e)) for e in endings):
                layers[_kohya_prefix(network) + name] = layer
    return layers


def build_network(config: LoraTrainConfig, base: FrozenBase) -> LoraNetwork:
    """The run's adapters on `base`, seeded by the config (the same start for every run of it)."""
    networks = {"unet": base.pipe.unet}
    if config.train_text_encoder:
        networks["text_encoder"] = base.pipe.text_encoder
    layers = target_layers(networks, config.modules)
    if not layers:
        raise ValueError(f"{config.model}: no layer of the module groups {list(config.modules)} to adapt")
    torch.manual_seed(config.seed)
    network = LoraNetwork(base.pipe.unet, layers, config.rank, config.alpha)
    network.attach()
    return network


def loss_fn(
    config: LoraTrainConfig, base: FrozenBase, models: dict[str, nn.Module], batch: dict, random: BatchRandom
) -> tuple[Tensor, dict[str, float]]:
    return diffusion_loss(base, models["lora"], batch, random, config.caption_dropout, config.min_snr_gamma)


def lora_metadata(config: LoraTrainConfig, base: FrozenBase, name: str, images: int) -> dict[str, str]:
    """The `ss_*` fields sd-scripts writes that readers (A1111, diffuse.adapters) look at."""
    return {
        "ss_output_name": name,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": str(config.alpha),
        "ss_base_model_version": base.base_version,
        "ss_v2": str(base.base_version == "sd_v2"),
        "ss_network_args": "{}",
        "ss_steps": str(config.steps),
        "ss_learning_rate": str(config.lr),
        "ss_resolution": f"({base.image_size}, {base.image_size})",
        "ss_num_train_images": str(images),
        "ss_sd_model_name": Path(config.model).name,
        "ss_text_encoder_lr": str(config.lr if config.train_text_encoder else 0.0),
    }


def train_lora(
    config: LoraTrainConfig, out_dir: str | Path, *, resume: bool = True, progress: bool = True, data_workers: int = 0
) -> Path:
    """Train the adapters in `out_dir`, then write `<output_name>.safetensors` there; returns its path."""
    out_dir = Path(out_dir)
    if not config.data:
        raise ValueError("data must name a folder of images with captions (--data)")
    base = load_base(config.model, config.image_size)
    data = CaptionedFolder(config.data, base.image_size)
    network = build_network(config, base)
    train_beside_base(
        config,
        base,
        data,
        ("lora", network),
        partial(loss_fn, config, base),
        out_dir,
        resume=resume,
        progress=progress,
        data_workers=data_workers,
    )
    network.detach()
    name = config.output_name or out_dir.resolve().name
    path = out_dir / f"{name}.safetensors"
    if is_main_process():
        write_safetensors(path, network.kohya_state(), lora_metadata(config, base, name, len(data)))
    return path
