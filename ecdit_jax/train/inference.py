"""Loading a trained run for inference: config, tokenizer and (EMA) parameters.

Two sources: a training workdir (the latest or a chosen checkpoint, EMA or raw parameters), or
a directory written by ``python -m ecdit_jax.export`` (one set of parameters, no optimizer
state). ``load_run`` tells them apart by the export's ``export.json``. Given a mesh, the
parameters are restored straight into their shards (FSDP / expert parallel), so a model too
large for one device can still sample; ``make_run_sampler`` then samples on that mesh.

A run with a frozen pretrained text encoder or trained on VAE latents also loads the networks
its config names under ``config.pretrained``: the text encoder (whose tokenizer is then the
run's) and the VAE that turns sampled latents into images. ``pretrained_overrides`` points at
other copies of them (weights that moved since training).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from ecdit_jax.data.tokenizer import Tokenizer, load_tokenizer
from ecdit_jax.model import ConfigError, ModelConfig
from ecdit_jax.parallel import mesh as mesh_lib
from ecdit_jax.train import input_pipeline, pretrained, sharding
from ecdit_jax.train.checkpoint import Checkpointer
from ecdit_jax.train.input_pipeline import TOKENIZER_FILE, null_tokens
from ecdit_jax.train.optimizer import make_optimizer
from ecdit_jax.train.sampling import make_sampler
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
  mesh: object = None  # the jax Mesh the parameters are laid out on; None: one device
  param_shardings: object = None
  text_encoder: object = None  # text_conditioning.FrozenTextEncoder, or None (the model's own)
  vae: object = None  # pretrained.FrozenVae decoding latents, or None

  @property
  def on_latents(self) -> bool:
    return input_pipeline.model_on_latents(self.config)


EXPORT_INFO = "export.json"
EXPORT_PARAMS = "params"


def is_export(path: str) -> bool:
  return (epath.Path(path) / EXPORT_INFO).exists()


def parse_mesh(text: str) -> dict[str, int] | None:
  """``"expert=2,fsdp=2"`` -> mesh sizes (axes left out are 1, ``data`` fills the rest unless
  given); ``""`` -> None (one device)."""
  if not text:
    return None
  sizes = {axis: 1 for axis in mesh_lib.MESH_AXES}
  sizes["data"] = -1
  for item in text.split(","):
    axis, _, value = item.partition("=")
    axis = axis.strip()
    if axis not in mesh_lib.MESH_AXES or not value.strip().lstrip("-").isdigit():
      raise ConfigError(f"--mesh={text!r}: expected axis=size pairs over {mesh_lib.MESH_AXES}")
    sizes[axis] = int(value)
  return sizes


def make_mesh(sizes: dict[str, int] | None, model_config: ModelConfig):
  """The inference mesh for ``sizes`` (None -> None), checked against the model."""
  if sizes is None:
    return None
  try:
    mesh = mesh_lib.create_mesh(sizes)
  except mesh_lib.MeshConfigError as e:
    raise ConfigError(f"--mesh={sizes}: {e}") from e
  experts = mesh.shape["expert"]
  if experts > 1 and model_config.num_experts % experts:
    raise ConfigError(f"--mesh: expert={experts} must divide the model's "
                      f"num_experts={model_config.num_experts}")
  return mesh


def _load_export(path: str, mesh_sizes) -> TrainedRun:
  root = epath.Path(path)
  info = json.loads((root / EXPORT_INFO).read_text())
  config = ml_collections.ConfigDict(json.loads((root / "config.json").read_text()))
  model_config = ModelConfig.from_mapping(config.model)
  graphdef, abstract = abstract_train_state(model_config, make_optimizer(config), config.seed)
  mesh = make_mesh(mesh_sizes, model_config)
  target, param_shardings = abstract.params, None
  if mesh is not None:
    param_shardings = sharding.param_shardings(model_config, mesh)
    target = sharding.with_shardings(abstract.params, param_shardings)
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(root.absolute() / EXPORT_PARAMS, target)
  return TrainedRun(config=config, model_config=model_config, graphdef=graphdef, params=params,
                    step=int(info["step"]), tokenizer=None, null_tokens=None, mesh=mesh,
                    param_shardings=param_shardings)


def _with_pretrained(run: TrainedRun, tokenizer_dir, overrides, load: bool) -> TrainedRun:
  """The run with its frozen networks (none unless ``load``) and its tokenizer: the pretrained
  encoder's (None when not loaded), or the one its directory holds (trained with the model)."""
  text_encoder = vae = None
  if load:
    text_encoder = pretrained.load_text_encoder(run.config, run.model_config, overrides)
    vae = pretrained.load_vae(run.config, run.model_config, overrides)
  if run.model_config.has_pretrained_text_encoder:
    tokenizer = None if text_encoder is None else text_encoder.tokenizer
  else:
    tokenizer = load_tokenizer(epath.Path(tokenizer_dir) / TOKENIZER_FILE)
  return dataclasses.replace(
      run, tokenizer=tokenizer,
      null_tokens=None if tokenizer is None else null_tokens(tokenizer,
                                                              run.model_config.text_max_len),
      text_encoder=None if text_encoder is None else text_encoder.placed(run.mesh),
      vae=None if vae is None else vae.placed(run.mesh))


