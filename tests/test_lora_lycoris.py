"""LyCORIS types diffusers cannot read (LoHa, LoKr, Full, DoRA, Tucker LoCon) and kohya files in
LDM names: merged weights against the formulas written out here, independently of lora_math."""

from __future__ import annotations

import pytest
import torch

import diffuse
from diffuse.adapters import LoraMerge, lora_from_state_dict

LINEAR = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"  # 32 x 32
FF = "input_blocks.4.1.transformer_blocks.0.ff.net.0.proj"  # 512 x 64, has a bias
CONV = "input_blocks.4.0.in_layers.2"  # 64 x 32 x 3 x 3
TEXT = "encoder.layers.1.mlp.fc1"  # 64 x 32


def kohya(path: str, network: str = "unet") -> str:
    return ("lora_unet_" if network == "unet" else "lora_te_text_model_") + path.replace(".", "_")


@pytest.fixture
def pipe(reference_folders):
    return diffuse.load_pipeline(reference_folders["sd1"], dtype="float32")


def rand(*shape: int, seed: list = [0]) -> torch.Tensor:  # noqa: B006 - a counter shared across calls on purpose
    seed[0] += 1
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed[0])) * 0.3


def merged(pipe, state: dict, multiplier: float) -> dict[str, torch.Tensor]:
    before = {k: v.clone() for k, v in {**_weights(pipe, "unet"), **_weights(pipe, "text_encoder")}.items()}
    LoraMerge({"unet": pipe.unet, "text_encoder": pipe.text_encoder}).apply(
        [(lora_from_state_dict(state, "lyco"), multiplier, multiplier)]
    )
    after = {**_weights(pipe, "unet"), **_weights(pipe, "text_encoder")}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    return before, after, changed


