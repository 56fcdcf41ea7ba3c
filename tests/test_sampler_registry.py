"""Sampler names (A1111 labels and aliases) and diffusers scheduler configs to Samplers, and the
schedule pieces every sampler shares (sigma <-> timestep, eps/v conversion, img2img truncation)."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from diffuse.samplers import (
    SAMPLER_NAMES,
    SCHEDULE_TYPES,
    Sampler,
    get_sampler,
    sampler_from_diffusers_config,
)
from diffuse.samplers.schedule import NoiseSchedule, SamplerOptions, predicted_x0, prediction_target

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notices from diffusers

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

# (what a user types, algorithm, sigma schedule)
PARSES = [
    ("Euler", "euler", "default"),
    ("  euler ", "euler", "default"),
    ("k_euler", "euler", "default"),
    ("Euler a", "euler_ancestral", "default"),
    ("euler_a", "euler_ancestral", "default"),
    ("EULER  A", "euler_ancestral", "default"),
    ("k_euler_a", "euler_ancestral", "default"),
    ("k_euler_ancestral", "euler_ancestral", "default"),
    ("euler_ancestral", "euler_ancestral", "default"),
    ("Euler Karras", "euler", "karras"),
    ("euler a exponential", "euler_ancestral", "exponential"),
    ("Heun", "heun", "default"),
    ("k_heun", "heun", "default"),
    ("LMS", "lms", "default"),
    ("k_lms", "lms", "default"),
    ("LMS Karras", "lms", "karras"),
    ("DPM2", "dpm2", "default"),
    ("k_dpm_2", "dpm2", "default"),
    ("dpm2 karras", "dpm2", "karras"),
    ("DPM2 a", "dpm2_ancestral", "default"),
    ("k_dpm_2_a", "dpm2_ancestral", "default"),
    ("DPM2 a Karras", "dpm2_ancestral", "karras"),
    ("DPM++ SDE", "dpmpp_sde", "default"),
    ("k_dpmpp_sde", "dpmpp_sde", "default"),
    ("DPM++ SDE Karras", "dpmpp_sde", "karras"),
    ("DPM++ 2S a", "dpmpp_2s_ancestral", "default"),
    ("k_dpmpp_2s_a", "dpmpp_2s_ancestral", "default"),
    ("dpmpp_2s_ancestral", "dpmpp_2s_ancestral", "default"),
    ("DPM++ 2M", "dpmpp_2m", "default"),
    ("dpm++ 2m karras", "dpmpp_2m", "karras"),
    ("DPM++  2M   KARRAS", "dpmpp_2m", "karras"),
    ("k_dpmpp_2m", "dpmpp_2m", "default"),
    ("k_dpmpp_2m_ka", "dpmpp_2m", "karras"),
    ("dpmpp_2m_karras", "dpmpp_2m", "karras"),
    ("DPM++ 2M SDE", "dpmpp_2m_sde", "default"),
    ("k_dpmpp_2m_sde", "dpmpp_2m_sde", "default"),
    ("DPM++ 2M SDE Exponential", "dpmpp_2m_sde", "exponential"),
    ("DDIM", "ddim", "default"),
    ("ddim", "ddim", "default"),
    ("PLMS", "plms", "default"),
    ("UniPC", "unipc", "default"),
    ("unipc karras", "unipc", "karras"),
    ("LCM", "lcm", "default"),
    ("k_lcm", "lcm", "default"),
    ("DDPM", "ddpm", "default"),
]


@pytest.mark.parametrize("typed, algorithm, sigma_schedule", PARSES)
def test_names_and_aliases(typed, algorithm, sigma_schedule):
    sampler = get_sampler(typed)
    assert (sampler.algorithm, sampler.options.sigma_schedule) == (algorithm, sigma_schedule)
    assert sampler.schedule == NoiseSchedule()
    assert sampler.options == SamplerOptions(sigma_schedule=sigma_schedule)


@pytest.mark.parametrize(
    "typed", ["Euler b", "", "   ", "Karras", "DPM++ 3M SDE", "DPM fast", "euler_karras_a", "DDIM CFG++"]
)
def test_unknown_names_list_the_valid_ones(typed):
    with pytest.raises(ValueError) as error:
        get_sampler(typed)
    assert all(name in str(error.value) for name in SAMPLER_NAMES)


def test_round_trip_label_sampler_label():
    assert len(SAMPLER_NAMES) == 15 and SCHEDULE_TYPES == ("Automatic", "Karras", "Exponential")
    timestep_samplers = {"DDIM", "PLMS", "LCM", "DDPM"}
    for name in SAMPLER_NAMES:
        for schedule_type in SCHEDULE_TYPES:
            if name in timestep_samplers and schedule_type != "Automatic":
                continue
            label = name if schedule_type == "Automatic" else f"{name} {schedule_type}"
            sampler = get_sampler(label)
            assert (sampler.name, sampler.schedule_type, sampler.label) == (name, schedule_type, label)
            assert get_sampler(sampler.name, schedule_type=sampler.schedule_type) == sampler
            assert get_sampler(label.lower().replace(" ", "_")) == sampler


def test_schedule_type_argument():
    assert get_sampler("DPM++ 2M", schedule_type="Karras").label == "DPM++ 2M Karras"
    assert get_sampler("DPM++ 2M", schedule_type="exponential").label == "DPM++ 2M Exponential"
    assert get_sampler("DPM++ 2M Karras", schedule_type="Automatic").label == "DPM++ 2M Karras"
    assert get_sampler("DPM++ 2M Karras", schedule_type="Karras").label == "DPM++ 2M Karras"
    assert get_sampler("Euler", schedule_type="Automatic").label == "Euler"
    with pytest.raises(ValueError, match="schedule_type"):
        get_sampler("DPM++ 2M Karras", schedule_type="Exponential")
    with pytest.raises(ValueError, match="Automatic, Karras, Exponential"):
        get_sampler("Euler", schedule_type="Uniform")
    for timestep_sampler in ("DDIM Karras", "PLMS Exponential"):
        with pytest.raises(ValueError, match="whole training timesteps"):
            get_sampler(timestep_sampler)
    with pytest.raises(ValueError, match="whole training timesteps"):
        get_sampler("LCM", schedule_type="Karras")


def test_scheduler_config_supplies_schedule_and_options():
    model_config = {
        "_class_name": "PNDMScheduler",
        "beta_start": 0.001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "num_train_timesteps": 1000,
        "prediction_type": "v_prediction",
        "skip_prk_steps": True,
        "steps_offset": 0,
        "timestep_spacing": "trailing",
        "trained_betas": None,
        "clip_sample": False,
    }
    sampler = get_sampler("Euler a", scheduler_config=model_config)
    assert sampler.schedule == NoiseSchedule(
        beta_start=0.001, beta_end=0.02, beta_schedule="linear", prediction_type="v_prediction"
    )
    assert (sampler.options.timestep_spacing, sampler.options.steps_offset) == ("trailing", 0)
    # A model's Karras setting applies where the sampler has sigmas to ramp, and is left out elsewhere.
    karras_config = {**model_config, "use_karras_sigmas": True}
    assert get_sampler("Euler", scheduler_config=karras_config).label == "Euler Karras"
    assert get_sampler("Euler Exponential", scheduler_config=karras_config).label == "Euler Exponential"
    assert get_sampler("DDIM", scheduler_config=karras_config).label == "DDIM"
    # Without a config: Stable Diffusion's schedule and the options' defaults.
    assert get_sampler("Euler") == Sampler("euler", SamplerOptions(), NoiseSchedule())
    for bad in (
        {"trained_betas": [0.1] * 1000},
        {"rescale_betas_zero_snr": True},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"use_beta_sigmas": True},
        {"prediction_type": "sample"},
    ):
        with pytest.raises(ValueError):
            get_sampler("Euler", scheduler_config={**model_config, **bad})


def test_sampler_properties_and_run():
    assert get_sampler("Euler a").stochastic and get_sampler("DPM++ SDE").stochastic
    assert not get_sampler("Euler").stochastic and not get_sampler("DDIM").stochastic
    assert Sampler("ddim", SamplerOptions(eta=0.5)).stochastic
    assert not Sampler("euler_ancestral", SamplerOptions(eta_ancestral=0.0)).stochastic
    with pytest.raises(ValueError, match="unknown sampler algorithm"):
        Sampler("k_euler")
    sampler = get_sampler("Heun")
    plan = sampler.plan(4)
    out = sampler.run(lambda x, sigma, t: 0.5 * x, torch.ones(3) * plan.init_noise_scale, plan)
    assert out.shape == (3,) and torch.isfinite(out).all()


# ---------------------------------------------------------------- diffusers configs

# (class, config changes, our algorithm)
DIFFUSERS_CASES = [
    ("EulerDiscreteScheduler", {}, "euler"),
    (
        "EulerDiscreteScheduler",
        {"use_karras_sigmas": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
        "euler",
    ),
    ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "linspace"}, "euler_ancestral"),
    ("HeunDiscreteScheduler", {"use_exponential_sigmas": True}, "heun"),
    ("LMSDiscreteScheduler", {"timestep_spacing": "linspace"}, "lms"),
    ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}, "dpm2"),
    ("KDPM2AncestralDiscreteScheduler", {}, "dpm2_ancestral"),
    ("DDIMScheduler", {"timestep_spacing": "trailing", "set_alpha_to_one": True}, "ddim"),
    ("PNDMScheduler", {"skip_prk_steps": True}, "plms"),
    ("DDPMScheduler", {}, "ddpm"),
    ("DPMSolverMultistepScheduler", {}, "dpmpp_2m"),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "dpmpp_2m"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "dpmpp_2m_sde"),
    ("UniPCMultistepScheduler", {"timestep_spacing": "linspace"}, "unipc"),
    ("LCMScheduler", {}, "lcm"),
]


def diffusers_scheduler(class_name: str, changes: dict):
    """The reference scheduler and the scheduler_config.json it would save."""
    import diffusers

    if class_name == "LMSDiscreteScheduler":  # importable without scipy from its own module
        cls = importlib.import_module("diffusers.schedulers.scheduling_lms_discrete").LMSDiscreteScheduler
    else:
        cls = getattr(diffusers, class_name)
    scheduler = cls.from_config(cls.from_config({**SD_CONFIG, **changes}).config)
    return scheduler, json.loads(scheduler.to_json_string())


@pytest.mark.parametrize("class_name, changes, algorithm", DIFFUSERS_CASES)
def test_diffusers_config_gives_the_same_timesteps(class_name, changes, algorithm):
    """The UNet is told the reference's timesteps, in order (second-order evaluations included)."""
    scheduler, config = diffusers_scheduler(class_name, changes)
    sampler = sampler_from_diffusers_config(config)
    assert sampler.algorithm == algorithm
    assert sampler.schedule.prediction_type == changes.get("prediction_type", "epsilon")
    for steps in (1, 7, 25):
        scheduler.set_timesteps(steps)
        plan = sampler.plan(steps)
        told = []

        def denoise(x, sigma, t, told=told):
            told.append(float(t))
            return 0.5 * x

        sampler.run(denoise, torch.ones(4) * plan.init_noise_scale, plan, lambda: torch.zeros(4))
        # Karras/exponential timesteps are fractional: float32 here, float64 in the reference.
        torch.testing.assert_close(torch.tensor(told), scheduler.timesteps.float(), rtol=0, atol=2e-4)


