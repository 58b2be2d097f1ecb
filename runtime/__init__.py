"""Runtime: the public Animator API, backend registry, portrait cache, denoising loop, stream pipeline."""
