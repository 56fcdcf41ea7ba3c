"""One generation, recorded from outside: `record(pipe, prompt, ...)` -> Recording.

The pipeline runs once through its public entry point, `Pipeline.generate(request, callback)`,
with batch size 1 and no speed-ups (deep cache and token merging skip or swap the UNet's own
forward, which the hooks watch). Everything else is seen through forward hooks on the networks'
modules and the step callback, all removed when the run ends, however it ends:

- each text encoder's embedding layer sees the token ids the pipeline gave it (SDXL: both
  encoders, whose outputs lie side by side in the context); hooks around each encoder time it;
- the UNet's hooks see each call's latents, timestep, context ([uncond, cond] when guided) and
  SDXL's vector conditioning y, and its output, from which guidance is taken apart at the steps
  asked for;
- every cross-attention layer's hook recomputes its softmax(q k^T / sqrt(d)) rows for the
  conditional half of the batch (DAAM's maps; see CrossAttentionMaps);
- the VAE's post_quant_conv and decoder bracket the decode.

Hooks only read: the image is bit for bit the one a plain run of the same request makes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from diffuse.generation import Step
from diffuse.illustrate.recording import AttentionRecord, GuidanceRecord, Recording, StepRecord, TextRecord
from diffuse.pipeline import Pipeline
from diffuse.request import GenerationRequest
from diffuse.tokenizer import CONTEXT_LENGTH

# ---- cross-attention maps ----------------------------------------------------------------------


def cross_attention_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """The UNet's cross-attention modules by name: each transformer block's `attn2`, which takes its
    keys and values from the text (whatever class runtime.prepare gave it, it keeps `qkv`)."""
    return {
        name: module
        for name, module in unet.named_modules()
        if name.rsplit(".", 1)[-1] == "attn2" and callable(getattr(module, "qkv", None))
    }


def layer_grid(queries: int, latent_size: tuple[int, int]) -> tuple[int, int]:
    """The feature map (h, w) a layer's `queries` positions come from: the latent halved k times,
    each stride-2 downsample rounding up (the UNet's Downsample is a 3x3 conv, stride 2, padding 1)."""
    h, w = latent_size
    for _ in range(16):
        if h * w == queries:
            return h, w
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    raise ValueError(f"{queries} query positions fit no halving of the {latent_size} latent")


def softmax_rows(module: nn.Module, x: Tensor, context: Tensor, max_scores: int = 2**22) -> Tensor:
    """softmax(q k^T / sqrt(d)) of one cross-attention layer, averaged over heads: [N, M] in float32
    for one image's queries x [1, N, dim] and context [1, M, context_dim]. The query rows go in
    chunks of at most `max_scores` scores, so memory stays bounded at any image size."""
    q, k, _ = module.qkv(x, context)  # [1, heads, N, d], [1, heads, M, d]
    heads, n, d = q.shape[1:]
    keys_t = k[0].float().transpose(1, 2) * d**-0.5
    rows = max(1, max_scores // (heads * keys_t.shape[-1]))
    return torch.cat(
        [torch.matmul(q[0, :, start : start + rows].float(), keys_t).softmax(-1).mean(0) for start in range(0, n, rows)]
    )


class CrossAttentionMaps:
    """DAAM's attention maps, gathered by forward hooks on every cross-attention layer.

    For each UNet call, each layer's softmax rows (the conditional image of the batch, averaged
    over heads) are laid on the layer's grid and added up per grid size; a call's sums count once
    its UNet output turns out finite (a call redone in float32 counts once). `maps()` upsamples
    each grid's sum to the latent size (bilinear, which is linear, so this equals upsampling every
    layer's map) and divides by the number of layers and calls: [tokens, h, w] for the first
    `tokens` key positions. At every latent position the 77 maps of a one-chunk prompt sum to 1.

    `layers` picks layers by name (None: all); `steps` the 0-based steps whose UNet calls count
    (None: all)."""

    def __init__(
        self,
        unet: nn.Module,
        latent_size: tuple[int, int],
        tokens: int = CONTEXT_LENGTH,
        layers: Iterable[str] | None = None,
        steps: Iterable[int] | None = None,
    ):
        found = cross_attention_layers(unet)
        names = list(found) if layers is None else list(layers)
        missing = [n for n in names if n not in found]
        if missing:
            raise ValueError(f"no cross-attention layer named {missing[0]!r}; there are {list(found)}")
        self.unet, self.layers = unet, {n: found[n] for n in names}
        self.latent_size, self.tokens = latent_size, tokens
        self.steps = None if steps is None else set(steps)
        self.step = 0  # the step the next UNet call belongs to (set by the recorder's callback)
        self.totals: dict[tuple[int, int], Tensor] = {}  # per grid size, [tokens, gh, gw]
        self.call_sums: dict[tuple[int, int], Tensor] | None = None
        self.calls, self.counted_steps, self.seconds = 0, set(), 0.0

    def hooks(self) -> list[RemovableHandle]:
        handles = [self.unet.register_forward_pre_hook(self._call_starts)]
        handles += [m.register_forward_hook(self._layer_done) for m in self.layers.values()]
        return handles + [self.unet.register_forward_hook(self._call_done)]

    def _call_starts(self, module: nn.Module, args: tuple) -> None:
        self.call_sums = {} if self.steps is None or self.step in self.steps else None

    def _layer_done(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if self.call_sums is None:
            return
        began = time.perf_counter()
        x, context = args[0], args[1]
        cond = len(x) - 1  # [uncond, cond] when guided, [cond] when not
        rows = softmax_rows(module, x[cond : cond + 1], context[cond : cond + 1])[:, : self.tokens]
        grid = layer_grid(rows.shape[0], self.latent_size)
        layer_map = rows.T.reshape(-1, *grid)
        self.call_sums[grid] = layer_map if grid not in self.call_sums else self.call_sums[grid] + layer_map
        self.seconds += time.perf_counter() - began

    def _call_done(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        sums, self.call_sums = self.call_sums, None
        if sums is None or not all(bool(torch.isfinite(s).all()) for s in sums.values()):
            return
        for grid, layer_sum in sums.items():
            self.totals[grid] = layer_sum if grid not in self.totals else self.totals[grid] + layer_sum
        self.calls += 1
        self.counted_steps.add(self.step)

    def maps(self) -> Tensor:
        """[tokens, h, w]: the sum over layers and calls, upsampled, divided by their counts."""
        if not self.calls:
            raise ValueError("no UNet call was recorded for the attention maps")
        up = [F.interpolate(t[None], size=self.latent_size, mode="bilinear")[0] for t in self.totals.values()]
        return torch.stack(up).sum(0) / (len(self.layers) * self.calls)


# ---- the rest of the run -----------------------------------------------------------------------


@dataclass
class _Clock:
    """Seconds spent inside one module's forward calls, summed, from a pre-hook and a hook."""

    seconds: float = 0.0
    started: float = 0.0

    def hooks(self, first: nn.Module, last: nn.Module | None = None) -> list[RemovableHandle]:
        # Registered after the other hooks, the start runs last and the stop (prepended) first.
        stop = (last or first).register_forward_hook(self._stop, prepend=True)
        return [first.register_forward_pre_hook(self._start), stop]

    def _start(self, *_) -> None:
        self.started = time.perf_counter()

    def _stop(self, *_) -> None:
        self.seconds += time.perf_counter() - self.started


@dataclass
class _Watch:
    """What the hooks and the step callback saw, as the run goes."""

    guidance_steps: set[int]
    scale: float
    attention: CrossAttentionMaps | None = None
    ids: list[Tensor | None] = field(default_factory=lambda: [None, None])  # [77] per encoder: the first chunk
    token_vectors: list[Tensor | None] = field(default_factory=lambda: [None, None])  # [77, width] embeddings' own
    context: Tensor | None = None  # [1, 77k, width] the cond context the UNet attended to
    vector: Tensor | None = None  # [adm] SDXL's y for the prompt (cond)
    steps: list[StepRecord] = field(default_factory=list)
    guidance: dict[int, GuidanceRecord] = field(default_factory=dict)
    step_began: float | None = None

    def embedding_input(self, encoder: int):
        """A pre-hook on encoder `encoder`'s embedding layer; its first row is the prompt's first chunk
        (prompts are encoded before negative prompts)."""

        def keep(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.ids[encoder] = args[0][0].detach().cpu()
            vectors = args[1] if len(args) > 1 else kwargs.get("token_embeddings")
            self.token_vectors[encoder] = None if vectors is None else vectors[0].detach().float().cpu()

        return keep

    def unet_starts(self, module: nn.Module, args: tuple) -> None:
        if self.step_began is None:
            self.step_began = time.perf_counter()

    def unet_done(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
        step, context = len(self.steps), args[2]
        if self.context is None:
            self.context = context[-1:].detach().float().cpu()
            y = args[3] if len(args) > 3 else kwargs.get("y")
            self.vector = None if y is None else y[-1].detach().float().cpu()
        # The first call of a guided step is the one at the step's own noise level; a non-finite
        # output is about to be made again in float32, and the retry is what the sampler uses.
        wanted = step in self.guidance_steps and step not in self.guidance and len(output) == 2
        if wanted and bool(torch.isfinite(output).all()):
            uncond, cond = output.float().chunk(2)
            guided = uncond + self.scale * (cond - uncond)  # NoisePredictor's formula, in its order
            self.guidance[step] = GuidanceRecord(uncond[0].cpu(), cond[0].cpu(), guided[0].cpu(), self.scale)

    def step_done(self, step: Step, sigmas: Tensor) -> None:
        now = time.perf_counter()
        i = step.index
        self.steps.append(
            StepRecord(
                index=i,
                timestep=float(step.timestep),
                sigma=float(sigmas[i]),
                latents=step.latents[0].detach().float().cpu().clone(),
                denoised=step.denoised[0].detach().float().cpu().clone(),
                seconds=now - self.step_began,
                guidance=self.guidance.get(i),
            )
        )
        self.step_began = now
        if self.attention is not None:
            self.attention.step = i + 1


# ---- record -------------------------------------------------------------------------------------


def record(
    pipe: Pipeline,
    prompt: str,
    *,
    negative_prompt: str = "",
    seed: int = 0,
    steps: int | None = None,
    sampler: str | None = None,
    cfg_scale: float | None = None,
    width: int | None = None,
    height: int | None = None,
    guidance_steps: Iterable[int] | None = None,
    attention: bool = True,
    attention_layers: Iterable[str] | None = None,
    attention_steps: Iterable[int] | None = None,
    all_tokens: bool = False,
) -> Recording:
    """Generate one image of `prompt` and record what each part computed on the way.

    None takes GenerationRequest's default (steps, sampler, cfg_scale) or the model's native size
    (width, height). `guidance_steps` are the 0-based steps whose conditional and unconditional
    predictions are kept (None: the first, middle and last). With `attention` the cross-attention
    maps are gathered from `attention_layers` (names as cross_attention_layers gives them; None:
    all) over `attention_steps` (None: all), for the prompt's own tokens, or with `all_tokens` for
    all 77 positions of the first chunk (start, end and padding included)."""
    request = _request(prompt, negative_prompt, seed, steps, sampler, cfg_scale, width, height)
    job = request.resolve(pipe.config, pipe.scheduler_config)
    plan = job.sampler.plan(job.steps)
    factor = pipe.config.vae.downsample_factor
    latent_size = (job.height // factor, job.width // factor)
    chosen = _guidance_steps(job.steps, guidance_steps)
    watch = _Watch(chosen, job.guidance_scale)
    if attention:
        watch.attention = CrossAttentionMaps(pipe.unet, latent_size, layers=attention_layers, steps=attention_steps)
    clocks = {part: _Clock() for part in ("text_encoder", "unet", "vae_decode")}
    handles: list[RemovableHandle] = []
    try:
        handles += _hooks(pipe, watch, clocks)
        began = time.perf_counter()
        result = pipe.generate(request, lambda step: watch.step_done(step, plan.sigmas))
        total = time.perf_counter() - began
    finally:
        for handle in handles:
            handle.remove()
    texts = _text_records(pipe, watch)
    text = texts[0]
    timings = {part: clock.seconds for part, clock in clocks.items()} | {"total": total}
    if watch.attention is not None:
        timings["attention_maps"] = watch.attention.seconds
        timings["unet"] -= watch.attention.seconds  # the hooks run inside the UNet's forward
    image = result.images[0]
    final = watch.steps[-1].latents
    return Recording(
        prompt=prompt,
        negative_prompt=negative_prompt,
        seed=result.seeds[0],
        steps=job.steps,
        sampler=job.sampler.label,
        cfg_scale=job.guidance_scale,
        width=job.width,
        height=job.height,
        model=pipe.model_name,
        image=image,
        text=text,
        text_2=texts[1] if len(texts) > 1 else None,
        vector=watch.vector,
        step_records=watch.steps,
        final_latents=final,
        attention=None if watch.attention is None else _attention_record(watch.attention, text, all_tokens),
        timings=timings,
        shapes={
            "token_ids": [1, len(text.ids)],
            "context": list(watch.context.shape),
            "latents": [1, *final.shape],
            "image": [1, len(image.getbands()), image.height, image.width],
        }
        | ({} if watch.vector is None else {"vector": [1, len(watch.vector)]}),
    )


def _request(prompt, negative_prompt, seed, steps, sampler, cfg_scale, width, height) -> GenerationRequest:
    """Batch size 1, no speed-ups; the settings left as None take the request's defaults."""
    given = {"steps": steps, "sampler": sampler, "guidance_scale": cfg_scale, "width": width, "height": height}
    chosen = {key: value for key, value in given.items() if value is not None}
    return GenerationRequest(prompt=prompt, negative_prompt=negative_prompt, seed=seed, batch_size=1, **chosen)


def _guidance_steps(steps: int, asked: Iterable[int] | None) -> set[int]:
    chosen = {0, steps // 2, steps - 1} if asked is None else set(asked)
    outside = sorted(i for i in chosen if not 0 <= i < steps)
    if outside:
        raise ValueError(f"guidance step {outside[0]} is not among the run's steps 0..{steps - 1}")
    return chosen


def _encoders(pipe: Pipeline) -> list[tuple]:
    """(tokenizer, text encoder) of each encoder the model has, in the order of the context's channels."""
    pairs = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
    return [(tokenizer, encoder) for tokenizer, encoder in pairs if encoder is not None]


def _hooks(pipe: Pipeline, watch: _Watch, clocks: dict[str, _Clock]) -> list[RemovableHandle]:
    """Every hook of one recorded run; the clocks' last, so that they time the forward alone."""
    encoders = [encoder for _, encoder in _encoders(pipe)]
    handles = [
        encoder.embeddings.register_forward_pre_hook(watch.embedding_input(n), with_kwargs=True)
        for n, encoder in enumerate(encoders)
    ]
    handles.append(pipe.unet.register_forward_pre_hook(watch.unet_starts))
    if watch.attention is not None:
        handles += watch.attention.hooks()
    handles.append(pipe.unet.register_forward_hook(watch.unet_done, with_kwargs=True))
    for encoder in encoders:  # from the embedding layer to the final norm, SD's pass and SDXL's alike
        handles += clocks["text_encoder"].hooks(encoder.embeddings, encoder.final_layer_norm)
    handles += clocks["unet"].hooks(pipe.unet)
    return handles + clocks["vae_decode"].hooks(pipe.vae.post_quant_conv, pipe.vae.decoder)


def _text_records(pipe: Pipeline, watch: _Watch) -> list[TextRecord]:
    """One record per text encoder; each one's output is its own channels of the context."""
    records, start = [], 0
    for n, (tokenizer, encoder) in enumerate(_encoders(pipe)):
        ids = [int(i) for i in watch.ids[n]]
        eos = tokenizer.eos_token_id
        length = ids.index(eos, 1) - 1 if eos in ids[1:] else len(ids) - 2
        vectors = watch.token_vectors[n]
        if vectors is None:
            vectors = encoder.embeddings.token_embedding.weight[watch.ids[n]].detach().float().cpu()
        width = encoder.cfg.width
        records.append(
            TextRecord(
                ids=ids,
                tokens=[tokenizer.id_to_token[i] for i in ids],
                prompt_length=length,
                token_embeddings=vectors,
                output=watch.context[0, : len(ids), start : start + width].clone(),
            )
        )
        start += width
    return records


def _attention_record(maps: CrossAttentionMaps, text: TextRecord, all_tokens: bool) -> AttentionRecord:
    positions = list(range(len(text.ids))) if all_tokens else list(range(1, 1 + text.prompt_length))
    return AttentionRecord(
        tokens=[text.tokens[p] for p in positions],
        positions=positions,
        maps=maps.maps()[positions],
        layers=len(maps.layers),
        steps=len(maps.counted_steps),
    )
