"""Learning-rate schedules (warmup, then constant or a decay to zero at the last step) and the
momentum trace's dtype."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ecdit_jax.train.optimizer import learning_rate_schedule, make_optimizer


def _config(decay):
  return ml_collections.ConfigDict(dict(learning_rate=2e-3, warmup_steps=100,
                                        num_train_steps=1100, lr_decay=decay))


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


def test_unknown_decay_names_the_key():
  with pytest.raises(ValueError, match="config.lr_decay"):
    learning_rate_schedule(_config("exponential"))


def _momentum_config(dtype):
  from configs import default  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  config.momentum_dtype = dtype
  config.warmup_steps = 0
  return config


def test_bfloat16_momentum_keeps_its_trace_in_bfloat16_and_tracks_float32():
  params = {"w": jnp.linspace(-1.0, 1.0, 4096).reshape(64, 64)}
  grads = [jax.random.normal(jax.random.key(i), (64, 64)) for i in range(20)]
  finals = {}
  for dtype in ("float32", "bfloat16"):
    optimizer = make_optimizer(_momentum_config(dtype))
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


def test_unknown_momentum_dtype_names_the_key():
  with pytest.raises(ValueError, match="config.momentum_dtype='float16'"):
    make_optimizer(_momentum_config("float16"))


def test_training_refuses_an_unknown_momentum_dtype_at_start():
  from ecdit_jax.model import ConfigError  # pylint: disable=import-outside-toplevel
  from ecdit_jax.train.loop import validate_config  # pylint: disable=import-outside-toplevel
  with pytest.raises(ConfigError, match="config.momentum_dtype='float16'"):
    validate_config(_momentum_config("float16"))
