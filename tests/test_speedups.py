"""The optional speed-ups: off changes nothing; on, they skip exactly the work they claim to."""

import pytest
import torch

import diffuse
from diffuse.metadata import parse_infotext
from diffuse.speedups import DeepCache, Speedups

PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def pipe(reference_folders):
    return diffuse.load_pipeline(reference_folders["sd1"], dtype="float32")


def count_unet_batches(pipe, monkeypatch) -> list[int]:
    """Record the batch size of every UNet call."""
    sizes = []
    original = type(pipe.unet).forward

    def spy(self, latents, *args, **kwargs):
        sizes.append(latents.shape[0])
        return original(self, latents, *args, **kwargs)

    monkeypatch.setattr(type(pipe.unet), "forward", spy)
    return sizes


def test_defaults_change_nothing(pipe):
    plain = pipe.txt2img(PROMPT, width=32, height=32, steps=4, seed=3)
    explicit = pipe.txt2img(PROMPT, width=32, height=32, steps=4, seed=3, speedups=Speedups())
    assert plain.images[0].tobytes() == explicit.images[0].tobytes()
    assert "Guidance cutoff" not in plain.infotexts[0] and "Deep cache" not in plain.infotexts[0]


def test_guidance_cutoff_runs_the_late_steps_unguided(pipe, monkeypatch):
    sizes = count_unet_batches(pipe, monkeypatch)
    result = pipe.txt2img(PROMPT, width=32, height=32, steps=6, seed=3, sampler="Euler",
                          speedups=Speedups(guidance_cutoff=0.5))
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
            cache = DeepCache(interval=3, depth=2)
            outputs = [unet(x, t, context, cache=cache) for _ in range(4)]
    finally:
        hook.remove()
    assert len(deep_calls) == 1 + 2  # the uncached call, then calls 0 and 3 of the cache
    for out in outputs:
        torch.testing.assert_close(out, full, rtol=0, atol=0)


def test_the_cache_refills_when_the_batch_changes(pipe):
    unet = pipe.unet
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, unet.cfg.context_dim)
    cache = DeepCache(interval=10, depth=1)
    with torch.no_grad():
        unet(x, torch.tensor([400]), context, cache=cache)
        assert cache.features.shape[0] == 2
        unet(x[:1], torch.tensor([300]), context[:1], cache=cache)  # guidance cut off: batch 1
    assert cache.features.shape[0] == 1


def test_deep_cache_in_a_generation(pipe, monkeypatch):
    sizes = count_unet_batches(pipe, monkeypatch)
    plain = pipe.txt2img(PROMPT, width=32, height=32, steps=6, seed=3, sampler="Euler")
    cached = pipe.txt2img(PROMPT, width=32, height=32, steps=6, seed=3, sampler="Euler",
                          speedups=Speedups(deep_cache_interval=3))
    assert len(sizes) == 12
    assert plain.images[0].tobytes() != cached.images[0].tobytes()
    assert parse_infotext(cached.infotexts[0])["Deep cache"] == "3/1"


@pytest.mark.parametrize("bad, message", [
    (dict(guidance_cutoff=1.5), "guidance_cutoff 1.5"),
    (dict(guidance_cutoff=-0.1), "guidance_cutoff -0.1"),
    (dict(deep_cache_interval=0), "deep_cache_interval 0"),
    (dict(deep_cache_depth=0), "deep_cache_depth 0"),
])
def test_bad_settings_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        Speedups(**bad)


def test_cli_refuses_a_bad_cutoff_before_loading(capsys, tmp_path):
    from diffuse.cli import main

    code = main(["txt2img", "x", "--model", str(tmp_path / "absent"), "--guidance-cutoff", "2"])
    assert code == 2
    assert "guidance_cutoff 2.0" in capsys.readouterr().err


def test_eval_reports_the_speedups_it_ran_with():
    import dataclasses

    from diffuse.evaluate import EvalSettings, _speedups_text

    settings = dataclasses.asdict(EvalSettings(speedups=Speedups(deep_cache_interval=3)))
    assert _speedups_text(settings["speedups"]) == ", speed-ups: deep cache 3/1"
    assert _speedups_text(dataclasses.asdict(EvalSettings())["speedups"]) == ""
    assert _speedups_text(None) == ""  # a report written before speed-ups existed
