"""The training losses (diffuse.train.objectives), the CLIP image tower, and the default-model presets.

Tiny networks throughout; the preset test builds the real default sizes once.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffuse.models.clip import CLIPTextEncoder
from diffuse.models.configs import TextEncoderConfig, UNetConfig, VAEConfig
from diffuse.models.unet import UNet
from diffuse.models.vae import AutoencoderKL
from diffuse.samplers.schedule import NoiseSchedule
from diffuse.shapes.data import Scene, Shape, image_to_tensor, render
from diffuse.shapes.image_encoder import (
    LOGIT_SCALE_INIT,
    ImageEncoder,
    ImageEncoderConfig,
    LogitScale,
    TextProjection,
)
from diffuse.train.loop import BatchRandom
from diffuse.train.objectives import (
    clip_loss,
    contrastive_loss,
    drop_captions,
    encode_latents,
    object_pixels,
    scaling_factor_for,
    unet_loss,
    vae_loss,
)
from diffuse.train.presets import TINY, TINY_IMAGE_ENCODER, TINY_TEXT, TINY_UNET, TINY_VAE

EOS = 99
TEXT = TextEncoderConfig(vocab_size=100, max_length=8, width=32, layers=2, heads=2, mlp_width=64)
UNET = UNetConfig(
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_levels=(False, True),
    heads=(2, 2),
    context_dim=32,
    norm_groups=8,
)
VAE = VAEConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8)  # f = 2
IMAGE = ImageEncoderConfig(image_size=16, stage_channels=(16, 32), norm_groups=8, embed_dim=16)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(batch: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Flat-colour squares on flat backgrounds, in [-1, 1]: the kind of picture training will see."""
    g = gen(seed)
    out = (torch.rand(batch, 3, 1, 1, generator=g) * 2 - 1).expand(batch, 3, size, size).clone()
    for i in range(batch):
        y, x = torch.randint(0, size // 2, (2,), generator=g).tolist()
        out[i, :, y : y + size // 2, x : x + size // 2] = torch.rand(3, 1, 1, generator=g) * 2 - 1
    return out


def caption_ids(batch: int, seed: int = 0) -> torch.Tensor:
    """[B, 8] ids: bos-like start, 3 random tokens, end-of-text, then padding with end-of-text."""
    words = torch.randint(1, EOS, (batch, 3), generator=gen(seed))
    return torch.cat([torch.zeros(batch, 1, dtype=torch.long), words, torch.full((batch, 4), EOS)], dim=1)


# ---------------------------------------------------------------- image tower


def test_image_encoder_shapes_and_finite():
    torch.manual_seed(0)
    encoder = ImageEncoder(IMAGE)
    out = encoder(images(3))
    assert out.shape == (3, 16) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"\[B, 3, 16, 16\]"):
        encoder(torch.zeros(1, 3, 32, 32))


def test_image_encoder_keeps_position():
    """The same square at two places must embed differently (the head flattens, it does not pool)."""
    torch.manual_seed(0)
    encoder = ImageEncoder(IMAGE).eval()
    left = -torch.ones(1, 3, 16, 16)
    right = left.clone()
    left[..., 4:12, 0:8] = 1
    right[..., 4:12, 8:16] = 1
    with torch.no_grad():
        a, b = F.normalize(encoder(left), dim=-1), F.normalize(encoder(right), dim=-1)
    assert (a - b).norm() > 0.05


@pytest.mark.parametrize("bad", [dict(image_size=18), dict(norm_groups=5), dict(stage_channels=())])
def test_image_encoder_config_refuses(bad):
    with pytest.raises(ValueError):
        ImageEncoderConfig(**{**dict(image_size=16, stage_channels=(16, 32), norm_groups=8), **bad})


# ---------------------------------------------------------------- contrastive loss


def test_contrastive_aligned_beats_shuffled_and_matches_clip_formula():
    embeds = torch.randn(8, 16, generator=gen(1))
    ids = caption_ids(8)
    scale = LogitScale()()
    assert abs(scale.item() - 1 / 0.07) < 1e-4
    aligned, logs = contrastive_loss(embeds, embeds, scale, ids)
    shuffled, shuffled_logs = contrastive_loss(embeds, embeds.roll(1, dims=0), scale, ids)
    assert logs["acc_image_to_text"] == logs["acc_text_to_image"] == 1.0
    assert shuffled_logs["acc_image_to_text"] < 1.0
    assert aligned < shuffled

    # With distinct captions it is exactly CLIP's loss with integer labels.
    a, b = F.normalize(embeds, dim=-1), F.normalize(torch.randn(8, 16, generator=gen(2)), dim=-1)
    logits = math.exp(LOGIT_SCALE_INIT) * a @ b.T
    labels = torch.arange(8)
    want = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    got, _ = contrastive_loss(a * 3, b * 0.5, scale, ids)  # the loss normalises the embeddings itself
    assert abs(got.item() - want.item()) < 1e-5


def test_hard_negatives_join_the_captions_images_choose_among():
    images, texts, negatives = (torch.randn(6, 16, generator=gen(seed)) for seed in (4, 5, 6))
    ids, scale = caption_ids(6), LogitScale()()
    has = torch.tensor([True, False, True, True, False, False])
    got, logs = contrastive_loss(images, texts, scale, ids, negatives, has)
    a, b, n = (F.normalize(x, dim=-1) for x in (images, texts, negatives))
    logits = scale * a @ b.T
    labels = torch.arange(6)
    extended = torch.cat([logits, (scale * a @ n.T)[:, has]], dim=1)  # only the rows that have a negative
    want = (F.cross_entropy(extended, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert abs(got.item() - want.item()) < 1e-5
    own, against = logits.diagonal()[has], (scale * a @ n.T).diagonal()[has]
    assert logs["acc_vs_negative"] == (own > against).float().mean().item()
    # Rows without a negative add nothing: with none at all it is the plain loss.
    assert (
        contrastive_loss(images, texts, scale, ids, negatives, torch.zeros(6, dtype=torch.bool))[0]
        == contrastive_loss(images, texts, scale, ids)[0]
    )
    with pytest.raises(ValueError, match="one \\[D\\] row per caption"):
        contrastive_loss(images, texts, scale, ids, negatives[:3], has)


def test_contrastive_counts_repeated_captions_as_matches():
    ids = caption_ids(4)
    ids[3] = ids[0]  # caption 3 repeats caption 0, so its text embedding is caption 0's
    texts = torch.randn(4, 16, generator=gen(3))
    texts[3] = texts[0]
    pictures = texts + 0.01 * torch.randn(4, 16, generator=gen(4))
    loss, logs = contrastive_loss(pictures, texts, LogitScale()(), ids)
    # Image 3 cannot tell caption 3 from caption 0; picking either is right.
    assert logs["acc_image_to_text"] == logs["acc_text_to_image"] == 1.0
    assert logs["duplicate_caption_pairs"] == 1
    # The loss is CLIP's; the two copies leave it a floor of log 2 on the repeated rows.
    assert loss.item() > math.log(2) / 2


def test_logit_scale_is_clamped_at_100():
    at_max = LogitScale(initial=math.log(100.0))
    above = LogitScale(initial=math.log(1000.0))
    assert abs(at_max().item() - 100.0) < 1e-3 and torch.equal(above(), at_max())
    embeds, other = torch.randn(6, 16, generator=gen(4)), torch.randn(6, 16, generator=gen(5))
    loss, logs = contrastive_loss(embeds, other, above(), caption_ids(6))
    loss.backward()
    assert abs(logs["logit_scale"] - 100.0) < 1e-3
    assert above.log_scale.grad == 0  # past the clamp the temperature stops moving
    below = LogitScale()
    contrastive_loss(embeds, other, below(), caption_ids(6))[0].backward()
    assert below.log_scale.grad != 0


def test_clip_loss_runs_the_towers():
    torch.manual_seed(0)
    text, proj, image = CLIPTextEncoder(TEXT), TextProjection(TEXT.width, IMAGE.embed_dim), ImageEncoder(IMAGE)
    ids, pictures = caption_ids(4), images(4)
    loss, logs = clip_loss(text, proj, image, LogitScale(), ids, pictures, eos_token_id=EOS)
    want, _ = contrastive_loss(image(pictures), proj(text.pooled(text(ids), ids, EOS)), LogitScale()(), ids)
    assert torch.isfinite(loss) and abs(loss.item() - want.item()) < 1e-5
    assert set(logs) >= {"loss", "acc_image_to_text", "acc_text_to_image", "logit_scale"}
    with pytest.raises(ValueError, match="3 captions for 4 images"):
        clip_loss(text, proj, image, LogitScale(), ids[:3], pictures, eos_token_id=EOS)


# ---------------------------------------------------------------- autoencoder


def test_vae_loss_terms_match_a_hand_computation():
    torch.manual_seed(0)
    vae = AutoencoderKL(VAE)
    x = images(3)
    loss, logs = vae_loss(vae, x, gen(7), kl_weight=0.5)
    with torch.no_grad():
        posterior = vae.encode(x)
        kl = posterior.kl().mean()
        rec = (vae.decode(posterior.sample(gen(7))) - x).abs()
    assert abs(logs["kl"] - kl.item()) < 1e-5 * max(1.0, kl.item())
    assert abs(logs["rec_l1"] - rec.mean().item()) < 1e-6
    assert abs(loss.item() - (rec.sum(dim=[1, 2, 3]).mean() + 0.5 * kl).item()) < 1e-3
    again, _ = vae_loss(vae, x, gen(7), kl_weight=0.5)
    assert again.item() == loss.item()
    mixed, _ = vae_loss(vae, x, gen(7), kl_weight=0.5, l1_weight=0.25, l2_weight=2.0)
    want = (0.25 * rec + 2.0 * rec.square()).sum(dim=[1, 2, 3]).mean() + 0.5 * kl
    assert abs(mixed.item() - want.item()) < 1e-3
    with pytest.raises(ValueError, match="kl_weight"):
        vae_loss(vae, x, gen(7), kl_weight=-1.0)
    with pytest.raises(ValueError, match="l2_weight"):
        vae_loss(vae, x, gen(7), l2_weight=-1.0)
    weighted, _ = vae_loss(vae, x, gen(7), kl_weight=0.5, l2_weight=1.0, object_weight=9.0)
    per_pixel = (rec + rec.square()) * (1 + 9.0 * object_pixels(x))
    assert abs(weighted.item() - (per_pixel.sum(dim=[1, 2, 3]).mean() + 0.5 * kl).item()) < 1e-2
    with pytest.raises(ValueError, match="object_weight"):
        vae_loss(vae, x, gen(7), object_weight=-1.0)


def test_object_pixels_cover_the_shape_and_its_edge_only():
    scene = Scene((Shape("star", "red", "small", "top left", (0.2, 0.2)),), "gray")
    picture = image_to_tensor(render(scene, 64))[None]
    mask = object_pixels(picture)[0, 0]
    background = picture[0, :, 0, 0]
    drawn = (picture[0] - background[:, None, None]).abs().amax(dim=0) > 0.1
    assert mask.shape == (64, 64) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert bool(mask[drawn].all())  # every drawn pixel
    ring = F.max_pool2d(drawn[None, None].float(), 5, stride=1, padding=2)[0, 0].bool()
    assert torch.equal(mask.bool(), ring)  # and two pixels round it, nothing else
    assert mask.sum() < 0.2 * 64 * 64  # a small star in one corner
    blank = torch.full((2, 3, 16, 16), 0.3)
    assert object_pixels(blank).sum() == 0


def test_encode_latents_and_scaling_factor():
    torch.manual_seed(0)
    vae = AutoencoderKL(VAE)
    x = images(4)
    raw = vae.encode(x).sample(gen(8)).detach()
    factor = scaling_factor_for(raw)
    assert abs(factor - 1 / raw.flatten().std().item()) < 1e-9
    scaled = encode_latents(vae, x, gen(8), factor)  # the same draw DiagonalGaussian.sample makes
    assert torch.allclose(scaled, raw * factor) and not scaled.requires_grad
    assert abs(scaled.std().item() - 1.0) < 1e-5
    with pytest.raises(ValueError, match="std"):
        scaling_factor_for(torch.ones(2, 4, 2, 2))


# ---------------------------------------------------------------- noise predictor


class StandInUNet(nn.Module):
    """Something with the UNet's call signature whose output is easy to write down."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.weight * x + t.float().view(-1, 1, 1, 1) / 1000 + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def noised_by_hand(schedule: NoiseSchedule, latents: torch.Tensor, g: torch.Generator):
    """unet_loss's draws in its documented order (timesteps, then noise), and what it makes of them:
    (timesteps, alpha-bar per sample as [B, 1, 1, 1], noisy latents, the target to predict)."""
    t = torch.randint(0, 1000, (len(latents),), generator=g)
    noise = torch.randn(latents.shape, generator=g)
    abar = schedule.alphas_cumprod()[t].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    target = noise if schedule.prediction_type == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * latents
    return t, abar, noisy, target


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_unet_loss_is_the_noising_formula(prediction_type):
    schedule = NoiseSchedule(prediction_type=prediction_type)
    model = StandInUNet()
    latents = torch.randn(3, 4, 4, 4, generator=gen(9))
    context = torch.randn(3, 5, 8, generator=gen(10))
    loss, logs = unet_loss(model, context, latents, schedule, gen(11))

    t, abar, noisy, target = noised_by_hand(schedule, latents, gen(11))
    want = ((model(noisy, t, context) - target) ** 2).mean()
    assert abs(loss.item() - want.item()) < 1e-6
    assert abs(logs["mean_timestep"] - t.float().mean().item()) < 1e-4

    again, _ = unet_loss(model, context, latents, schedule, gen(11))
    assert again.item() == loss.item()
    other, _ = unet_loss(model, context, latents, schedule, gen(12))
    assert other.item() != loss.item()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_unet_loss_min_snr_weighting(prediction_type):
    schedule = NoiseSchedule(prediction_type=prediction_type)
    model = StandInUNet()
    latents = torch.randn(3, 4, 4, 4, generator=gen(9))
    context = torch.randn(3, 5, 8, generator=gen(10))
    loss, _ = unet_loss(model, context, latents, schedule, gen(11), min_snr_gamma=0.5)

    t, abar, noisy, target = noised_by_hand(schedule, latents, gen(11))
    snr = abar.flatten() / (1 - abar.flatten())
    weight = torch.minimum(snr, torch.tensor(0.5)) / (snr if prediction_type == "epsilon" else snr + 1)
    want = (weight * ((model(noisy, t, context) - target) ** 2).mean(dim=[1, 2, 3])).mean()
    assert abs(loss.item() - want.item()) < 1e-6
    assert (weight != 1).any()  # the draws include steps the weighting changes
    plain, _ = unet_loss(model, context, latents, schedule, gen(11))
    assert abs(plain.item() - loss.item()) > 1e-4
    with pytest.raises(ValueError, match="min_snr_gamma"):
        unet_loss(model, context, latents, schedule, gen(11), min_snr_gamma=0.0)


def test_unet_loss_with_the_real_unet():
    torch.manual_seed(0)
    unet = UNet(UNET)
    loss, logs = unet_loss(unet, torch.randn(2, 8, 32), torch.randn(2, 4, 8, 8), NoiseSchedule(), gen(0))
    assert loss.ndim == 0 and torch.isfinite(loss) and 0 <= logs["mean_timestep"] < 1000
    with pytest.raises(ValueError, match="3 text contexts for 2 latents"):
        unet_loss(unet, torch.randn(3, 8, 32), torch.randn(2, 4, 8, 8), NoiseSchedule(), gen(0))


# ---------------------------------------------------------------- each loss can be trained


def descend(params, compute_loss, steps: int = 8, lr: float = 3e-3) -> tuple[float, float]:
    """Loss before and after a few Adam steps, on the same batch and the same random draws."""
    opt = torch.optim.Adam(params, lr=lr)
    first = None
    for _ in range(steps):
        loss = compute_loss()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return first, compute_loss().item()


def test_a_few_steps_reduce_every_loss():
    torch.manual_seed(0)
    vae = AutoencoderKL(VAE)
    x = images(4)
    before, after = descend(vae.parameters(), lambda: vae_loss(vae, x, gen(1))[0])
    assert after < 0.9 * before, (before, after)

    text, proj, image, scale = (
        CLIPTextEncoder(TEXT),
        TextProjection(TEXT.width, IMAGE.embed_dim),
        ImageEncoder(IMAGE),
        LogitScale(),
    )
    ids = caption_ids(8)
    params = [*text.parameters(), *proj.parameters(), *image.parameters(), *scale.parameters()]
    before, after = descend(params, lambda: clip_loss(text, proj, image, scale, ids, images(8), EOS)[0])
    assert after < 0.9 * before, (before, after)

    unet = UNet(UNET)
    latents, context = torch.randn(4, 4, 8, 8, generator=gen(2)), torch.randn(4, 8, 32, generator=gen(3))
    before, after = descend(unet.parameters(), lambda: unet_loss(unet, context, latents, NoiseSchedule(), gen(4))[0])
    assert after < 0.9 * before, (before, after)


# ---------------------------------------------------------------- split across processes


def halves(seed: int, batch: int) -> list[BatchRandom]:
    """Two processes' views of one step's randomness: each draws the global batch and keeps its rows."""
    return [BatchRandom(gen(seed), offset, batch // 2, batch, torch.device("cpu")) for offset in (0, batch // 2)]


def test_per_sample_draws_split_the_batch_exactly():
    """2 processes x B/2 draw what 1 process x B draws: the halves' losses average to the whole's."""
    model = StandInUNet()
    latents, context = torch.randn(4, 4, 4, 4, generator=gen(1)), torch.randn(4, 5, 8, generator=gen(2))
    whole, _ = unet_loss(model, context, latents, NoiseSchedule(), gen(3))
    parts = [
        unet_loss(model, context[r.offset : r.offset + 2], latents[r.offset : r.offset + 2], NoiseSchedule(), r)[0]
        for r in halves(3, 4)
    ]
    assert abs(whole.item() - (parts[0] + parts[1]).item() / 2) < 1e-6

    captions = [f"c{i}" for i in range(6)]
    assert drop_captions(captions, 0.5, gen(4)) == [
        c for r in halves(4, 6) for c in drop_captions(captions[r.offset : r.offset + 3], 0.5, r)
    ]

    torch.manual_seed(0)
    vae = AutoencoderKL(VAE)
    x = images(4)
    split = torch.cat([encode_latents(vae, x[r.offset : r.offset + 2], r, 0.5) for r in halves(5, 4)])
    assert torch.allclose(split, encode_latents(vae, x, gen(5), 0.5), atol=1e-6)

    with pytest.raises(ValueError, match="random source"):
        unet_loss(model, context, latents, NoiseSchedule(), halves(3, 4)[0])  # rows for 2, batch of 4


# ---------------------------------------------------------------- caption dropout


def test_drop_captions_rate_and_determinism():
    captions = [f"caption {i}" for i in range(4000)]
    dropped = drop_captions(captions, 0.1, gen(5))
    rate = sum(c == "" for c in dropped) / len(captions)
    assert abs(rate - 0.1) < 0.015
    assert all(c in ("", orig) for c, orig in zip(dropped, captions))
    assert drop_captions(captions, 0.1, gen(5)) == dropped
    assert drop_captions(captions, 0.1, gen(6)) != dropped
    assert drop_captions(captions, 0.0, gen(5)) == captions
    assert drop_captions(captions, 1.0, gen(5)) == [""] * len(captions)
    # One draw per caption whatever p is: the generator ends in the same state.
    a, b = gen(5), gen(5)
    drop_captions(captions[:10], 0.0, a), drop_captions(captions[:10], 0.7, b)
    assert torch.equal(a.get_state(), b.get_state())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        drop_captions(captions, 1.5, gen(5))


# ---------------------------------------------------------------- the default model's size


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_presets_build_and_fit_the_budget():
    """The default architecture: f=8 4-channel latents, the text width is the UNet's context, <= 60 MB in fp16."""
    assert TINY.text_encoder == TINY_TEXT and TINY.unet == TINY_UNET and TINY.vae == TINY_VAE
    assert TINY_VAE.downsample_factor == 8 and TINY_VAE.latent_channels == 4 and TINY.sample_size == 64 // 8
    assert TINY_UNET.context_dim == TINY_TEXT.width
    with torch.device("meta"):
        sizes = {
            "text": count(CLIPTextEncoder(TINY_TEXT)),
            "unet": count(UNet(TINY_UNET)),
            "vae": count(AutoencoderKL(TINY_VAE)),
        }
    fp16_mb = {name: 2 * n / 1e6 for name, n in sizes.items()}
    assert fp16_mb["unet"] <= 40 and sum(fp16_mb.values()) <= 60, fp16_mb

    torch.manual_seed(0)
    with torch.no_grad():
        vae = AutoencoderKL(TINY_VAE)
        latents = vae.encode(torch.zeros(1, 3, 64, 64)).mean
        assert latents.shape == (1, 4, 8, 8)
        assert vae.decode(latents).shape == (1, 3, 64, 64)
        text = CLIPTextEncoder(TINY_TEXT)
        context = text(torch.full((2, 77), 49407))
        unet = UNet(TINY_UNET)
        assert unet(torch.randn(2, 4, 8, 8), torch.tensor([1, 999]), context).shape == (2, 4, 8, 8)
        assert ImageEncoder(TINY_IMAGE_ENCODER)(torch.zeros(2, 3, 64, 64)).shape == (2, TINY_IMAGE_ENCODER.embed_dim)
