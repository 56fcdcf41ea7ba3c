"""The three training stages, one module each, in the order they run: vae, clip, unet."""
