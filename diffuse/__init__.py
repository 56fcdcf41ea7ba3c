"""diffuse: Stable Diffusion from its parts."""
