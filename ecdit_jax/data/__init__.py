"""Data: the GenEval-Shapes generator and TFDS builder, the tokenizer and the grain pipeline.

Near the bottom of the package's import graph: nothing here imports other ecdit_jax packages
(only the leaf modules ``ecdit_jax.errors`` and ``ecdit_jax.fileio``). The
submodules are imported explicitly (``from ecdit_jax.data import pipeline``) so that using the
generator alone does not pay for importing TFDS and grain.
"""
