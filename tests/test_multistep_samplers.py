"""DPM++ 2M, DPM++ 2M SDE and UniPC against diffusers' multistep schedulers.

Plans must match exactly (timesteps and float32 sigmas). Runs share the harness's toy model
and start noise, so any difference is a difference in the update rules. The toy trajectories
reach |x| of about 90 (epsilon) or 3 (v-prediction), where float32 spacing alone is up to
7.6e-6, so runs are compared relative to the latents' scale: max|ours - ref| / max(1, max|ref|)
<= 1e-5 (measured worst over the configurations below: 1.5e-6).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler
from sampler_harness import SHAPE, reference_img2img, run_ours, run_reference, seeded_noise, start_noise, toy_model

from diffuse.samplers.multistep import MULTISTEP_ALGORITHMS
from diffuse.samplers.schedule import NoiseSchedule, SamplerOptions, make_denoiser, spaced_timesteps

SCALED_TOL = 1e-5

SD_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    clip_sample=False,
    set_alpha_to_one=False,
    timestep_spacing="leading",
)
REFERENCES = {
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": (UniPCMultistepScheduler, {"solver_type": "bh2", "predict_x0": True}),
}


def reference(key: str, options: SamplerOptions, prediction_type: str = "epsilon"):
    cls, extra = REFERENCES[key]
    return cls.from_config(
        {
            **SD_CONFIG,
            **extra,
            "prediction_type": prediction_type,
            "timestep_spacing": options.timestep_spacing,
            "steps_offset": options.steps_offset,
            "use_karras_sigmas": options.sigma_schedule == "karras",
            "use_exponential_sigmas": options.sigma_schedule == "exponential",
            "final_sigmas_type": options.final_sigmas_type,
            "solver_order": options.solver_order,
            "lower_order_final": options.lower_order_final,
        }
    )


def scaled_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape
    return (ours - ref).abs().max().item() / max(1.0, ref.abs().max().item())


# ---------------------------------------------------------------- plans

# Step counts at which numpy's arange gives diffusers' trailing spacing one point too many.
TRAILING_EXTRA_POINT = {61}


@pytest.mark.parametrize("key", ["dpmpp_2m", "unipc"])
@pytest.mark.parametrize("sigma_schedule", ["default", "karras", "exponential"])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_plan_matches_reference(key, sigma_schedule, final):
    schedule = NoiseSchedule()
    for spacing in ("leading", "linspace", "trailing"):
        options = SamplerOptions(timestep_spacing=spacing, sigma_schedule=sigma_schedule, final_sigmas_type=final)
        ref = reference(key, options)
        # 1..60 covers the .5 rounding cases of every grid; 100 and 150 the dense karras ends.
        for steps in list(range(1, 61)) + [100, 150]:
            plan = MULTISTEP_ALGORITHMS[key].plan(schedule, steps, options)
            ref.set_timesteps(steps)
            assert torch.equal(plan.timesteps.to(torch.int64), ref.timesteps), (spacing, steps)
            assert plan.timesteps.dtype == torch.float32
            assert torch.equal(plan.sigmas, ref.sigmas), (spacing, steps)
            # diffusers starts from noise * 1 in the variance-preserving scale.
            assert plan.init_noise_scale == pytest.approx(math.sqrt(1 + ref.sigmas[0].item() ** 2), rel=1e-7)
            assert plan.planned_steps == steps


def test_plan_v_prediction_schedule_and_steps_offset():
    """SD2's v-prediction uses the same schedule; steps_offset only moves leading timesteps."""
    for key, offset, steps in itertools.product(["dpmpp_2m", "unipc"], [0, 1], [1, 7, 25, 50]):
        options = SamplerOptions(steps_offset=offset)
        ref = reference(key, options, "v_prediction")
        ref.set_timesteps(steps)
        plan = MULTISTEP_ALGORITHMS[key].plan(NoiseSchedule(prediction_type="v_prediction"), steps, options)
        assert torch.equal(plan.timesteps.to(torch.int64), ref.timesteps)
        assert torch.equal(plan.sigmas, ref.sigmas)


def test_trailing_spacing_has_exactly_the_steps_asked_for():
    options = SamplerOptions(timestep_spacing="trailing")
    ref = reference("dpmpp_2m", options)
    for steps in TRAILING_EXTRA_POINT:
        ref.set_timesteps(steps)
        assert len(ref.timesteps) == steps + 1 and ref.timesteps[-1] == -1  # the reference's extra point
        timesteps = spaced_timesteps(NoiseSchedule(), steps, options, extra_point=True)
        assert torch.equal(timesteps, ref.timesteps[:steps])


@pytest.mark.parametrize(
    "bad",
    [dict(timestep_spacing="middle"), dict(solver_order=3), dict(final_sigmas_type="one"), dict(sigma_schedule="beta")],
)
def test_unsupported_options_are_rejected(bad):
    for key in MULTISTEP_ALGORITHMS:
        with pytest.raises(ValueError, match=next(iter(bad))):
            MULTISTEP_ALGORITHMS[key].plan(NoiseSchedule(), 10, SamplerOptions(**bad))


