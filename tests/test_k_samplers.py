"""The k-diffusion samplers against diffusers' Euler/Heun/LMS/KDPM2 schedulers, and their noise.

Deterministic samplers: same plan (timesteps, sigmas, starting noise scale) and same final latents
as the reference loop on the toy model of sampler_harness. Ancestral samplers: diffusers draws its
noise with torch.randn from a generator, so feeding ours from an identically seeded generator must
give the same trajectory. DPM++ SDE and DPM++ 2S a have no diffusers counterpart: they are checked
for reproducibility, for exactness on a constant clean image, for second-order convergence with
eta_ancestral = 0, and for the variance of the noise they add.
"""

from __future__ import annotations

import functools
import importlib
import types

import numpy as np
import pytest
import torch
from sampler_harness import reference_img2img, run_ours, run_reference, seeded_noise, start_noise, toy_model

from diffuse.samplers.k_samplers import K_ALGORITHMS
from diffuse.samplers.schedule import NoiseSchedule, Plan, SamplerOptions, make_denoiser

# Final latents: the toy model's latents reach ~10-200, and every step divides by sigma (down to
# 0.03), so float32 rounding differs by up to ~4e-6 of the result's size between the two loops.
REL_TOL = 2e-5
# Timesteps on a Karras/exponential ramp: the reference finds them from float64 sigmas, we in
# float32; they agree to ~1e-4 (two float32 ulps at t ~ 1000). Spaced timesteps match exactly.
RAMP_T_TOL = 2e-4

# diffusers trips numpy 2 deprecations thousands of times per run; they only slow the tests down.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

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
SPACINGS = ("leading", "linspace", "trailing")
RAMPS = ("default", "karras", "exponential")
DETERMINISTIC = ("euler", "heun", "lms", "dpm2")
REFERENCE_CLASS = {
    "euler": "EulerDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "dpm2": "KDPM2DiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "dpm2_ancestral": "KDPM2AncestralDiscreteScheduler",
}


def _gauss_legendre_quad(f, a, b, epsrel=None):
    """scipy.integrate.quad for LMS's integrands, which are polynomials of degree <= 3: a 3-point
    Gauss-Legendre rule integrates them exactly (up to degree 5)."""
    a, b = float(a), float(b)
    nodes, weights = np.polynomial.legendre.leggauss(3)
    return sum(w * float(f((b - a) / 2 * x + (a + b) / 2)) for x, w in zip(nodes, weights)) * (b - a) / 2, 0.0


@pytest.fixture(scope="module")
def reference_class():
    """diffusers scheduler classes by our algorithm key. LMSDiscreteScheduler needs scipy only for
    its quadrature; where scipy is absent the exact rule above stands in for it."""
    import diffusers

    lms_module = importlib.import_module("diffusers.schedulers.scheduling_lms_discrete")
    with pytest.MonkeyPatch.context() as patch:
        if not hasattr(lms_module, "integrate"):
            patch.setattr(lms_module, "integrate", types.SimpleNamespace(quad=_gauss_legendre_quad), raising=False)
        classes = {k: getattr(diffusers, v) for k, v in REFERENCE_CLASS.items() if k != "lms"}
        classes["lms"] = lms_module.LMSDiscreteScheduler
        yield classes


@pytest.fixture(scope="module")
def make_reference(reference_class):
    """A reference scheduler for (algorithm, spacing, ramp, prediction type); built once (KDPM2 and LMS
    plan 1000 steps on construction), set_timesteps resets it for every use."""

    @functools.cache
    def make(name: str, spacing: str, ramp: str = "default", prediction_type: str = "epsilon"):
        ramp_flags = {"use_karras_sigmas": ramp == "karras", "use_exponential_sigmas": ramp == "exponential"}
        if name == "euler_ancestral":
            assert ramp == "default", "EulerAncestralDiscreteScheduler has only its own sigmas"
            ramp_flags = {}
        return reference_class[name].from_config(
            dict(SD_CONFIG, timestep_spacing=spacing, prediction_type=prediction_type, **ramp_flags)
        )

    return make


