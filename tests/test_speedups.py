"""The optional speed-ups: off changes nothing; on, they skip exactly the work they claim to."""

import pytest
import torch

import diffuse
from diffuse.metadata import parse_infotext
from diffuse.models.unet import BasicTransformerBlock
from diffuse.speedups import DeepCache, DrivenUNet, Speedups, TokenMergedBlock, TokenMerging

PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def pipe(reference_folders):
    return diffuse.load_pipeline(reference_folders["sd1"], dtype="float32")


def count_unet_batches(pipe, monkeypatch) -> list[int]:
    """Record the batch size of every UNet call (its first convolution runs on every call,
    also on those the deep-feature cache drives block by block)."""
    sizes = []
    conv_in = type(pipe.unet.input_blocks[0][0])
    original = conv_in.forward

    def spy(self, latents, *args, **kwargs):
        if self is pipe.unet.input_blocks[0][0]:
            sizes.append(latents.shape[0])
        return original(self, latents, *args, **kwargs)

    monkeypatch.setattr(conv_in, "forward", spy)
    return sizes


def test_defaults_change_nothing(pipe):
    plain = pipe.txt2img(PROMPT, width=32, height=32, steps=4, seed=3)
    explicit = pipe.txt2img(PROMPT, width=32, height=32, steps=4, seed=3, speedups=Speedups())
    assert plain.images[0].tobytes() == explicit.images[0].tobytes()
    for label in ("Guidance cutoff", "Deep cache", "Token merging ratio"):
        assert label not in plain.infotexts[0]


def test_guidance_cutoff_runs_the_late_steps_unguided(pipe, monkeypatch):
    sizes = count_unet_batches(pipe, monkeypatch)
    result = pipe.txt2img(
        PROMPT, width=32, height=32, steps=6, seed=3, sampler="Euler", speedups=Speedups(guidance_cutoff=0.5)
    )
    assert sizes == [2, 2, 2, 1, 1, 1]
    assert parse_infotext(result.infotexts[0])["Guidance cutoff"] == "0.5"
    sizes.clear()
    pipe.txt2img(PROMPT, width=32, height=32, steps=4, seed=3, sampler="Euler", speedups=Speedups(guidance_cutoff=0))
    assert sizes == [1, 1, 1, 1]


def test_a_cached_call_on_the_same_input_gives_the_full_answer(pipe):
    """The cached features are exactly what the deep blocks gave: same input, same output."""
    unet = pipe.unet
    torch.manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, unet.cfg.context_dim)
    t = torch.tensor([400, 400])
    deep_calls = []
    hook = unet.middle_block[0].register_forward_hook(lambda *_: deep_calls.append(1))
    try:
        with torch.no_grad():
            full = unet(x, t, context)
            cache = DeepCache(unet, interval=3, depth=2)
            outputs = [cache(x, t, context) for _ in range(4)]
    finally:
        hook.remove()
    assert len(deep_calls) == 1 + 2  # the uncached call, then calls 0 and 3 of the cache
    for out in outputs:
        torch.testing.assert_close(out, full, rtol=0, atol=0)


def test_the_cache_refills_when_the_batch_changes(pipe):
    unet = pipe.unet
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, unet.cfg.context_dim)
    cache = DeepCache(unet, interval=10, depth=1)
    with torch.no_grad():
        cache(x, torch.tensor([400]), context)
        assert cache.features.shape[0] == 2
        cache(x[:1], torch.tensor([300]), context[:1])  # guidance cut off: batch 1
    assert cache.features.shape[0] == 1


def test_deep_cache_in_a_generation(pipe, monkeypatch):
    sizes = count_unet_batches(pipe, monkeypatch)
    plain = pipe.txt2img(PROMPT, width=32, height=32, steps=6, seed=3, sampler="Euler")
    cached = pipe.txt2img(
        PROMPT, width=32, height=32, steps=6, seed=3, sampler="Euler", speedups=Speedups(deep_cache_interval=3)
    )
    assert len(sizes) == 12
    assert plain.images[0].tobytes() != cached.images[0].tobytes()
    assert parse_infotext(cached.infotexts[0])["Deep cache"] == "3/1"


def test_token_merging_averages_similar_neighbours_and_gives_every_position_an_answer():
    torch.manual_seed(0)
    x = torch.randn(2, 8 * 10, 6)  # an 8x10 map, two images
    merge, unmerge = TokenMerging(0.5, (8, 10)).plan(x, 8, 10)
    merged = merge(x)
    assert merged.shape == (2, 40, 6)  # half the positions are gone
    restored = unmerge(merged)
    assert restored.shape == x.shape
    for image in range(2):
        # Every position's answer is one of the merged tokens; the untouched ones are exact,
        # and each merged token is the mean of the positions that share its answer.
        groups = {}
        for position in range(80):
            match = (merged[image] - restored[image, position]).abs().amax(dim=1) < 1e-6
            assert match.sum() == 1
            groups.setdefault(int(match.nonzero()), []).append(position)
        assert len(groups) == 40 and sum(map(len, groups.values())) == 80
        for token, positions in groups.items():
            torch.testing.assert_close(merged[image, token], x[image, positions].mean(dim=0))
    # A map of 2x2 blocks of equal tokens merges without loss.
    blocks = torch.randn(1, 4, 5, 6).repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(1, 80, 6)
    merge, unmerge = TokenMerging(0.75, (8, 10)).plan(blocks, 8, 10)
    assert merge(blocks).shape == (1, 20, 6)
    torch.testing.assert_close(unmerge(merge(blocks)), blocks)