def test_bad_step_count_and_missing_noise_are_rejected():
    with pytest.raises(ValueError, match="steps"):
        MULTISTEP_ALGORITHMS["unipc"].plan(NoiseSchedule(), 0, SamplerOptions())
    with pytest.raises(ValueError, match="steps_offset=600"):
        MULTISTEP_ALGORITHMS["dpmpp_2m"].plan(NoiseSchedule(), 1, SamplerOptions(steps_offset=600))
    with pytest.raises(ValueError, match="noise source"):
        run_ours(MULTISTEP_ALGORITHMS["dpmpp_2m_sde"], NoiseSchedule(), SamplerOptions(), 5, start_noise())


# ---------------------------------------------------------------- deterministic runs

RUN_CASES = [
    # (prediction_type, options, step counts)
    ("epsilon", SamplerOptions(), [1, 2, 3, 7, 20]),
    ("v_prediction", SamplerOptions(), [1, 2, 7, 20]),
    ("epsilon", SamplerOptions(timestep_spacing="trailing", sigma_schedule="karras"), [2, 10, 25]),
    ("v_prediction", SamplerOptions(timestep_spacing="linspace", sigma_schedule="exponential"), [3, 10]),
    # sigma_min: the last step is first order only below 15 steps (lower_order_final)
    ("epsilon", SamplerOptions(final_sigmas_type="sigma_min"), [2, 10, 14, 15, 20]),
    ("v_prediction", SamplerOptions(final_sigmas_type="sigma_min", sigma_schedule="karras"), [1, 3, 16]),
    ("epsilon", SamplerOptions(final_sigmas_type="sigma_min", lower_order_final=False), [2, 5, 20]),
    ("epsilon", SamplerOptions(solver_order=1), [1, 5, 20]),
]


@pytest.mark.parametrize("key", ["dpmpp_2m", "unipc"])
@pytest.mark.parametrize("prediction_type,options,step_counts", RUN_CASES)
def test_run_matches_reference(key, prediction_type, options, step_counts):
    schedule = NoiseSchedule(prediction_type=prediction_type)
    for steps in step_counts:
        noise = start_noise(steps)
        ref = run_reference(reference(key, options, prediction_type), steps, noise)
        ours = run_ours(MULTISTEP_ALGORITHMS[key], schedule, options, steps, noise)
        assert scaled_err(ours, ref) <= SCALED_TOL, steps


@pytest.mark.parametrize("key", ["dpmpp_2m", "unipc"])
def test_callback_sees_every_step_and_can_replace_latents(key):
    """Inpainting-style edits between steps (here: zero one half) act as in the reference loop,
    including UniPC's corrector, which rebuilds a step from where it started."""
    steps, options = 8, SamplerOptions()
    mask = torch.ones(SHAPE)
    mask[..., :4] = 0
    noise = start_noise(3)

    scheduler = reference(key, options)
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(toy_model(scheduler.scale_model_input(x, t), t), t, x).prev_sample * mask

    seen = []

    def callback(i, x, denoised):
        seen.append(i)
        assert x.shape == denoised.shape == SHAPE
        return x * mask  # uniform rescaling between pictures commutes with masking

    ours = run_ours(MULTISTEP_ALGORITHMS[key], NoiseSchedule(), options, steps, noise, callback=callback)
    assert seen == list(range(steps))
    assert scaled_err(ours, x) <= SCALED_TOL
    plain = run_ours(MULTISTEP_ALGORITHMS[key], NoiseSchedule(), options, steps, noise, callback=lambda *a: None)
    assert torch.equal(plain, run_ours(MULTISTEP_ALGORITHMS[key], NoiseSchedule(), options, steps, noise))


# ---------------------------------------------------------------- img2img


@pytest.mark.parametrize("key", ["dpmpp_2m", "unipc"])
@pytest.mark.parametrize(
    "options",
    [
        SamplerOptions(),
        SamplerOptions(final_sigmas_type="sigma_min"),
        SamplerOptions(sigma_schedule="karras", timestep_spacing="trailing"),
    ],
)
def test_img2img_matches_reference(key, options):
    """With sigma_min, 20 steps at strength 0.5 keep 10: the reference still takes a second-order
    last step, because it counts the 20 planned steps (Plan.planned_steps)."""
    schedule = NoiseSchedule()
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    for steps, strength in [(10, 0.3), (20, 0.5), (25, 0.75), (7, 1.0)]:
        noise = start_noise(steps)
        ref = reference_img2img(reference(key, options), steps, strength, x0, noise)
        plan = MULTISTEP_ALGORITHMS[key].plan(schedule, steps, options).from_strength(strength)
        assert plan.steps == int(steps * strength)
        x = x0 + plan.sigmas[0] * noise
        x = MULTISTEP_ALGORITHMS[key].run(make_denoiser(toy_model, "epsilon"), x, plan, None, None, options)
        ours = x / (1 + plan.sigmas[-1] ** 2) ** 0.5
        assert scaled_err(ours, ref) <= SCALED_TOL, (steps, strength)


