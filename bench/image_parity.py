"""Print how far our images are from diffusers' for every sampler, txt2img and img2img.

The same tiny random SD1- and SD2-style models as the test suite, the same seed,
10 steps, guidance 7.5: the number per sampler is the largest difference of any
8-bit channel of any pixel (the tests require ≤ 2). Run from the repository root:

    .venv/bin/python bench/image_parity.py
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
warnings.filterwarnings("ignore")

import conftest  # noqa: E402  (the reference builders the tests use)
import test_generation as cases  # noqa: E402

import diffuse  # noqa: E402


def main() -> None:
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging

    logging.set_verbosity_error()
    root = Path(tempfile.mkdtemp())
    vocab = conftest.write_clip_vocab(root / "vocab")
    refs, ours = {}, {}
    for style in ("sd1", "sd2"):
        folder = root / style
        conftest.build_reference(style, vocab).save_pretrained(folder, safe_serialization=True)
        refs[style] = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
        refs[style].set_progress_bar_config(disable=True)
        ours[style] = diffuse.load_pipeline(folder)

    settings = dict(negative_prompt=cases.NEGATIVE, guidance_scale=7.5)
    for kind in ("txt2img", "img2img"):
        samplers = list(cases.DETERMINISTIC) + (list(cases.STOCHASTIC) if kind == "txt2img" else [])
        for style in ("sd1", "sd2"):
            row = []
            for sampler in samplers:
                ref = cases.reference(refs, style, sampler, kind)
                ref.set_progress_bar_config(disable=True)
                generator = torch.Generator("cpu").manual_seed(1234)
                if kind == "txt2img":
                    expected = ref(
                        cases.PROMPT,
                        num_inference_steps=cases.STEPS,
                        height=cases.SIZE,
                        width=cases.SIZE,
                        generator=generator,
                        **settings,
                    ).images
                    got = (
                        ours[style]
                        .txt2img(
                            cases.PROMPT,
                            steps=cases.STEPS,
                            width=cases.SIZE,
                            height=cases.SIZE,
                            sampler=sampler,
                            seed=1234,
                            **settings,
                        )
                        .images
                    )
                else:
                    expected = ref(
                        cases.PROMPT,
                        image=cases.picture(),
                        strength=0.6,
                        num_inference_steps=cases.STEPS,
                        generator=generator,
                        **settings,
                    ).images
                    got = (
                        ours[style]
                        .img2img(
                            cases.picture(),
                            cases.PROMPT,
                            strength=0.6,
                            steps=cases.STEPS,
                            sampler=sampler,
                            seed=1234,
                            **settings,
                        )
                        .images
                    )
                diff = int(abs(cases.pixels(got) - cases.pixels(expected)).max())
                known = (style, sampler) in cases.DIVERGES or (kind, sampler) in cases.DIVERGES
                row.append(f"{sampler} {diff}{' (by design)' if known else ''}")
            print(f"{kind} {style}: " + ", ".join(row))


if __name__ == "__main__":
    main()
