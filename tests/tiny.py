"""The tiny models and training runs of the tests: the one place their sizes are written.

``tiny_model_config`` is a ModelConfig small enough for exact checks of the model's paths;
``tiny_train_config`` and ``tiny_train_flags`` are the same CPU-sized training run, as a
ConfigDict for in-process tests and as ``--config.KEY=VALUE`` flags for the command-line tools.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import default
from ecdit_jax.model import ModelConfig, TextToImageDiT

# The model of the training tests, on the default config's 32x32 GenEval-Shapes images.
TRAIN_MODEL = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
               "num_experts": 4, "text_hidden_size": 16, "text_num_layers": 1,
               "text_num_heads": 2}
# The run: a few steps of batch 8 on 96 images, logging every step.
TRAIN_RUN = {"data.num_train": 96, "data.num_test": 16, "batch_size": 8, "num_train_steps": 6,
             "warmup_steps": 2, "log_every_steps": 1, "checkpoint_every_steps": 3,
             "sample_every_steps": 0, "eval_every_steps": 0, "sample.num_steps": 2}


def tiny_model_config(**overrides) -> ModelConfig:
  """16x16 images of 16 tokens, 2 blocks (the second MoE), 4 experts, float32."""
  base = dict(image_size=16, in_channels=3, patch_size=4, hidden_size=32, num_layers=2,
              num_heads=4, num_kv_heads=2, num_experts=4, capacity_factor=2.0,
              eval_capacity_factor=2.0, text_vocab_size=50, text_max_len=8,
              text_hidden_size=16, text_num_layers=1, text_num_heads=2, dtype="float32")
  base.update(overrides)
  return ModelConfig(**base)


def _train_overrides(overrides) -> dict:
  return {**{f"model.{k}": v for k, v in TRAIN_MODEL.items()}, **TRAIN_RUN, **overrides}


def tiny_train_config(data_dir: str, **overrides):
  """configs/default.py with the tiny model and run; ``overrides`` by dotted key."""
  config = default.get_config()
  for key, value in _train_overrides({"data.data_dir": data_dir, **overrides}).items():
    *parents, leaf = key.split(".")
    target = config
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


def tiny_train_flags(**overrides) -> list[str]:
  """The same run as ``--config.KEY=VALUE`` flags of ``python -m ecdit_jax.main``."""
  return [f"--config.{k}={v}" for k, v in _train_overrides(overrides).items()]


def perturbed(params, seed: int = 1, scale: float = 0.05):
  """Params plus small noise: zero-initialised branches (adaLN-Zero gates, cross-attention and
  final projections) become live, so that a check exercises every path of the model."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(
      treedef, [p + scale * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])


def dit_runs_by(key: str, values=("xla", "pallas_interpret")) -> dict:
  """The tiny DiT built with each value of model key ``key`` from the same parameters (perturbed:
  every branch live): value -> (pallas_call count of its loss, loss, parameter gradients) on one
  batch. The parameter trees must match: such keys never change a checkpoint."""
  base = tiny_model_config()
  models = {v: TextToImageDiT(dataclasses.replace(base, **{key: v}), rngs=nnx.Rngs(0))
            for v in values}
  params = perturbed(nnx.state(models[values[0]], nnx.Param), scale=0.02)
  keys = jax.random.split(jax.random.key(2), 3)
  size, channels = base.image_size, base.in_channels
  x = jax.random.normal(keys[0], (2, size, size, channels))
  t = jax.random.uniform(keys[1], (2,))
  tokens = jax.random.randint(keys[2], (2, base.text_max_len), 2, base.text_vocab_size)
  runs = {}
  for value, model in models.items():
    assert jax.tree.structure(nnx.state(model, nnx.Param)) == jax.tree.structure(params)
    graphdef, rest = nnx.graphdef(model), nnx.state(model, nnx.Not(nnx.Param))

    def loss(p, graphdef=graphdef, rest=rest):
      pred, _ = nnx.merge(graphdef, p, rest)(x, t, tokens)
      return jnp.mean(jnp.square(pred - x))
    calls = str(jax.make_jaxpr(loss)(params)).count("pallas_call")
    runs[value] = (calls, *jax.jit(jax.value_and_grad(loss))(params))
  return runs


def value_and_grads(fn, *args_and_cotangent):
  """fn(*args) and the gradients of <fn(*args), cotangent> with respect to each argument, as one
  tuple: a kernel's outputs and its backward pass, to compare with a reference's."""
  *args, cotangent = args_and_cotangent
  y, vjp = jax.vjp(fn, *args)
  return (y, *vjp(cotangent))


def assert_same_loss_and_grads(got, want, rtol=2e-3, atol=2e-6) -> None:
  """Two ``dit_runs_by`` entries agree: loss to 1e-5, every gradient within the tolerances."""
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5)
  for g, w in zip(jax.tree.leaves(got[2]), jax.tree.leaves(want[2])):
    np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)