def test_diffusers_config_options_carry_over():
    changes = {
        "use_karras_sigmas": True,
        "timestep_spacing": "trailing",
        "steps_offset": 0,
        "prediction_type": "v_prediction",
    }
    _, config = diffusers_scheduler("EulerDiscreteScheduler", changes)
    sampler = sampler_from_diffusers_config(config)
    assert sampler.label == "Euler Karras"
    assert (sampler.options.timestep_spacing, sampler.options.steps_offset) == ("trailing", 0)
    _, config = diffusers_scheduler("DPMSolverMultistepScheduler", {"solver_order": 1, "lower_order_final": False})
    sampler = sampler_from_diffusers_config(config)
    assert (sampler.options.solver_order, sampler.options.lower_order_final) == (1, False)
    _, config = diffusers_scheduler("LCMScheduler", {"original_inference_steps": 40, "timestep_scaling": 5.0})
    sampler = sampler_from_diffusers_config(config)
    assert (sampler.options.original_inference_steps, sampler.options.timestep_scaling) == (40, 5.0)


@pytest.mark.parametrize(
    "class_name, changes, named",
    [
        (
            "DPMSolverMultistepScheduler",
            {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
            "algorithm_type",
        ),
        ("DPMSolverMultistepScheduler", {"solver_type": "heun"}, "solver_type"),
        ("DPMSolverMultistepScheduler", {"euler_at_final": True}, "euler_at_final"),
        ("DPMSolverMultistepScheduler", {"use_lu_lambdas": True}, "use_lu_lambdas"),
        ("UniPCMultistepScheduler", {"solver_type": "bh1"}, "solver_type"),
        ("DDIMScheduler", {"clip_sample": True}, "clip_sample"),
        ("DDIMScheduler", {"thresholding": True}, "thresholding"),
        ("DDPMScheduler", {"variance_type": "fixed_large"}, "variance_type"),
        ("EulerDiscreteScheduler", {"timestep_type": "continuous"}, "timestep_type"),
        ("EulerDiscreteScheduler", {"sigma_min": 0.1}, "sigma_min"),
        ("EulerDiscreteScheduler", {"final_sigmas_type": "sigma_min"}, "final_sigmas_type"),
        ("EulerDiscreteScheduler", {"interpolation_type": "log_linear"}, "interpolation_type"),
        ("EulerDiscreteScheduler", {"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
        ("KDPM2DiscreteScheduler", {"use_beta_sigmas": True}, "use_beta_sigmas"),
        ("PNDMScheduler", {"skip_prk_steps": False}, "skip_prk_steps"),
    ],
)
def test_diffusers_config_rejects_what_we_do_not_do(class_name, changes, named):
    if changes.get("use_beta_sigmas"):  # diffusers itself needs scipy for these
        _, config = diffusers_scheduler(class_name, {})
        config.update(changes)
    else:
        _, config = diffusers_scheduler(class_name, changes)
    with pytest.raises(ValueError, match=named):
        sampler_from_diffusers_config(config)


def test_diffusers_config_rejects_unknown_classes_and_fields():
    with pytest.raises(ValueError, match="DEISMultistepScheduler"):
        sampler_from_diffusers_config({"_class_name": "DEISMultistepScheduler"})
    with pytest.raises(ValueError, match="_class_name"):
        sampler_from_diffusers_config(dict(SD_CONFIG))
    _, config = diffusers_scheduler("EulerDiscreteScheduler", {})
    with pytest.raises(ValueError, match="shiny_new_knob"):
        sampler_from_diffusers_config({**config, "shiny_new_knob": 3})


# ---------------------------------------------------------------- shared schedule pieces


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sigma_to_t_inverts_t_to_sigma_on_training_steps(dtype):
    schedule = NoiseSchedule()
    whole = torch.arange(schedule.num_train_timesteps, dtype=torch.float64)
    torch.testing.assert_close(schedule.t_to_sigma(whole), schedule.sigmas().double(), rtol=0, atol=0)
    t = schedule.sigma_to_t(schedule.sigmas(), dtype)
    assert t.dtype == dtype and t.shape == whole.shape
    torch.testing.assert_close(t.double(), whole, rtol=0, atol=1e-3)
    # Between training steps, and beyond the table's ends (clamped to them).
    halfway = schedule.sigma_to_t((schedule.sigmas()[10] * schedule.sigmas()[11]).sqrt().reshape(()), dtype)
    assert halfway.shape == () and 10.49 < halfway.item() < 10.51
    assert schedule.sigma_to_t(torch.tensor([1e-6, 1e6]), dtype).tolist() == [0.0, 999.0]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predicted_x0_inverts_the_training_target(prediction_type):
    generator = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(2, 2, 64, generator=generator, dtype=torch.float64)
    sigma = torch.tensor([[0.05], [14.6]], dtype=torch.float64)
    alpha = (1 + sigma**2) ** -0.5
    target = prediction_target(x0, noise, alpha, sigma * alpha, prediction_type)
    if prediction_type == "epsilon":
        assert torch.equal(target, noise)
    recovered = predicted_x0(x0 + sigma * noise, sigma, alpha, target, prediction_type)
    torch.testing.assert_close(recovered, x0, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="prediction_type"):
        prediction_target(x0, noise, alpha, sigma * alpha, "sample")


@pytest.mark.parametrize("name, extra_calls", [("DPM++ 2M", 0), ("PLMS", 1)])
def test_img2img_strength_counts_planned_steps(name, extra_calls):
    """PLMS makes one model call more than the steps asked for; strength still counts the steps."""
    plan = get_sampler(name).plan(10)
    assert plan.planned_steps == 10 and plan.steps == 10 + extra_calls
    tail = plan.from_strength(0.3)
    assert tail.planned_steps == 10 and tail.steps == 3 + extra_calls
    assert torch.equal(tail.sigmas, plan.sigmas[-tail.steps - 1 :])
    assert torch.equal(tail.timesteps, plan.timesteps[-tail.steps :])
