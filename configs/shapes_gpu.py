r"""The embedded default on one GPU: the same tiny EC-DiT, fed and dispatched as fast as it trains.

The model is the default one (configs/default.py) computing in bfloat16; what changes is the
batch (512), the data (decoded once into host memory, ``data.cache_in_memory``, since one
process decodes far fewer images a second than the GPU trains on), ten steps per jitted call
(``steps_per_call``: dispatching one step of this small model costs the host more than the GPU's
work on it), and a cosine learning-rate decay to zero at the last step, so that the fixed budget
of steps ends on a settled model. Run it with:

  python -m ecdit_jax.main --config=configs/shapes_gpu.py --workdir=workdirs/shapes_gpu

Scores and times measured with this config are in docs/REPRODUCTION.md.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model.dtype = "bfloat16"
  config.batch_size = 512
  config.data.cache_in_memory = True
  config.data.worker_count = 12  # used when streaming (cache_in_memory=False)
  config.steps_per_call = 10
  config.num_train_steps = 32_000
  config.learning_rate = 4e-4
  config.warmup_steps = 500
  config.lr_decay = "cosine"
  config.log_every_steps = 500
  config.checkpoint_every_steps = 2_000
  config.sample_every_steps = 8_000
  config.eval_every_steps = 8_000
  config.eval = ml_collections.ConfigDict(dict(num_per_category=50, batch_size=300))
  return config