def ours(name: str, spacing: str, ramp: str = "default", **options) -> tuple:
    return K_ALGORITHMS[name], SamplerOptions(timestep_spacing=spacing, sigma_schedule=ramp, **options)


def plan_points(name: str, scheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's timesteps and sigmas at plan points, without its second-order repeats."""
    timesteps, sigmas, n = scheduler.timesteps, scheduler.sigmas, scheduler.num_inference_steps
    if name in ("heun", "dpm2", "dpm2_ancestral"):
        # Heun: [t0, t1, t1, t2, t2, ...]; DPM2: [t0, mid, t1, mid, t2, ...]. Sigmas repeat each point.
        timesteps = torch.cat([timesteps[:1], timesteps[1::2] if name == "heun" else timesteps[2::2]])
        sigmas = torch.cat([sigmas[:1], sigmas[1::2]])[: n + 1]
    return timesteps, sigmas


def assert_close_latents(ours_x: torch.Tensor, reference_x: torch.Tensor) -> None:
    scale = max(1.0, reference_x.abs().max().item())
    error = (ours_x - reference_x).abs().max().item()
    assert error <= REL_TOL * scale, f"max abs diff {error:.3g} on latents of size {scale:.3g}"


# ---------------------------------------------------------------- plans


# EulerAncestralDiscreteScheduler has no Karras/exponential sigmas (ours: those of Euler).
PLAN_CASES = [
    (name, ramp)
    for name in (*DETERMINISTIC, "euler_ancestral", "dpm2_ancestral")
    for ramp in RAMPS
    if name != "euler_ancestral" or ramp == "default"
]


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name, ramp", PLAN_CASES)
def test_plan_matches_reference(name, spacing, ramp, make_reference):
    reference = make_reference(name, spacing, ramp)
    algorithm, options = ours(name, spacing, ramp)
    for steps in (1, 2, 7, 10, 25, 50):
        reference.set_timesteps(steps)
        timesteps, sigmas = plan_points(name, reference)
        plan = algorithm.plan(NoiseSchedule(), steps, options)
        assert plan.steps == steps and plan.sigmas.shape == (steps + 1,)
        assert plan.sigmas.dtype == plan.timesteps.dtype == torch.float32
        torch.testing.assert_close(plan.sigmas, sigmas, rtol=1e-6, atol=0)
        # diffusers' KDPM2 rounds Karras timesteps to whole ones; otherwise ramps give fractional ones.
        tolerance = RAMP_T_TOL if ramp != "default" else 0.0
        torch.testing.assert_close(plan.timesteps, timesteps.float(), rtol=0, atol=tolerance)
        assert plan.init_noise_scale == pytest.approx(float(reference.init_noise_sigma), rel=1e-6)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_plan_rejects_what_the_samplers_do_not_do(name):
    algorithm = K_ALGORITHMS[name]
    for bad in (
        SamplerOptions(final_sigmas_type="sigma_min"),
        SamplerOptions(interpolation_type="log_linear"),
        SamplerOptions(timestep_spacing="even"),
        SamplerOptions(sigma_schedule="beta"),
    ):
        with pytest.raises(ValueError):
            algorithm.plan(NoiseSchedule(), 10, bad)
    for steps in (0, 1001):
        with pytest.raises(ValueError, match="steps"):
            algorithm.plan(NoiseSchedule(), steps, SamplerOptions())


# ---------------------------------------------------------------- deterministic runs


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("ramp", RAMPS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_final_latents_match_reference(name, spacing, ramp, prediction_type, make_reference):
    reference = make_reference(name, spacing, ramp, prediction_type)
    algorithm, options = ours(name, spacing, ramp)
    schedule = NoiseSchedule(prediction_type=prediction_type)
    for steps, seed in ((1, 0), (2, 1), (10, 2)):
        noise = start_noise(seed)
        assert_close_latents(
            run_ours(algorithm, schedule, options, steps, noise), run_reference(reference, steps, noise)
        )


@pytest.mark.parametrize("ramp", ["default", "karras"])
@pytest.mark.parametrize("name", ["heun", "dpm2", "dpm2_ancestral"])
def test_model_is_told_the_reference_timesteps(name, ramp, make_reference):
    """Second evaluations: Heun at the next plan timestep, DPM2 at the log-midpoint's timestep."""
    reference = make_reference(name, "linspace", ramp)
    algorithm, options = ours(name, "linspace", ramp)
    reference.set_timesteps(10)
    plan = algorithm.plan(NoiseSchedule(), 10, options)
    told = []

    def denoise(x, sigma, t):
        told.append(float(t))
        return torch.zeros_like(x)

    algorithm.run(denoise, torch.ones(1), plan, lambda: torch.zeros(1), None, options)
    torch.testing.assert_close(torch.tensor(told), reference.timesteps.float(), rtol=0, atol=RAMP_T_TOL)


# ---------------------------------------------------------------- ancestral runs, same noise as the reference


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize(
    "name, ramp", [("euler_ancestral", "default"), ("dpm2_ancestral", "default"), ("dpm2_ancestral", "karras")]
)
def test_ancestral_trajectory_matches_reference_given_its_noise(name, ramp, spacing, prediction_type, make_reference):
    reference = make_reference(name, spacing, ramp, prediction_type)
    algorithm, options = ours(name, spacing, ramp)
    schedule = NoiseSchedule(prediction_type=prediction_type)
    for steps in (2, 10):
        x = start_noise(steps)
        assert_close_latents(
            run_ours(algorithm, schedule, options, steps, x, fresh_noise=seeded_noise(7)),
            run_reference(reference, steps, x, seed=7),
        )


# ---------------------------------------------------------------- img2img


def reference_lms_from(scheduler, steps: int, strength: float, x0, noise) -> torch.Tensor:
    """diffusers' LMS started fresh on the shortened schedule. (Its img2img path keeps the step index of
    the full schedule and so weighs the first slope with coefficients meant for slopes it never took;
    A1111/k-diffusion restart the multistep history, as we do.)"""
    scheduler.set_timesteps(steps)
    start = steps - min(int(steps * strength), steps)
    scheduler.sigmas, scheduler.timesteps = scheduler.sigmas[start:], scheduler.timesteps[start:]
    x = x0 + scheduler.sigmas[0] * noise
    for t in scheduler.timesteps:
        x = scheduler.step(toy_model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x


@pytest.mark.parametrize("ramp", ["default", "karras"])
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_img2img_matches_reference(name, ramp, make_reference):
    reference = make_reference(name, "leading", ramp)
    algorithm, options = ours(name, "leading", ramp)
    denoise = make_denoiser(toy_model, "epsilon")
    x0, noise = start_noise(11), start_noise(12)
    for strength in (0.3, 0.75, 1.0):
        plan = algorithm.plan(NoiseSchedule(), 10, options).from_strength(strength)
        assert plan.steps == int(10 * strength)
        result = algorithm.run(denoise, x0 + plan.sigmas[0] * noise, plan, None, None, options)
        expected = (reference_lms_from if name == "lms" else reference_img2img)(reference, 10, strength, x0, noise)
        assert_close_latents(result, expected)


# ---------------------------------------------------------------- stochastic samplers

STOCHASTIC = ("euler_ancestral", "dpm2_ancestral", "dpmpp_sde", "dpmpp_2s_ancestral")


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_runs_reproduce_by_seed(name):
    algorithm, options = ours(name, "leading", "karras")
    schedule, x = NoiseSchedule(), start_noise(3)
    first = run_ours(algorithm, schedule, options, 8, x, fresh_noise=seeded_noise(1))
    again = run_ours(algorithm, schedule, options, 8, x, fresh_noise=seeded_noise(1))
    other = run_ours(algorithm, schedule, options, 8, x, fresh_noise=seeded_noise(2))
    assert torch.equal(first, again)
    assert (first - other).abs().mean() > 1e-3
    with pytest.raises(ValueError, match="noise source"):
        run_ours(algorithm, schedule, options, 8, x)


@pytest.mark.parametrize("name, ode", [("euler_ancestral", "euler"), ("dpm2_ancestral", "dpm2")])
def test_ancestral_without_eta_is_its_ode_sampler(name, ode):
    schedule, x = NoiseSchedule(prediction_type="v_prediction"), start_noise(4)
    options = SamplerOptions(sigma_schedule="karras", eta_ancestral=0.0)
    assert torch.equal(
        run_ours(K_ALGORITHMS[name], schedule, options, 9, x),  # no noise source needed
        run_ours(K_ALGORITHMS[ode], schedule, options, 9, x),
    )


def ramp_plan(steps: int, sigma_max: float = 10.0, sigma_end: float = 0.5) -> Plan:
    """Geometric sigmas ending above 0 (so no final Euler step), in float64 for convergence tests."""
    sigmas = torch.logspace(np.log10(sigma_max), np.log10(sigma_end), steps + 1, dtype=torch.float64)
    return Plan(sigmas=sigmas, timesteps=torch.zeros(steps), init_noise_scale=sigma_max, planned_steps=steps)


@pytest.mark.parametrize("name", list(K_ALGORITHMS))
def test_constant_clean_image_is_followed_exactly(name):
    """If x0 is known, the ODE keeps the noise slice's direction and scales it with sigma, which every
    step here does exactly: x_i = c + sigma_i / sigma_0 * (x_start - c)."""
    clean = torch.linspace(-1, 1, 64, dtype=torch.float64)
    start = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10.0
    plan = ramp_plan(12)
    seen = []
    options = SamplerOptions(eta_ancestral=0.0)
    K_ALGORITHMS[name].run(
        lambda x, sigma, t: clean, start.clone(), plan, None, lambda i, x, denoised: seen.append(x), options
    )
    expected = [clean + plan.sigmas[i + 1] / plan.sigmas[0] * (start - clean) for i in range(plan.steps)]
    torch.testing.assert_close(torch.stack(seen), torch.stack(expected), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "name, order", [("euler", 1), ("heun", 2), ("dpm2", 2), ("dpmpp_2s_ancestral", 2), ("dpmpp_sde", 2), ("lms", 2)]
)
def test_convergence_order_without_fresh_noise(name, order):
    """Unit-Gaussian data: the ideal denoiser is x / (1 + sigma^2) and the ODE solution is
    x(sigma) = x(sigma_0) * sqrt((1 + sigma^2) / (1 + sigma_0^2)). Halving the step should cut the
    error by 2^order (LMS, whose warm-up steps are low order, at least by 4)."""
    start = torch.randn(16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10.0
    options = SamplerOptions(eta_ancestral=0.0)

    def error(steps: int) -> float:
        plan = ramp_plan(steps)
        end = K_ALGORITHMS[name].run(lambda x, sigma, t: x / (1 + sigma**2), start.clone(), plan, None, None, options)
        exact = start * ((1 + plan.sigmas[-1] ** 2) / (1 + plan.sigmas[0] ** 2)) ** 0.5
        return (end - exact).abs().max().item()

    ratio = error(16) / error(32)
    assert 2**order * 0.8 < ratio < 2 ** (order + 1) * 1.2 if name != "lms" else ratio > 4, ratio


@pytest.mark.parametrize("name", STOCHASTIC)
def test_fresh_noise_has_the_ancestral_size(name):
    """With a denoiser that predicts x0 = 0, a step maps x to sigma_down / sigma * x + sigma_up * noise:
    the latent's variance stays sigma^2 at every plan point, and consecutive latents correlate by
    sigma_down / sigma_next. Over 32768 values both are within ~1% of the formula
    (standard errors: 0.8% and < 0.006)."""
    plan = K_ALGORITHMS[name].plan(NoiseSchedule(), 6, SamplerOptions(sigma_schedule="karras"))
    generator = torch.Generator().manual_seed(5)
    draws = []

    def noise():
        draws.append(1)
        return torch.randn(32768, generator=generator)

    start = torch.randn(32768, generator=generator) * plan.sigmas[0]
    latents = [start]
    K_ALGORITHMS[name].run(
        lambda x, sigma, t: torch.zeros_like(x),
        start,
        plan,
        noise,
        lambda i, x, denoised: latents.append(x),
        SamplerOptions(),
    )
    for i in range(plan.steps - 1):  # the last step lands on sigma 0: no fresh noise
        sigma, sigma_next = plan.sigmas[i].double(), plan.sigmas[i + 1].double()
        sigma_down = (sigma_next**2 - sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        before, after = latents[i].double(), latents[i + 1].double()
        assert after.var().item() == pytest.approx(sigma_next.item() ** 2, rel=0.04)
        correlation = (before * after).mean() / (before.std() * after.std())
        assert correlation.item() == pytest.approx((sigma_down / sigma_next).item(), abs=0.02)
    assert latents[-1].abs().max() < 1e-6  # the last step lands on the (zero) clean prediction
    per_step = 2 if name == "dpmpp_sde" else 1  # DPM++ SDE also noises its midpoint evaluation
    assert len(draws) == per_step * (plan.steps - 1)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_s_noise_scales_the_fresh_noise(name):
    """From x = 0 with x0 predicted 0, the first step's result is the fresh noise alone:
    standard deviation s_noise * sigma_up (DPM++ SDE: of its second, whole-step draw)."""
    plan = K_ALGORITHMS[name].plan(NoiseSchedule(), 5, SamplerOptions())
    sigma, sigma_next = plan.sigmas[0].double(), plan.sigmas[1].double()
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    generator = torch.Generator().manual_seed(9)
    first = []
    K_ALGORITHMS[name].run(
        lambda x, sigma, t: torch.zeros_like(x),
        torch.zeros(32768),
        plan,
        lambda: torch.randn(32768, generator=generator),
        lambda i, x, denoised: first.append(x) if i == 0 else None,
        SamplerOptions(s_noise=0.5),
    )
    assert first[0].double().std().item() == pytest.approx(0.5 * sigma_up.item(), rel=0.02)


def test_dpmpp_sde_noises_its_midpoint_like_an_ancestral_step():
    """DPM++ SDE's midpoint evaluation sees the latent after an ancestral step from sigma to the
    log-midpoint: variance sigma_mid^2 and correlation sigma_down / sigma_mid with the step's start."""
    plan = K_ALGORITHMS["dpmpp_sde"].plan(NoiseSchedule(), 4, SamplerOptions(sigma_schedule="karras"))
    generator = torch.Generator().manual_seed(8)
    calls = []

    def denoise(x, sigma, t):
        calls.append((sigma, x.double()))
        return torch.zeros_like(x)

    start = torch.randn(32768, generator=generator) * plan.sigmas[0]
    K_ALGORITHMS["dpmpp_sde"].run(
        denoise, start, plan, lambda: torch.randn(32768, generator=generator), None, SamplerOptions()
    )
    assert len(calls) == 2 * plan.steps - 1  # the step to sigma 0 evaluates once
    for i in range(plan.steps - 1):
        (sigma, before), (sigma_mid, middle) = calls[2 * i], calls[2 * i + 1]
        sigma, sigma_mid = sigma.double(), sigma_mid.double()
        assert sigma_mid.item() == pytest.approx((sigma * plan.sigmas[i + 1].double()).sqrt().item(), rel=1e-6)
        sigma_up = (sigma_mid**2 * (sigma**2 - sigma_mid**2) / sigma**2) ** 0.5
        sigma_down = (sigma_mid**2 - sigma_up**2) ** 0.5
        assert middle.var().item() == pytest.approx(sigma_mid.item() ** 2, rel=0.04)
        correlation = (before * middle).mean() / (before.std() * middle.std())
        assert correlation.item() == pytest.approx((sigma_down / sigma_mid).item(), abs=0.02)
