"""FLUX.1-Fill model loading (local path or tiny preset), latent/mask packing and prompt encoding."""
