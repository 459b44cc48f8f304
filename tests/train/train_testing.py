"""A CPU-sized training config shared by the training tests."""

from configs import default


def tiny_train_config(data_dir: str, **overrides):
  config = default.get_config()
  config.model.update(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, num_experts=4,
                      text_hidden_size=16, text_num_layers=1, text_num_heads=2, text_max_len=12)
  config.data.update(data_dir=data_dir, num_train=96, num_test=16)
  config.batch_size = 8
  config.num_train_steps = 6
  config.warmup_steps = 2
  config.log_every_steps = 1
  config.checkpoint_every_steps = 3
  config.sample_every_steps = 0
  config.sample.num_steps = 2
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config
