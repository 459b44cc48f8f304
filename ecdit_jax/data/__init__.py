"""Data: the GenEval-Shapes generator and TFDS builder, the tokenizer and the grain pipeline.

The bottom of the package's import graph: nothing here imports other ecdit_jax packages. The
submodules are imported explicitly (``from ecdit_jax.data import pipeline``) so that using the
generator alone does not pay for importing TFDS and grain.
"""