def load_run(workdir: str, *, step: int | None = None, use_ema: bool = True,
             mesh_sizes: dict[str, int] | None = None,
             pretrained_overrides: dict[str, str] | None = None,
             load_pretrained: bool = True) -> TrainedRun:
  """The parameters of ``step`` (default: the latest checkpoint) of the run in ``workdir``, or
  those of an exported directory (``step`` must then be None or the exported step).

  With ``mesh_sizes`` (see ``parse_mesh``) the parameters are restored into their shards on
  that mesh. ``pretrained_overrides`` ({"text_encoder": DIR, "vae": DIR}, empty values
  ignored) replace the weights directories of the run's ``config.pretrained``;
  ``load_pretrained=False`` loads none of those networks (for handling parameters only)."""
  if is_export(workdir):
    run = _load_export(workdir, mesh_sizes)
    if step is not None and step != run.step:
      raise ValueError(f"{workdir} is an export of step {run.step}, not step {step}")
    return _with_pretrained(run, workdir, pretrained_overrides, load_pretrained)
  checkpointer = Checkpointer(workdir, async_save=False)
  try:
    step = checkpointer.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}")
    config = ml_collections.ConfigDict(checkpointer.restore_config(step))
    model_config = ModelConfig.from_mapping(config.model)
    graphdef, abstract = abstract_train_state(model_config, make_optimizer(config), config.seed)
    mesh = make_mesh(mesh_sizes, model_config)
    shardings = None
    if mesh is not None:
      shardings = sharding.state_shardings(abstract, model_config, mesh)
      abstract = sharding.with_shardings(abstract, shardings)
    state = checkpointer.restore(step, abstract)
  finally:
    checkpointer.close()
  param_shardings = None
  if shardings is not None:
    param_shardings = shardings.ema_params if use_ema else shardings.params
  run = TrainedRun(config=config, model_config=model_config, graphdef=graphdef,
                   params=state.ema_params if use_ema else state.params, step=step,
                   tokenizer=None, null_tokens=None, mesh=mesh, param_shardings=param_shardings)
  return _with_pretrained(run, workdir, pretrained_overrides, load_pretrained)


def make_run_sampler(run: TrainedRun, *, decode_latents: bool = True, **kwargs):
  """``make_sampler`` for the run's parameters, on its mesh when it has one.

  A latent-space run's sampler decodes with the run's VAE (``decode_latents=False``: returns
  the latents); without a VAE that is an error naming the setting to give."""
  vae = run.vae if decode_latents else None
  if decode_latents and run.on_latents and vae is None:
    raise ConfigError(
        "this run generates VAE latents and its config.pretrained.vae is empty: name the VAE "
        "directory (--pretrained_vae=DIR on the command line) to get images")
  return make_sampler(run.graphdef, run.model_config, param_shardings=run.param_shardings,
                      mesh=run.mesh, text_encoder=run.text_encoder, vae=vae, **kwargs)


def on_mesh(run: TrainedRun):
  """The context to call a run's sampler in: ``jax.set_mesh`` of its mesh, or nothing."""
  return contextlib.nullcontext() if run.mesh is None else jax.set_mesh(run.mesh)


def read_prompts(path: str) -> list[str]:
  """One prompt per non-empty line of a text file."""
  prompts = [line.strip() for line in epath.Path(path).read_text().splitlines() if line.strip()]
  if not prompts:
    raise ValueError(f"{path} holds no prompts")
  return prompts
