r"""The paper's model sizes on the embedded data: ``configs/ecdit.py:PRESET[,runlocal]``.

PRESET is SIZE-<E>E or SIZE-dense with SIZE in S, B, XL, XXL, 3XL, M and E in 8, 16, 32, 64
(ecdit_jax/model/presets.py), e.g. XL-32E. Patch 2 on 32x32 inputs gives the paper's 256
tokens; optimisation follows the paper (RMSProp with momentum, lr 1e-4, 20K warmup). Run with:

  python -m ecdit_jax.main --config=configs/ecdit.py:XL-32E --workdir=workdirs/xl32e

``runlocal`` keeps the preset's structure (layout, router, expert count) but shrinks width and
depth and the step counts so the config runs on a laptop:

  python -m ecdit_jax.main --config=configs/ecdit.py:XL-32E,runlocal --workdir=/tmp/xl32e
"""

import ml_collections

from configs import default
from ecdit_jax.config import config_dict
from ecdit_jax.model.presets import model_overrides


def get_config(arg: str = "XL-8E") -> ml_collections.ConfigDict:
  preset, *flags = [part.strip() for part in arg.split(",")]
  unknown = set(flags) - {"runlocal"}
  if unknown:
    raise ValueError(f"unknown config flag(s) {sorted(unknown)} in {arg!r}; only 'runlocal'")
  config = config_dict()
  config.model.update(model_overrides(preset))
  # GenEval-Shapes captions: a small vocabulary and short prompts (the text encoder is the
  # default scratch one).
  config.model.update(text_vocab_size=128, text_max_len=16)
  config.batch_size = 256
  config.num_train_steps = 400_000
  config.learning_rate = 1e-4
  config.warmup_steps = 20_000
  config.diffusion.mask_ratio = 0.5
  config.checkpoint_every_steps = 5_000
  config.sample_every_steps = 10_000
  if "runlocal" in flags:
    config.model.update(hidden_size=64, num_layers=2, num_heads=2, dtype="float32",
                        text_hidden_size=32, text_num_layers=1, text_num_heads=2)
    default.runlocal_schedule(config)
    config.data.num_train = 512
    config.data.num_test = 64
  return config