def test_token_merging_covers_only_its_map_size():
    merging = TokenMerging(0.5, (8, 8))
    x = torch.randn(1, 64, 4)
    assert merging.plan(x, 4, 16) is None  # as many positions, another shape
    assert merging.plan(x[:, :16], 4, 4) is None
    assert TokenMerging(0.01, (8, 8)).plan(x, 8, 8) is None  # rounds to no position: nothing to do


def test_token_merging_in_a_generation(pipe, monkeypatch):
    lengths = []
    attention = type(pipe.unet.input_blocks[1][1].transformer_blocks[0].attn1)
    original = attention.forward

    def spy(self, x, context=None):
        if context is None:
            lengths.append(x.shape[1])
        return original(self, x, context)

    monkeypatch.setattr(attention, "forward", spy)
    plain = pipe.txt2img(PROMPT, width=32, height=32, steps=3, seed=3, sampler="Euler")
    full = set(lengths)
    lengths.clear()
    merged = [
        pipe.txt2img(
            PROMPT, width=32, height=32, steps=3, seed=3, sampler="Euler", speedups=Speedups(token_merging=0.5)
        )
        for _ in range(2)
    ]
    latent_side = 32 // pipe.config.vae.downsample_factor
    assert max(full) == latent_side**2  # the latent map itself
    half = latent_side**2 // 2
    assert max(lengths) == half  # the full-resolution self-attention on half the positions
    assert set(lengths) - {half} == full - {latent_side**2}  # the smaller maps are left alone
    assert merged[0].images[0].tobytes() == merged[1].images[0].tobytes()  # the seed still fixes the image
    assert merged[0].images[0].tobytes() != plain.images[0].tobytes()
    assert parse_infotext(merged[0].infotexts[0])["Token merging ratio"] == "0.5"


def test_driven_unet_without_speedups_is_the_unet(pipe):
    unet = pipe.unet
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, unet.cfg.context_dim)
    with torch.no_grad():
        assert torch.equal(
            DrivenUNet(unet, Speedups(), (8, 8))(x, torch.tensor([400]), context), unet(x, torch.tensor([400]), context)
        )


def test_token_merging_wraps_the_blocks_for_one_call_only(pipe, monkeypatch):
    """The merged self-attention is swapped in while a call runs and the UNet's own blocks are
    back afterwards, also when the call fails; the merging draws only on the latent-sized maps."""
    unet = pipe.unet
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    driven = DrivenUNet(unet, Speedups(token_merging=0.5), (8, 8))
    seen = []
    original = TokenMergedBlock.forward

    def spy(self, x, context):
        seen.append(x.shape[1])
        return original(self, x, context)

    monkeypatch.setattr(TokenMergedBlock, "forward", spy)
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, unet.cfg.context_dim)
    state = driven.state()
    with torch.no_grad():
        merged = driven(x, torch.tensor([400]), context)
        assert len(seen) == len(blocks) and 64 in seen
        assert [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)] == blocks
        assert not any(isinstance(m, TokenMergedBlock) for m in unet.modules())
        assert not torch.equal(merged, unet(x, torch.tensor([400]), context))
        driven.restore(state)
        assert torch.equal(driven(x, torch.tensor([400]), context), merged)  # the same corners again
        with pytest.raises(RuntimeError):
            driven(x, torch.tensor([400]), context[:, :, :3])  # a context of the wrong width
    assert not any(isinstance(m, TokenMergedBlock) for m in unet.modules())


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(token_merging=0.8), "token_merging 0.8"),
        (dict(token_merging=-0.1), "token_merging -0.1"),
        (dict(guidance_cutoff=1.5), "guidance_cutoff 1.5"),
        (dict(guidance_cutoff=-0.1), "guidance_cutoff -0.1"),
        (dict(deep_cache_interval=0), "deep_cache_interval 0"),
        (dict(deep_cache_depth=0), "deep_cache_depth 0"),
    ],
)
def test_bad_settings_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        Speedups(**bad)


def test_cli_refuses_a_bad_cutoff_before_loading(capsys, tmp_path):
    from diffuse.cli import main

    code = main(["txt2img", "x", "--model", str(tmp_path / "absent"), "--guidance-cutoff", "2"])
    assert code == 2
    assert "guidance_cutoff 2.0" in capsys.readouterr().err
    assert main(["txt2img", "x", "--model", str(tmp_path / "absent"), "--token-merging", "0.9"]) == 2
    assert "token_merging 0.9" in capsys.readouterr().err


def test_eval_reports_the_speedups_it_ran_with():
    import dataclasses

    from diffuse.shapes.evaluate import EvalSettings, _speedups_text

    settings = dataclasses.asdict(EvalSettings(speedups=Speedups(deep_cache_interval=3)))
    assert _speedups_text(settings["speedups"]) == ", speed-ups: deep cache 3/1"
    assert _speedups_text(dataclasses.asdict(EvalSettings())["speedups"]) == ""
    assert _speedups_text(None) == ""  # a report written before speed-ups existed