# ---------------------------------------------------------------- DPM++ 2M SDE


@pytest.mark.parametrize(
    "prediction_type,options,step_counts",
    [
        ("epsilon", SamplerOptions(), [1, 2, 7, 20]),
        ("v_prediction", SamplerOptions(sigma_schedule="karras"), [3, 12]),
        ("epsilon", SamplerOptions(final_sigmas_type="sigma_min"), [5, 16]),
    ],
)
def test_sde_run_with_the_same_noise_matches_reference(prediction_type, options, step_counts):
    schedule = NoiseSchedule(prediction_type=prediction_type)
    for steps in step_counts:
        noise = start_noise(steps)
        ref = run_reference(reference("dpmpp_2m_sde", options, prediction_type), steps, noise, seed=100 + steps)
        ours = run_ours(
            MULTISTEP_ALGORITHMS["dpmpp_2m_sde"], schedule, options, steps, noise, fresh_noise=seeded_noise(100 + steps)
        )
        assert scaled_err(ours, ref) <= SCALED_TOL, steps


def test_sde_reproduces_per_seed_and_reduces_to_2m_without_renewal():
    sde, schedule, noise = MULTISTEP_ALGORITHMS["dpmpp_2m_sde"], NoiseSchedule(), start_noise()
    first = run_ours(sde, schedule, SamplerOptions(), 10, noise, fresh_noise=seeded_noise(1))
    assert torch.equal(first, run_ours(sde, schedule, SamplerOptions(), 10, noise, fresh_noise=seeded_noise(1)))
    assert (
        first - run_ours(sde, schedule, SamplerOptions(), 10, noise, fresh_noise=seeded_noise(2))
    ).abs().max() > 1e-2
    ode = run_ours(MULTISTEP_ALGORITHMS["dpmpp_2m"], schedule, SamplerOptions(), 10, noise)
    no_renewal = run_ours(sde, schedule, SamplerOptions(eta_ancestral=0.0), 10, noise, fresh_noise=seeded_noise(1))
    assert scaled_err(no_renewal, ode) <= SCALED_TOL


def test_sde_fresh_noise_keeps_the_marginal_noise_level():
    """With a denoiser that predicts x0 = 0, each step keeps (sigma_next/sigma)^2 of x and adds
    sigma_next * sqrt(1 - (sigma_next/sigma)^2) fresh noise: x stays N(0, sigma_next^2) and its
    correlation with the start noise falls to sigma_next / sigma_0. 2e5 values give these
    statistics to about 0.3% (one standard error), so 2% is a loose check."""
    sde, n = MULTISTEP_ALGORITHMS["dpmpp_2m_sde"], 200_000
    plan = sde.plan(NoiseSchedule(), 6, SamplerOptions())
    generator = torch.Generator().manual_seed(5)
    start = torch.randn(n, generator=generator)
    stds, correlations = [], []

    def record(i, x, denoised):
        stds.append(x.std().item())
        correlations.append((x * start).mean().item() / max(stds[-1], 1e-30))

    no_signal = lambda x, sigma, t: torch.zeros_like(x)  # noqa: E731
    sde.run(
        no_signal, start * plan.sigmas[0], plan, lambda: torch.randn(n, generator=generator), record, SamplerOptions()
    )
    for i, (std, corr) in enumerate(zip(stds[:-1], correlations)):
        sigma_next = plan.sigmas[i + 1].item()
        assert std == pytest.approx(sigma_next, rel=0.02), i
        assert corr == pytest.approx(sigma_next / plan.sigmas[0].item(), abs=0.02), i
    assert stds[-1] == 0.0  # the last step lands on the (zero) x0 prediction

    # s_noise = 0: no fresh noise, only the shrinking of the old slice by (sigma_next/sigma)^2 a
    # step, which telescopes to sigma_last^2 / sigma_0 of the start noise.
    options = SamplerOptions(s_noise=0.0, final_sigmas_type="sigma_min")
    plan = sde.plan(NoiseSchedule(), 6, options)
    quiet = sde.run(no_signal, start[:10] * plan.sigmas[0], plan, lambda: torch.randn(10), None, options)
    expected = start[:10] * plan.sigmas[-1] ** 2 / plan.sigmas[0]
    assert torch.allclose(quiet, expected, rtol=1e-5, atol=0)


def test_unipc_second_order_step_to_zero_lands_on_x0():
    """Without lower_order_final the reference takes a second-order UniP step to sigma 0, which
    divides by an infinite step length (its result is inf). The solution at sigma 0 is the x0
    prediction, as with a first-order last step, so both settings give the same run here."""
    schedule, noise = NoiseSchedule(), start_noise()
    ours = run_ours(MULTISTEP_ALGORITHMS["unipc"], schedule, SamplerOptions(lower_order_final=False), 10, noise)
    assert torch.isfinite(ours).all()
    assert torch.equal(ours, run_ours(MULTISTEP_ALGORITHMS["unipc"], schedule, SamplerOptions(), 10, noise))
