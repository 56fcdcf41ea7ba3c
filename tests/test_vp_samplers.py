"""DDIM, PLMS, DDPM and LCM against diffusers' DDIMScheduler, PNDMScheduler, DDPMScheduler and LCMScheduler.

Plans: timesteps equal, sigmas equal sqrt((1 - abar) / abar) at the reference's timesteps.
Runs: the same toy model from the same start noise (tests/sampler_harness.py); for the
stochastic ones our noise source yields exactly the tensors the reference draws from its
generator (randn_tensor on a CPU generator is torch.randn(shape, generator=g)), so whole
trajectories are compared there too. Tolerance: parity.TOL (1e-4) on the max abs difference,
measured relative to the result's scale max(1, max |reference|) because the toy model drives
some stochastic runs to values near 70. Both sides compute in float32, ours in the sigma
picture, so they agree to rounding (~1e-6 relative), far below what a wrong coefficient or
a misplaced step costs (> 1e-3).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler, PNDMScheduler
from parity import TOL
from sampler_harness import SHAPE, reference_loop, run_ours, run_reference, seeded_noise, start_noise, toy_model

from diffuse.samplers.schedule import NoiseSchedule, SamplerOptions, make_denoiser
from diffuse.samplers.vp_samplers import VP_ALGORITHMS

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
PREDICTIONS = ["epsilon", "v_prediction"]
SPACINGS = ["leading", "linspace", "trailing"]


def reference(name: str, prediction_type: str = "epsilon", **config):
    """A diffusers scheduler configured as SD ships it, with `config` overrides."""
    common = dict(SD, prediction_type=prediction_type, steps_offset=1, timestep_spacing="leading")
    common.update(config)
    if name == "ddim":
        return DDIMScheduler(**{"set_alpha_to_one": False, **common}, clip_sample=False)
    if name == "plms":
        return PNDMScheduler(**{"skip_prk_steps": True, "set_alpha_to_one": False, **common})
    if name == "ddpm":
        return DDPMScheduler(**common, clip_sample=False, variance_type="fixed_small")
    return LCMScheduler(**{"original_inference_steps": 50, "timestep_scaling": 10.0, **common}, clip_sample=False)


def options_for(scheduler) -> SamplerOptions:
    """Our options read from the reference's config, as a model folder's scheduler_config carries over."""
    config = scheduler.config
    fields = {
        k: config[k]
        for k in (
            "timestep_spacing",
            "steps_offset",
            "set_alpha_to_one",
            "original_inference_steps",
            "timestep_scaling",
            "skip_prk_steps",
        )
        if k in config
    }
    return SamplerOptions(**fields)


def sigma_at(scheduler, timesteps) -> torch.Tensor:
    abar = scheduler.alphas_cumprod[torch.as_tensor(timesteps).long()]
    return ((1 - abar) / abar) ** 0.5


def max_diff(ours: torch.Tensor, expected: torch.Tensor) -> float:
    assert ours.shape == expected.shape, (ours.shape, expected.shape)
    return ((ours - expected).abs().max() / expected.abs().max().clamp(min=1)).item()


def run_reference_seeded(scheduler, timesteps, x: torch.Tensor, seed: int) -> torch.Tensor:
    """The reference loop, with its fresh noise drawn from a seeded generator (PNDM's step takes none)."""
    generator = None if isinstance(scheduler, PNDMScheduler) else torch.Generator().manual_seed(seed)
    return reference_loop(scheduler, timesteps, x, generator)


# ---------------------------------------------------------------- plans


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", ["ddim", "plms", "ddpm"])
def test_plan_matches_reference(name, spacing, prediction_type):
    for set_alpha_to_one in [False, True] if name != "ddpm" else [False]:
        scheduler = reference(
            name,
            prediction_type,
            timestep_spacing=spacing,
            **({"set_alpha_to_one": set_alpha_to_one} if name != "ddpm" else {}),
        )
        schedule = NoiseSchedule(prediction_type=prediction_type)
        for steps in (1, 2, 7, 10, 25, 50):
            scheduler.set_timesteps(steps)
            plan = VP_ALGORITHMS[name].plan(schedule, steps, options_for(scheduler))
            assert torch.equal(plan.timesteps, scheduler.timesteps.float()), (steps, plan.timesteps)
            torch.testing.assert_close(plan.sigmas[:-1], sigma_at(scheduler, scheduler.timesteps), rtol=1e-6, atol=0)
            assert scheduler.init_noise_sigma == 1.0  # so ours starts at x_vp = noise
            assert plan.init_noise_scale == pytest.approx((1 + plan.sigmas[0].item() ** 2) ** 0.5, rel=1e-7)
            # Where the last update lands. DDPM: the clean latent. DDIM/PNDM: timestep t - 1000 // steps,
            # or past timestep 0 (to the clean latent with set_alpha_to_one, else to timestep 0's level).
            last_t = int(scheduler.timesteps[-1]) - 1000 // steps
            if name == "ddpm" or (last_t < 0 and set_alpha_to_one):
                expected_last = torch.zeros(1)
            else:
                expected_last = sigma_at(scheduler, [max(last_t, 0)])
            torch.testing.assert_close(plan.sigmas[-1:], expected_last, rtol=1e-6, atol=0)


@pytest.mark.parametrize("original", [50, 100])
def test_lcm_plan_matches_reference(original):
    scheduler = reference("lcm", original_inference_steps=original)
    for steps in (1, 2, 4, 8, 25):
        scheduler.set_timesteps(steps)
        plan = VP_ALGORITHMS["lcm"].plan(NoiseSchedule(), steps, options_for(scheduler))
        assert torch.equal(plan.timesteps, scheduler.timesteps.float()), (steps, plan.timesteps)
        torch.testing.assert_close(plan.sigmas[:-1], sigma_at(scheduler, scheduler.timesteps), rtol=1e-6, atol=0)
        assert plan.sigmas[-1] == 0
        assert scheduler.init_noise_sigma == 1.0
        assert plan.init_noise_scale == pytest.approx((1 + plan.sigmas[0].item() ** 2) ** 0.5, rel=1e-7)


def test_spacings_match_reference_for_every_step_count():
    """Every step count 1..1000 (the rounding of .5 timesteps and trailing's float stride included).

    diffusers' trailing spacing gives steps + 1 timesteps for some counts (float arange overshoot,
    e.g. 61, ending at timestep -1); ours keeps the first `steps`, which agree.
    """
    schedule = NoiseSchedule()
    for spacing in SPACINGS:
        scheduler = reference("ddim", timestep_spacing=spacing)
        for steps in range(1, 1001 if spacing != "leading" else 1000):  # leading 1000 would reach t=1000
            scheduler.set_timesteps(steps)
            ours = VP_ALGORITHMS["ddim"].plan(schedule, steps, SamplerOptions(timestep_spacing=spacing)).timesteps
            assert torch.equal(ours, scheduler.timesteps[:steps].float()), (spacing, steps)


# ---------------------------------------------------------------- deterministic runs


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name,prediction_type", [("ddim", "epsilon"), ("ddim", "v_prediction"), ("plms", "epsilon")])
def test_deterministic_run_matches_reference(name, prediction_type, spacing):
    """(PLMS with v-prediction: test_plms_v_prediction_extrapolates_noise_predictions.)"""
    noise = start_noise(1)
    schedule = NoiseSchedule(prediction_type=prediction_type)
    for steps in (1, 2, 7, 10, 25):
        scheduler = reference(name, prediction_type, timestep_spacing=spacing)
        expected = run_reference(scheduler, steps, noise)
        ours = run_ours(VP_ALGORITHMS[name], schedule, options_for(scheduler), steps, noise)
        assert max_diff(ours, expected) < TOL, (steps, max_diff(ours, expected))


@pytest.mark.parametrize("spacing", SPACINGS)
def test_plms_v_prediction_extrapolates_noise_predictions(spacing):
    """For v-prediction models diffusers' PNDM extrapolates the raw v outputs and turns the result
    into noise with the current latent; ours, like the original PLMS sampler (CompVis, A1111), turns
    each call's output into a noise prediction first and extrapolates those. So the reference here
    is PNDM run as an epsilon scheduler on the model's v output converted at each call."""
    noise = start_noise(1)
    schedule = NoiseSchedule(prediction_type="v_prediction")
    for steps in (1, 2, 7, 10, 25):
        scheduler = reference("plms", "epsilon", timestep_spacing=spacing)
        scheduler.set_timesteps(steps)
        x = noise
        for t in scheduler.timesteps:
            abar = scheduler.alphas_cumprod[t]
            eps = abar**0.5 * toy_model(x, t) + (1 - abar) ** 0.5 * x  # v -> noise at this call's own latent
            x = scheduler.step(eps, t, x).prev_sample
        ours = run_ours(VP_ALGORITHMS["plms"], schedule, options_for(scheduler), steps, noise)
        assert max_diff(ours, x) < TOL, (steps, max_diff(ours, x))
    # The raw-v extrapolation really is a different method: it lands elsewhere.
    assert max_diff(ours, run_reference(reference("plms", "v_prediction", timestep_spacing=spacing), 25, noise)) > 1e-2


# ---------------------------------------------------------------- stochastic runs


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize(
    "name,config,eta",
    [
        ("ddim", {}, 0.5),
        ("ddim", {}, 1.0),
        ("ddim", {"timestep_spacing": "trailing"}, 0.7),
        ("ddim", {"set_alpha_to_one": True}, 1.0),
        ("ddpm", {}, 0.0),
        ("ddpm", {"timestep_spacing": "linspace"}, 0.0),
        ("lcm", {}, 0.0),
        ("lcm", {"original_inference_steps": 100}, 0.0),
    ],
)
def test_stochastic_run_matches_reference_with_the_same_noise(name, config, eta, prediction_type):
    schedule = NoiseSchedule(prediction_type=prediction_type)
    for steps in (1, 4, 7):
        scheduler = reference(name, prediction_type, **config)
        if name == "ddim":
            scheduler.step = with_eta(scheduler.step, eta)
        scheduler.set_timesteps(steps)
        expected = run_reference_seeded(scheduler, scheduler.timesteps, start_noise(2), seed=3)
        options = replace(options_for(scheduler), eta=eta)
        ours = run_ours(VP_ALGORITHMS[name], schedule, options, steps, start_noise(2), fresh_noise=seeded_noise(3))
        assert max_diff(ours, expected) < TOL, (steps, max_diff(ours, expected))
        if steps > 1:  # and the fresh noise matters: another seed lands elsewhere
            other = run_ours(VP_ALGORITHMS[name], schedule, options, steps, start_noise(2), fresh_noise=seeded_noise(4))
            assert max_diff(ours, other) > 1e-2


def with_eta(step, eta):
    return lambda *args, **kwargs: step(*args, eta=eta, **kwargs)


def test_ddim_eta_zero_draws_no_noise_and_ddpm_is_ddim_eta_one():
    schedule = NoiseSchedule()

    def no_noise():
        raise AssertionError("deterministic DDIM drew noise")

    run_ours(VP_ALGORITHMS["ddim"], schedule, SamplerOptions(), 7, start_noise(5), fresh_noise=no_noise)
    ddpm = run_ours(VP_ALGORITHMS["ddpm"], schedule, SamplerOptions(), 7, start_noise(5), fresh_noise=seeded_noise(6))
    # DDIM with eta=1 stepping to the next planned timestep (leading spacing: one stride down) and
    # on to the clean latent (set_alpha_to_one) is DDPM.
    plan = VP_ALGORITHMS["ddpm"].plan(schedule, 7, SamplerOptions())
    x = VP_ALGORITHMS["ddim"].run(
        make_denoiser(toy_model, "epsilon"),
        start_noise(5) * plan.init_noise_scale,
        plan,
        seeded_noise(6),
        None,
        SamplerOptions(eta=1.0, set_alpha_to_one=True),
    )
    assert max_diff(ddpm, x) == 0


@pytest.mark.parametrize("name", ["ddpm", "lcm"])
def test_fresh_noise_has_the_scheduled_variance(name):
    """With a model that always predicts x0 = 0, the latent after each step is pure noise with
    variance sigmas[i+1]^2 (DDPM: the kept and fresh parts add up; LCM: it is all fresh)."""
    plan = VP_ALGORITHMS[name].plan(NoiseSchedule(), 5, SamplerOptions())
    generator = torch.Generator().manual_seed(7)
    shape = (1, 4, 128, 128)  # 65536 values: the sample std is within ~1% of the true one
    variances = []
    VP_ALGORITHMS[name].run(
        lambda x, sigma, t: torch.zeros_like(x),
        torch.randn(shape, generator=generator) * plan.sigmas[0],
        plan,
        lambda: torch.randn(shape, generator=generator),
        lambda i, x, d: variances.append(x.var().item()),
        SamplerOptions(),
    )
    expected = (plan.sigmas[1:-1] ** 2).tolist()
    assert variances[:-1] == pytest.approx(expected, rel=0.03)
    assert variances[-1] == pytest.approx(0, abs=1e-8)  # the last step returns the (zero) clean estimate


# ---------------------------------------------------------------- img2img and callbacks


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("name", ["ddim", "plms", "ddpm", "lcm"])
def test_img2img_matches_reference(name, spacing):
    """diffusers' img2img: keep the tail of scheduler.timesteps from t_start * order, add the
    start noise at its first timestep, loop. PNDM's list has the repeated timestep and its
    warm-up restarts at the first call of the tail; Plan.from_strength reproduces both."""
    clean = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8))
    noise = start_noise(9)
    schedule = NoiseSchedule()
    for steps, strength in ((10, 0.9), (10, 0.75), (10, 0.5), (7, 0.3), (7, 1.0), (4, 0.8)):
        if name == "lcm" and spacing == "trailing":
            continue  # LCM's timesteps come from its own grid; spacing does not apply
        scheduler = reference(name, timestep_spacing=spacing)
        scheduler.set_timesteps(steps)
        t_start = steps - min(int(steps * strength), steps)
        timesteps = scheduler.timesteps[t_start * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
        start = scheduler.add_noise(clean, noise, timesteps[:1])
        expected = run_reference_seeded(scheduler, timesteps, start, seed=10)

        plan = VP_ALGORITHMS[name].plan(schedule, steps, options_for(scheduler)).from_strength(strength)
        assert torch.equal(plan.timesteps, timesteps.float())
        x = VP_ALGORITHMS[name].run(
            make_denoiser(toy_model, "epsilon"),
            clean + plan.sigmas[0] * noise,
            plan,
            seeded_noise(10),
            None,
            options_for(scheduler),
        )
        ours = x / (1 + plan.sigmas[-1] ** 2) ** 0.5
        assert max_diff(ours, expected) < TOL, (steps, strength, max_diff(ours, expected))


@pytest.mark.parametrize("name", ["ddim", "plms"])
def test_callback_replacement_matches_reference_inpainting(name):
    """An inpainting-style callback: after step i the known half is replaced by the clean latent
    noised to the next timestep. Trailing spacing, where the reference reads each landed latent
    at the next timestep, checks that the callback sees the latent at plan.sigmas[i + 1]."""
    clean = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))
    fixed_noise = start_noise(12)
    known = torch.zeros(SHAPE)
    known[..., :4] = 1
    steps = 7
    scheduler = reference(name, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    x = start_noise(13)
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(toy_model(x, t), t, x).prev_sample
        if i + 1 < len(scheduler.timesteps):
            noised = scheduler.add_noise(clean, fixed_noise, scheduler.timesteps[i + 1 : i + 2])
            x = known * noised + (1 - known) * x
    plan = VP_ALGORITHMS[name].plan(NoiseSchedule(), steps, options_for(scheduler))
    calls = []

    def replace_known(i, x, denoised):
        calls.append(i)
        if i + 1 < plan.steps:
            return known * (clean + plan.sigmas[i + 1] * fixed_noise) + (1 - known) * x
        return None

    ours = run_ours(
        VP_ALGORITHMS[name], NoiseSchedule(), options_for(scheduler), steps, start_noise(13), callback=replace_known
    )
    assert calls == list(range(plan.steps))
    assert max_diff(ours, x) < TOL


# ---------------------------------------------------------------- errors


def test_unsupported_settings_are_rejected():
    schedule = NoiseSchedule()
    with pytest.raises(ValueError, match="skip_prk_steps"):
        VP_ALGORITHMS["plms"].plan(schedule, 10, SamplerOptions(skip_prk_steps=False))
    with pytest.raises(ValueError, match="timestep_spacing"):
        VP_ALGORITHMS["ddim"].plan(schedule, 10, SamplerOptions(timestep_spacing="middle"))
    with pytest.raises(ValueError, match="steps"):
        VP_ALGORITHMS["ddpm"].plan(schedule, 0, SamplerOptions())
    with pytest.raises(ValueError, match="original_inference_steps"):
        VP_ALGORITHMS["lcm"].plan(schedule, 60, SamplerOptions(original_inference_steps=50))
    plan = VP_ALGORITHMS["ddim"].plan(schedule, 4, SamplerOptions())
    denoise = make_denoiser(toy_model, "epsilon")
    with pytest.raises(ValueError, match="eta"):
        VP_ALGORITHMS["ddim"].run(denoise, start_noise(), plan, None, None, SamplerOptions(eta=1.5))
    with pytest.raises(ValueError, match="noise source"):
        VP_ALGORITHMS["ddim"].run(denoise, start_noise(), plan, None, None, SamplerOptions(eta=0.5))
