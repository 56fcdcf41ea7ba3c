"""diffuse illustrate: the figures of "The Illustrated Stable Diffusion", drawn from a live run.

    illustrate(pipe, prompt, *, out, seed=0, steps=None, sampler=None, cfg_scale=None,
               negative_prompt="", width=None, height=None, kinds=None, overwrite=False) -> Report
        generate once with everything recorded and write the report folder `out`: index.html
        (opens offline), report.json (every number) and the figures' images; Report holds the
        folder, report.json's dict and the figures drawn. A figure that fails is listed with its
        error and the others are still drawn. KINDS lists the figures in the report's order.
    record(pipe, prompt, *, negative_prompt="", seed=0, steps=None, sampler=None, cfg_scale=None,
           width=None, height=None, guidance_steps=None, attention=True) -> Recording
        the generation alone, recorded through forward hooks and the step callback: the text's
        tokens and embeddings, every step's latents and clean estimate, guidance at a few steps,
        the cross-attention maps per prompt token, the image, timings and shapes.
    Figure(kind, file, caption, numbers)
        one figure of the report: a maker(pipe, rec, out) -> Figure draws it into `out` from a
        Recording, with a caption in the run's own numbers.

The same code draws the server page's "How it was made" view.
"""

from diffuse.illustrate.figure import Figure
from diffuse.illustrate.record import record
from diffuse.illustrate.recording import Recording
from diffuse.illustrate.report import KINDS, Report, illustrate

__all__ = ["KINDS", "Figure", "Recording", "Report", "illustrate", "record"]