def _weights(pipe, network: str) -> dict[str, torch.Tensor]:
    prefix = "" if network == "unet" else "te:"
    return {prefix + k: v for k, v in getattr(pipe, network).state_dict().items()}


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Kronecker product by explicit blocks: block (i, m) of the result is a[i, m] * b."""
    rows = [torch.cat([a[i, m] * b for m in range(a.shape[1])], dim=1) for i in range(a.shape[0])]
    return torch.cat(rows, dim=0)


def tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    # core [r, r, kh, kw], wa [r, out], wb [r, in] -> [out, in, kh, kw], in two contractions
    x = torch.tensordot(core, wb, dims=([1], [0]))  # [r, kh, kw, in]
    return torch.tensordot(wa, x, dims=([0], [0])).permute(0, 3, 1, 2)  # [out, in, kh, kw]


def test_loha_linear_and_tucker_conv(pipe):
    lin = {"hada_w1_a": rand(32, 2), "hada_w1_b": rand(2, 32), "hada_w2_a": rand(32, 2), "hada_w2_b": rand(2, 32)}
    conv = {"hada_w1_a": rand(3, 64), "hada_w1_b": rand(3, 32), "hada_w2_a": rand(3, 64), "hada_w2_b": rand(3, 32)}
    conv |= {"hada_t1": rand(3, 3, 3, 3), "hada_t2": rand(3, 3, 3, 3)}
    state = {f"{kohya(LINEAR)}.{k}": v for k, v in lin.items()} | {f"{kohya(LINEAR)}.alpha": torch.tensor(5.0)}
    state |= {f"{kohya(CONV)}.{k}": v for k, v in conv.items()} | {f"{kohya(CONV)}.alpha": torch.tensor(1.0)}
    before, after, changed = merged(pipe, state, 0.6)
    assert changed == {f"{LINEAR}.weight", f"{CONV}.weight"}
    d_lin = (lin["hada_w1_a"] @ lin["hada_w1_b"]) * (lin["hada_w2_a"] @ lin["hada_w2_b"]) * 5.0 / 2
    d_conv = tucker(conv["hada_t1"], conv["hada_w1_a"], conv["hada_w1_b"])
    d_conv = d_conv * tucker(conv["hada_t2"], conv["hada_w2_a"], conv["hada_w2_b"]) * 1.0 / 3
    torch.testing.assert_close(after[f"{LINEAR}.weight"], before[f"{LINEAR}.weight"] + 0.6 * d_lin)
    torch.testing.assert_close(after[f"{CONV}.weight"], before[f"{CONV}.weight"] + 0.6 * d_conv)


LOKR_CASES = {
    # name: (target module, its tensors, the rank alpha is divided by: None when scale is 1)
    "both full (alpha ignored)": (
        LINEAR,
        lambda: {"lokr_w1": rand(4, 2), "lokr_w2": rand(8, 16)},
        None,
    ),
    "w1 full, w2 decomposed": (
        LINEAR,
        lambda: {"lokr_w1": rand(4, 4), "lokr_w2_a": rand(8, 3), "lokr_w2_b": rand(3, 8)},
        3,
    ),
    "w1 decomposed, w2 full": (
        LINEAR,
        lambda: {"lokr_w1_a": rand(2, 2), "lokr_w1_b": rand(2, 8), "lokr_w2": rand(16, 4)},
        2,
    ),
    "both decomposed": (
        TEXT,
        lambda: {"lokr_w1_a": rand(8, 2), "lokr_w1_b": rand(2, 4), "lokr_w2_a": rand(8, 2), "lokr_w2_b": rand(2, 8)},
        2,
    ),
    "conv, w2 full kernel": (CONV, lambda: {"lokr_w1": rand(4, 2), "lokr_w2": rand(16, 16, 3, 3)}, None),
    "conv, w2 decomposed kernel": (
        CONV,
        lambda: {"lokr_w1": rand(8, 4), "lokr_w2_a": rand(8, 3), "lokr_w2_b": rand(3, 8, 3, 3)},
        3,
    ),
    "conv, Tucker w2": (
        CONV,
        lambda: {
            "lokr_w1": rand(2, 2),
            "lokr_w2_a": rand(2, 32),
            "lokr_w2_b": rand(2, 16),
            "lokr_t2": rand(2, 2, 3, 3),
        },
        2,
    ),
}


def _lokr_expected(t: dict) -> torch.Tensor:
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_t2" in t:
        w2 = tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    elif "lokr_w2" in t:
        w2 = t["lokr_w2"]
    else:
        b = t["lokr_w2_b"]
        w2 = (t["lokr_w2_a"] @ b.reshape(b.shape[0], -1)).reshape(t["lokr_w2_a"].shape[0], *b.shape[1:])
    if w2.dim() == 4:
        return torch.stack([torch.stack([kron(w1, w2[:, :, k, c]) for c in range(3)], -1) for k in range(3)], -2)
    return kron(w1, w2)


@pytest.mark.parametrize("case", list(LOKR_CASES))
def test_lokr(pipe, case):
    target, make, rank = LOKR_CASES[case]
    tensors = make()
    network = "text_encoder" if target == TEXT else "unet"
    state = {f"{kohya(target, network)}.{k}": v for k, v in tensors.items()}
    state[f"{kohya(target, network)}.alpha"] = torch.tensor(7.0)
    before, after, changed = merged(pipe, state, 1.0)
    key = ("te:" if network == "text_encoder" else "") + f"{target}.weight"
    assert changed == {key}
    scale = 1.0 if rank is None else 7.0 / rank
    torch.testing.assert_close(after[key], before[key] + _lokr_expected(tensors) * scale)


def test_full_diff_and_bias(pipe):
    diff, diff_b = rand(512, 64), rand(512)
    before, after, changed = merged(pipe, {f"{kohya(FF)}.diff": diff, f"{kohya(FF)}.diff_b": diff_b}, 0.6)
    assert changed == {f"{FF}.weight", f"{FF}.bias"}
    torch.testing.assert_close(after[f"{FF}.weight"], before[f"{FF}.weight"] + 0.6 * diff)
    torch.testing.assert_close(after[f"{FF}.bias"], before[f"{FF}.bias"] + 0.6 * diff_b)


@pytest.mark.parametrize("axis", ["output", "input"])
def test_dora(pipe, axis):
    down, up = rand(3, 64), rand(512, 3)
    magnitude = rand(512, 1).abs() + 0.5 if axis == "output" else rand(1, 64).abs() + 0.5
    state = {f"{kohya(FF)}.lora_down.weight": down, f"{kohya(FF)}.lora_up.weight": up}
    state |= {f"{kohya(FF)}.alpha": torch.tensor(2.0), f"{kohya(FF)}.dora_scale": magnitude}
    before, after, _ = merged(pipe, state, 0.6)
    w = before[f"{FF}.weight"]
    w_prime = w + up @ down * 2.0 / 3
    dim = 1 if axis == "output" else 0
    decomposed = magnitude * w_prime / torch.linalg.vector_norm(w_prime, dim=dim, keepdim=True)
    torch.testing.assert_close(after[f"{FF}.weight"], w + 0.6 * (decomposed - w))


def test_tucker_locon_and_scale_override(pipe):
    mid, down, up = rand(4, 4, 3, 3), rand(4, 32, 1, 1), rand(64, 4, 1, 1)
    state = {f"{kohya(CONV)}.lora_mid.weight": mid, f"{kohya(CONV)}.lora_down.weight": down}
    state |= {f"{kohya(CONV)}.lora_up.weight": up, f"{kohya(CONV)}.alpha": torch.tensor(3.0)}
    ldown, lup = rand(2, 32), rand(32, 2)
    state |= {f"{kohya(LINEAR)}.lora_down.weight": ldown, f"{kohya(LINEAR)}.lora_up.weight": lup}
    state |= {f"{kohya(LINEAR)}.alpha": torch.tensor(3.0), f"{kohya(LINEAR)}.scale": torch.tensor(0.25)}
    before, after, _ = merged(pipe, state, 1.0)
    expected = tucker(mid, up.flatten(1).T, down.flatten(1)) * 3.0 / 4
    torch.testing.assert_close(after[f"{CONV}.weight"], before[f"{CONV}.weight"] + expected)
    torch.testing.assert_close(after[f"{LINEAR}.weight"], before[f"{LINEAR}.weight"] + 0.25 * (lup @ ldown))


def test_ldm_names_equal_diffusers_names(reference_folders):
    """A kohya file naming the UNet's modules as the original LDM does merges exactly as one naming them as
    diffusers does (here: a Resnet conv, a transformer linear, the downsampler and the upsampler)."""
    pairs = {
        "input_blocks.4.0.in_layers.2": "down_blocks.1.resnets.0.conv1",
        "output_blocks.3.1.transformer_blocks.0.attn2.to_k": "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
        "input_blocks.3.0.op": "down_blocks.0.downsamplers.0.conv",
        "output_blocks.2.1.conv": "up_blocks.0.upsamplers.0.conv",
        "middle_block.2.emb_layers.1": "mid_block.resnets.1.time_emb_proj",
    }
    results = []
    for names in (list(pairs), list(pairs.values())):
        pipe = diffuse.load_pipeline(reference_folders["sd1"], dtype="float32")
        state = {}
        for i, ldm in enumerate(pairs):
            weight = pipe.unet.get_submodule(ldm).weight
            gen = torch.Generator().manual_seed(i)
            down = torch.randn(2, *weight.shape[1:], generator=gen)
            up = torch.randn(weight.shape[0], 2, *([1, 1] if weight.dim() == 4 else []), generator=gen)
            state |= {f"{kohya(names[i])}.lora_down.weight": down, f"{kohya(names[i])}.lora_up.weight": up}
        before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
        LoraMerge({"unet": pipe.unet, "text_encoder": pipe.text_encoder}).apply(
            [(lora_from_state_dict(state, "x"), 1, 1)]
        )
        after = pipe.unet.state_dict()
        assert {k for k in before if not torch.equal(before[k], after[k])} == {f"{p}.weight" for p in pairs}
        results.append(after)
    for key, value in results[0].items():
        assert torch.equal(value, results[1][key]), key


def test_conv_in_change_padded_for_inpainting(tmp_path, clip_vocab_dir):
    """A 4-channel conv_in change on a 9-channel inpainting conv_in is zero-padded, as A1111 does."""
    from conftest import build_reference

    build_reference("sd1", clip_vocab_dir, in_channels=9).save_pretrained(tmp_path, safe_serialization=True)
    pipe = diffuse.load_pipeline(tmp_path, dtype="float32")
    down, up = rand(2, 4, 3, 3), rand(32, 2, 1, 1)
    state = {"lora_unet_conv_in.lora_down.weight": down, "lora_unet_conv_in.lora_up.weight": up}
    before, after, changed = merged(pipe, state, 1.0)
    key = "input_blocks.0.0.weight"
    assert changed == {key}
    expected = before[key].clone()
    expected[:, :4] += (up.flatten(1) @ down.flatten(1)).reshape(32, 4, 3, 3)
    torch.testing.assert_close(after[key], expected)
    assert torch.equal(after[key][:, 4:], before[key][:, 4:])
