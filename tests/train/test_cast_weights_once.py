"""config.cast_weights_once: the weights cast to the compute dtype once a step, before the
micro-batches, train exactly as when every micro-batch casts them, and the step's program casts
no weight inside its accumulation loop. The sampler casts once, before its ODE steps, and
samples the same images."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ecdit_jax import config as config_lib
from ecdit_jax.inference.sampler import make_sampler
from ecdit_jax.model.layer_stacking import params_for_compute
from ecdit_jax.model.params import init_params
from ecdit_jax.train.optimizer import make_optimizer
from ecdit_jax.train.state import abstract_train_state, create_train_state
from ecdit_jax.train.step import make_train_step
from tests.tiny import perturbed, tiny_model_config, tiny_train_config


def _config(cast_weights_once, scan_layers):
  return config_lib.TrainConfig.from_mapping(tiny_train_config(
      "", cast_weights_once=cast_weights_once, grad_accum_steps=2, batch_size=8,
      **{"model.dtype": "bfloat16", "model.scan_layers": scan_layers, "model.num_layers": 4,
         "model.image_size": 16, "model.text_max_len": 8}))


def _batch(config, seed):
  rng = np.random.default_rng(seed)
  return {"image": rng.uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32),
          "tokens": rng.integers(3, 40, (8, config.model.text_max_len)).astype(np.int32)}


def _null(length):
  null = np.zeros(length, np.int32)
  null[0] = 1
  return null


def _train(cast_weights_once, scan_layers, steps=2):
  config = _config(cast_weights_once, scan_layers)
  optimizer = make_optimizer(config)
  graphdef, state = create_train_state(config.model, optimizer, config.seed)
  state = state.replace(params=perturbed(state.params))  # every branch live from the start
  null = _null(config.model.text_max_len)
  step = jax.jit(make_train_step(graphdef, config, optimizer, null, masked=True))
  for i in range(steps):
    state, metrics = step(state, _batch(config, i))
    assert not np.any(metrics["nonfinite"])
  return state


@pytest.mark.slow  # trains: CI runs it, the fast lane skips it
@pytest.mark.parametrize("scan_layers", [False, True])
def test_casting_once_a_step_trains_bit_for_bit_as_casting_in_every_micro_batch(scan_layers):
  want = _train(False, scan_layers)
  got = _train(True, scan_layers)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w),
                                  err_msg=jax.tree_util.keystr(path))


def _equations(jaxpr):
  """Every equation of ``jaxpr`` and of the jaxprs nested in it, outermost first."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub, _ in _nested(eqn):
      yield from _equations(sub)


def _nested(eqn):
  """(jaxpr, how many of its leading inputs are ``eqn``'s leading inputs unchanged) for each
  jaxpr nested in ``eqn``: a loop's constants, or all inputs of a call (remat, pjit, custom
  gradients)."""
  for key, value in eqn.params.items():
    for sub in value if isinstance(value, (list, tuple)) else (value,):
      sub = getattr(sub, "jaxpr", sub)
      if not hasattr(sub, "eqns"):
        continue
      if eqn.primitive.name == "scan":
        yield sub, eqn.params["num_consts"]
      elif key == "body_jaxpr":
        yield sub, 0  # a while loop's body: its constants follow the condition's
      elif len(sub.invars) == len(eqn.invars):
        yield sub, len(sub.invars)
      else:
        yield sub, 0


def _casts_of_inputs(jaxpr, inputs, dtype):
  """Shapes of ``inputs`` (variables of ``jaxpr``, or passed unchanged into the jaxprs nested in
  it) that an equation converts from float32 to ``dtype``."""
  found = set()
  for eqn in jaxpr.eqns:
    if (eqn.primitive.name == "convert_element_type" and eqn.params["new_dtype"] == dtype
        and eqn.invars[0] in inputs and eqn.invars[0].aval.dtype == jnp.float32):
      found.add(eqn.invars[0].aval.shape)
    for sub, unchanged in _nested(eqn):
      passed = {inner for outer, inner in zip(eqn.invars[:unchanged], sub.invars)
                if not hasattr(outer, "val") and outer in inputs}
      found |= _casts_of_inputs(sub, passed, dtype)
  return found


def _weights_cast_in_first_loop(fn, args, params, dtype=jnp.bfloat16):
  """(shapes of the weights that the first ``scan`` of ``fn`` casts to ``dtype`` in its body,
  shapes of all the weights that the model computes with in ``dtype``). The loop's constants
  are what it may cast: the weights enter it as constants, in float32 or already cast."""
  weights = {x.shape for x, c in zip(jax.tree.leaves(params),
                                     jax.tree.leaves(jax.eval_shape(
                                         lambda p: params_for_compute(p, dtype), params)))
             if c.dtype != x.dtype}
  loop = next(e for e in _equations(jax.make_jaxpr(fn)(*args).jaxpr)
              if e.primitive.name == "scan")
  body = loop.params["jaxpr"].jaxpr
  cast = _casts_of_inputs(body, set(body.invars[:loop.params["num_consts"]]), dtype)
  return cast & weights, weights


@pytest.mark.parametrize("scan_layers", [False, True])
def test_the_micro_batch_loop_casts_no_weight_when_cast_once(scan_layers):
  for once in (True, False):
    config = _config(once, scan_layers)
    optimizer = make_optimizer(config)
    graphdef, state = abstract_train_state(config.model, optimizer, config.seed)
    null = _null(config.model.text_max_len)
    step = make_train_step(graphdef, config, optimizer, null, masked=True)
    cast, weights = _weights_cast_in_first_loop(step, (state, _batch(config, 0)), state.params)
    assert weights and cast == (set() if once else weights), once


def _sampler_inputs(config):
  graphdef, params = init_params(config, seed=0)
  tokens = np.random.default_rng(0).integers(3, 40, (2, config.text_max_len)).astype(np.int32)
  return graphdef, perturbed(params), tokens, _null(config.text_max_len)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_the_sampler_casts_the_weights_before_its_ode_steps_and_samples_the_same(
    scan_layers, monkeypatch):
  config = tiny_model_config(dtype="bfloat16", num_layers=4, scan_layers=scan_layers)
  graphdef, params, tokens, null = _sampler_inputs(config)
  settings = dict(num_steps=3, cfg_scale=3.0, method="euler")
  sampler = make_sampler(graphdef, config, **settings)
  args = (params, None, None, tokens, null, np.uint32(0), np.arange(2, dtype=np.int32))
  cast, weights = _weights_cast_in_first_loop(sampler.jitted, args, params)
  assert weights and not cast
  dit_weights = _weights_cast_in_first_loop(sampler.jitted, args, {"dit": params["dit"]})[1]
  images = sampler(params, tokens, null, seed=0)

  # The same sampler casting inside each ODE step, as the model does at use: the same images.
  monkeypatch.setattr("ecdit_jax.inference.sampler.params_for_compute", lambda p, dtype: p)
  uncast = make_sampler(graphdef, config, **settings)
  cast, _ = _weights_cast_in_first_loop(uncast.jitted, args, params)
  assert cast == dit_weights  # the text is encoded once, before the ODE steps, either way
  np.testing.assert_array_equal(images, uncast(params, tokens, null, seed=0))
