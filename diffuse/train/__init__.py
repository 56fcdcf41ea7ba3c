"""Training diffuse's own small default model from scratch, on a world of captioned scenes: the
shapes (diffuse.shapes, the default) or the emoji (diffuse.emoji), as a stage config's data names.

loop.py, state.py, log.py       the shared loop: AdamW with warmup and cosine, checkpoints that
                                resume bit for bit, one log line per step
distributed.py, prefetch.py,    data-parallel processes, batches made ahead by workers, the
ema.py                          moving average of the weights
objectives.py                   the three losses
stages/                         vae, clip, unet: one module per stage, each a config and a run
presets.py, config_files.py     the architectures (tiny, emoji); training configs read from JSON
worlds.py                       the world a config's data section names, and its dataset
components.py                   the finished component a stage leaves (final.*), read back
assemble.py, unpack.py          finished stages -> a model folder, and back
__main__.py                     python -m diffuse.train {vae,clip,unet} (`diffuse train`)
"""
