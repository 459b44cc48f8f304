"""Inference: a trained run loaded for sampling, the sampler, images out, evaluation drivers."""
