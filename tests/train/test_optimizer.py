"""Learning-rate schedules: warmup, then constant or a decay to zero at the last step."""

import math

import ml_collections
import pytest

from ecdit_jax.train.optimizer import learning_rate_schedule


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
