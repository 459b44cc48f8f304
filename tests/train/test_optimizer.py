"""The optimizer against independent references (optax's RMSProp, and NumPy for the whole
chain with clipping and weight decay), its schedules, and the momentum trace's dtype."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ecdit_jax.config import TrainConfig
from ecdit_jax.errors import ConfigError
from ecdit_jax.train.optimizer import learning_rate_schedule, make_optimizer


def _config(decay="none", **overrides):
  values = dict(learning_rate=2e-3, warmup_steps=100, num_train_steps=1100, lr_decay=decay)
  return TrainConfig(**{**values, **overrides})


def _gradients(count, shape=(8, 16)):
  return [{"w": jax.random.normal(jax.random.key(i), shape),
           "b": 0.1 * jax.random.normal(jax.random.key(100 + i), shape[-1:])}
          for i in range(count)]


def _apply(optimizer, params, grads):
  state = optimizer.init(params)
  for g in grads:
    updates, state = optimizer.update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params


def test_without_clipping_or_decay_it_is_optax_rmsprop_with_momentum():
  cfg = _config(warmup_steps=3, grad_clip_norm=0.0, weight_decay=0.0)
  params = {"w": jnp.ones((8, 16)), "b": jnp.zeros((16,))}
  grads = _gradients(12)
  reference = optax.rmsprop(learning_rate_schedule(cfg), decay=cfg.rmsprop_decay,
                            eps=cfg.rmsprop_eps, momentum=cfg.momentum)
  got, want = _apply(make_optimizer(cfg), params, grads), _apply(reference, params, grads)
  for key in params:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7)


def test_the_whole_chain_matches_numpy():
  """clip by global norm -> RMS scaling -> decoupled weight decay -> learning rate -> momentum,
  written out in float64 from the formulas."""
  cfg = _config(warmup_steps=4, grad_clip_norm=0.5, weight_decay=0.1, rmsprop_decay=0.9,
                momentum=0.8)
  params = {"w": jnp.linspace(-1.0, 1.0, 128).reshape(8, 16), "b": jnp.full((16,), 0.3)}
  grads = _gradients(9)
  got = _apply(make_optimizer(cfg), params, grads)

  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  nu = {k: np.zeros_like(v) for k, v in p.items()}
  trace = {k: np.zeros_like(v) for k, v in p.items()}
  for step, g in enumerate(grads):
    g = {k: np.asarray(v, np.float64) for k, v in g.items()}
    norm = math.sqrt(sum(float(np.sum(v * v)) for v in g.values()))
    scale = min(1.0, cfg.grad_clip_norm / norm)
    lr = cfg.learning_rate * min(step / cfg.warmup_steps, 1.0)
    for k in p:
      clipped = g[k] * scale
      nu[k] = cfg.rmsprop_decay * nu[k] + (1 - cfg.rmsprop_decay) * clipped**2
      update = clipped / np.sqrt(nu[k] + cfg.rmsprop_eps) + cfg.weight_decay * p[k]
      trace[k] = -lr * update + cfg.momentum * trace[k]
      p[k] = p[k] + trace[k]
  for k in p:
    np.testing.assert_allclose(got[k], p[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("decay", ["none", "cosine", "linear"])
def test_warmup_is_linear_from_zero(decay):
  schedule = learning_rate_schedule(_config(decay))
  assert float(schedule(0)) == 0.0
  assert float(schedule(50)) == pytest.approx(1e-3)
  assert float(schedule(100)) == pytest.approx(2e-3)


def test_decays_follow_their_formulas_and_end_at_zero():
  cosine = learning_rate_schedule(_config("cosine"))
  linear = learning_rate_schedule(_config("linear"))
  constant = learning_rate_schedule(_config("none"))
  for step in (100, 350, 600, 1000, 1100):
    progress = (step - 100) / 1000
    assert float(cosine(step)) == pytest.approx(1e-3 * (1 + math.cos(math.pi * progress)),
                                                abs=1e-9)
    assert float(linear(step)) == pytest.approx(2e-3 * (1 - progress), abs=1e-9)
    assert float(constant(step)) == pytest.approx(2e-3)
  assert float(cosine(1100)) == pytest.approx(0.0, abs=1e-12)


def test_bfloat16_momentum_keeps_its_trace_in_bfloat16_and_tracks_float32():
  params = {"w": jnp.linspace(-1.0, 1.0, 4096).reshape(64, 64)}
  grads = [jax.random.normal(jax.random.key(i), (64, 64)) for i in range(20)]
  finals = {}
  for dtype in ("float32", "bfloat16"):
    optimizer = make_optimizer(TrainConfig(momentum_dtype=dtype, warmup_steps=0))
    state = optimizer.init(params)
    updates = None
    for g in grads:
      updates, state = optimizer.update({"w": g}, state, params)
    traces = [leaf for leaf in jax.tree.leaves(state) if leaf.shape == (64, 64)]
    assert {str(t.dtype) for t in traces} == {"float32", dtype}  # the RMS moment, the trace
    finals[dtype] = np.asarray(updates["w"], np.float32)
  # bfloat16 keeps 8 bits of mantissa: the updates agree to within its rounding.
  np.testing.assert_allclose(finals["bfloat16"], finals["float32"], rtol=2e-2,
                             atol=2e-2 * np.abs(finals["float32"]).max())


@pytest.mark.parametrize("key, value", [("lr_decay", "exponential"), ("momentum_dtype", "float16")])
def test_unknown_settings_name_the_key(key, value):
  with pytest.raises(ConfigError, match=f"config.{key}='{value}'"):
    TrainConfig(**{key: value})
