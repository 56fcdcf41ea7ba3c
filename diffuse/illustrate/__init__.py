"""diffuse illustrate: the figures of "The Illustrated Stable Diffusion", drawn from a live run."""
