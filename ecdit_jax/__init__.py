"""ecdit_jax: expert-choice diffusion transformers (EC-DiT) in JAX/Flax NNX."""

__version__ = "0.1.0"
