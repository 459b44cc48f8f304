r"""The embedded default on one GPU: the same tiny EC-DiT, fed as fast as the data can go.

The model is the default one (configs/default.py); what changes is the batch (512), the data
pipeline (12 worker processes decode and batch; one process feeds a GPU at ~2.6K images/s),
and a cosine learning-rate decay to zero at the last step, so that a fixed budget of steps
ends on a settled model. Run it with:

  python -m ecdit_jax.main --config=configs/shapes_gpu.py --workdir=workdirs/shapes_gpu

Set ``--config.data.worker_count`` to about the number of CPU cores left free. Scores and times
measured with this config are in docs/REPRODUCTION.md.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.batch_size = 512
  config.data.worker_count = 12
  config.num_train_steps = 13_000
  config.learning_rate = 4e-4
  config.warmup_steps = 500
  config.lr_decay = "cosine"
  config.log_every_steps = 500
  config.checkpoint_every_steps = 2_000
  config.sample_every_steps = 4_000
  config.eval_every_steps = 4_000
  config.eval = ml_collections.ConfigDict(dict(num_per_category=50, batch_size=300))
  return config
