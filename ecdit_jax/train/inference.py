"""Loading a trained run for inference: config, tokenizer and (EMA) parameters.

Two sources: a training workdir (the latest or a chosen checkpoint, EMA or raw parameters), or
a directory written by ``python -m ecdit_jax.export`` (one set of parameters, no optimizer
state). ``load_run`` tells them apart by the export's ``export.json``.
"""

from __future__ import annotations

import dataclasses
import json

import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from ecdit_jax.data.tokenizer import Tokenizer, load_tokenizer
from ecdit_jax.model import ModelConfig
from ecdit_jax.train.checkpoint import Checkpointer
from ecdit_jax.train.input_pipeline import TOKENIZER_FILE, null_tokens
from ecdit_jax.train.optimizer import make_optimizer
from ecdit_jax.train.state import abstract_train_state


@dataclasses.dataclass
class TrainedRun:
  config: ml_collections.ConfigDict
  model_config: ModelConfig
  graphdef: nnx.GraphDef
  params: dict
  step: int
  tokenizer: Tokenizer
  null_tokens: object


EXPORT_INFO = "export.json"
EXPORT_PARAMS = "params"


def is_export(path: str) -> bool:
  return (epath.Path(path) / EXPORT_INFO).exists()


def _load_export(path: str) -> TrainedRun:
  root = epath.Path(path)
  info = json.loads((root / EXPORT_INFO).read_text())
  config = ml_collections.ConfigDict(json.loads((root / "config.json").read_text()))
  model_config = ModelConfig.from_mapping(config.model)
  graphdef, abstract = abstract_train_state(model_config, make_optimizer(config), config.seed)
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(root.absolute() / EXPORT_PARAMS, abstract.params)
  tokenizer = load_tokenizer(root / TOKENIZER_FILE)
  return TrainedRun(config=config, model_config=model_config, graphdef=graphdef, params=params,
                    step=int(info["step"]), tokenizer=tokenizer,
                    null_tokens=null_tokens(tokenizer, model_config.text_max_len))


def load_run(workdir: str, *, step: int | None = None, use_ema: bool = True) -> TrainedRun:
  """The parameters of ``step`` (default: the latest checkpoint) of the run in ``workdir``, or
  those of an exported directory (``step`` must then be None or the exported step)."""
  if is_export(workdir):
    run = _load_export(workdir)
    if step is not None and step != run.step:
      raise ValueError(f"{workdir} is an export of step {run.step}, not step {step}")
    return run
  checkpointer = Checkpointer(workdir, async_save=False)
  try:
    step = checkpointer.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}")
    config = ml_collections.ConfigDict(checkpointer.restore_config(step))
    model_config = ModelConfig.from_mapping(config.model)
    graphdef, abstract = abstract_train_state(model_config, make_optimizer(config), config.seed)
    state = checkpointer.restore(step, abstract)
  finally:
    checkpointer.close()
  tokenizer = load_tokenizer(epath.Path(workdir) / TOKENIZER_FILE)
  return TrainedRun(config=config, model_config=model_config, graphdef=graphdef,
                    params=state.ema_params if use_ema else state.params, step=step,
                    tokenizer=tokenizer,
                    null_tokens=null_tokens(tokenizer, model_config.text_max_len))


def read_prompts(path: str) -> list[str]:
  """One prompt per non-empty line of a text file."""
  prompts = [line.strip() for line in epath.Path(path).read_text().splitlines() if line.strip()]
  if not prompts:
    raise ValueError(f"{path} holds no prompts")
  return prompts
