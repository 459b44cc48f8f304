"""A trained run, loaded for inference: config, tokenizer, parameters and frozen networks.

Two sources: a training workdir (the latest or a chosen checkpoint, EMA or raw parameters), or
a directory written by ``export_run`` (``python -m ecdit_jax.export``: one set of parameters, no
optimizer state). ``load_run`` tells them apart by the export's ``export.json``. Only the
parameters are read, straight into their shards on the mesh given (FSDP / expert parallel), so a
model too large for one device still samples.

A run with a frozen pretrained text encoder or trained on VAE latents also loads the networks
its config names under ``config.pretrained`` (``frozen_networks``): the text encoder (whose
tokenizer is then the run's) and the VAE that turns sampled latents into images;
``pretrained_overrides`` point at other copies of them (weights that moved since training).
"""

from __future__ import annotations

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from etils import epath
from flax import nnx

from ecdit_jax import config as config_lib
from ecdit_jax.checkpoint import Checkpointer
from ecdit_jax.data import tokenizer as tokenizer_lib
from ecdit_jax.encoders import frozen
from ecdit_jax.errors import ConfigError
from ecdit_jax.fileio import write_atomic
from ecdit_jax.inference.sampler import make_sampler
from ecdit_jax.model import params as params_lib
from ecdit_jax.parallel import mesh as mesh_lib

# The files of a run directory (a training workdir or an export).
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"  # the run's own vocabulary (a scratch text encoder)
EXPORT_INFO = "export.json"  # written last: marks a complete export
EXPORT_PARAMS = "params"


@dataclasses.dataclass
class TrainedRun:
  config: config_lib.TrainConfig
  graphdef: nnx.GraphDef
  params: dict
  step: int
  tokenizer: object  # encode_batch(texts, max_len); None when a frozen encoder was not loaded
  null_tokens: object
  mesh: object = None  # the jax Mesh the parameters are laid out on; None: one device
  param_shardings: object = None
  text_encoder: object = None  # encoders.frozen.FrozenTextEncoder, or None (the model's own)
  vae: object = None  # encoders.frozen.FrozenVae decoding latents, or None

  @property
  def model_config(self):
    return self.config.model

  @property
  def image_size(self) -> int:
    """Pixels on a side of the images the run generates (the VAE's decodings on latents)."""
    factor = self.vae.downsample_factor if self.vae is not None else 1
    return self.config.model.image_size * factor


def is_export(path: str) -> bool:
  return (epath.Path(path) / EXPORT_INFO).exists()


def frozen_networks(cfg: config_lib.TrainConfig, overrides: dict[str, str] | None = None, *,
                    text_encoder: bool = True, vae: bool = True):
  """(text encoder or None, VAE or None) named by ``cfg.pretrained``, with the non-empty
  ``overrides`` ({"text_encoder": DIR, "vae": DIR}) in place of its directories. The text
  encoder is loaded only for a model without its own, the VAE only for a model on latents
  that names one; both stay on the host until placed."""
  pretrained = dataclasses.replace(
      cfg.pretrained, **{k: v for k, v in (overrides or {}).items() if v})
  model = cfg.model
  text = None
  if text_encoder and model.has_pretrained_text_encoder:
    text = frozen.load_frozen_text_encoder(model.text_encoder, pretrained.text_encoder,
                                           pretrained.dtype, model)
  decoder = None
  if vae and cfg.data.on_latents and pretrained.vae:
    decoder = frozen.load_frozen_vae(pretrained.vae, pretrained.dtype, model)
  return text, decoder


def read_config(path) -> config_lib.TrainConfig:
  """The TrainConfig of a run directory's config.json (older versions' files upgraded)."""
  saved = json.loads((epath.Path(path) / CONFIG_FILE).read_text())
  return config_lib.TrainConfig.from_mapping(config_lib.upgrade(saved))


def _mesh(mesh_config: mesh_lib.MeshConfig | None, cfg: config_lib.TrainConfig):
  if mesh_config is None:
    return None
  try:
    mesh = mesh_lib.create_mesh(mesh_config)
  except ConfigError as e:
    raise ConfigError(f"--mesh: {e}") from e
  experts = mesh.shape["expert"]
  if experts > 1 and cfg.model.num_experts % experts:
    raise ConfigError(f"--mesh: expert={experts} must divide the model's "
                      f"num_experts={cfg.model.num_experts}")
  return mesh


def _warn(line: str) -> None:
  print(f"warning: {line}", file=sys.stderr, flush=True)


class _Source:
  """Where a run's config and parameters are read: an export, or a workdir's checkpoint."""

  def __init__(self, path: str, step: int | None):
    if not epath.Path(path).exists():
      raise ConfigError(f"{path} does not exist")
    self.path = epath.Path(path)
    self.checkpointer = None
    if is_export(path):
      self.step = int(json.loads((self.path / EXPORT_INFO).read_text())["step"])
      if step is not None and step != self.step:
        raise ConfigError(f"{path} is an export of step {self.step}, not step {step}")
      self.config = read_config(path)
      return
    self.checkpointer = Checkpointer(path, read_only=True)
    self._chosen = step  # None: the newest readable step
    if step is not None:
      self.step = self.checkpointer.check_step(step)
      self.config = self._config(step)
      return
    found = self.checkpointer.read_newest(self._config, _warn)
    if found is None:
      raise ConfigError(f"no checkpoint in {self.checkpointer.directory}")
    self.step, self.config = found

  def _config(self, step):
    saved = self.checkpointer.restore_config(step)
    return config_lib.TrainConfig.from_mapping(config_lib.upgrade(saved))

  def params(self, layout_of, use_ema: bool):
    """(parameters, layout): ``layout_of(config)`` gives (the ShapeDtypeStructs to restore the
    parameters into, anything that goes with them)."""
    if self.checkpointer is None:
      target, layout = layout_of(self.config)
      with ocp.StandardCheckpointer() as reader:
        return reader.restore(self.path.absolute() / EXPORT_PARAMS, target), layout

    def read(step):
      config = self._config(step)
      target, layout = layout_of(config)
      return config, self.checkpointer.restore_params(step, target, use_ema=use_ema), layout

    try:
      if self._chosen is not None:
        _, params, layout = read(self.step)
        return params, layout
      self.step, (self.config, params, layout) = self.checkpointer.read_newest(read, _warn)
      return params, layout
    finally:
      self.checkpointer.close()


def _layout(cfg: config_lib.TrainConfig, mesh):
  """(restore target, (graphdef, shardings)) of ``cfg``'s parameters on ``mesh``; without a
  mesh, on this process's first device (whatever layout the checkpoint was saved in)."""
  graphdef, abstract = params_lib.abstract_params(cfg.model, mesh)
  if mesh is None:
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return mesh_lib.with_shardings(abstract, jax.tree.map(lambda _: one, abstract)), (graphdef,
                                                                                     None)
  shardings = params_lib.param_shardings(cfg.model, mesh)
  return mesh_lib.with_shardings(abstract, shardings), (graphdef, shardings)


def load_run(path: str, *, step: int | None = None, use_ema: bool = True,
             mesh_config: mesh_lib.MeshConfig | None = None,
             pretrained_overrides: dict[str, str] | None = None,
             load_pretrained: bool = True) -> TrainedRun:
  """The parameters of ``step`` (default: the latest checkpoint) of the run in ``path``, or
  those of an export (``step`` must then be None or the exported step), restored into their
  shards on the mesh of ``mesh_config`` (None: one device). ``load_pretrained=False`` loads
  no frozen network (for handling parameters only)."""
  source = _Source(path, step)
  mesh = _mesh(mesh_config, source.config)
  params, (graphdef, shardings) = source.params(lambda cfg: _layout(cfg, mesh), use_ema)
  cfg = source.config
  text_encoder, vae = (frozen_networks(cfg, pretrained_overrides) if load_pretrained
                       else (None, None))
  if cfg.model.has_pretrained_text_encoder:
    tokenizer = None if text_encoder is None else text_encoder.tokenizer
  else:
    tokenizer = tokenizer_lib.load_tokenizer(epath.Path(path) / TOKENIZER_FILE)
  null = None if tokenizer is None else tokenizer_lib.null_tokens(tokenizer,
                                                                  cfg.model.text_max_len)
  return TrainedRun(config=cfg, graphdef=graphdef, params=params, step=source.step,
                    tokenizer=tokenizer, null_tokens=null, mesh=mesh, param_shardings=shardings,
                    text_encoder=None if text_encoder is None else text_encoder.placed(mesh),
                    vae=None if vae is None else vae.placed(mesh))


def make_run_sampler(run: TrainedRun, *, decode_latents: bool = True, **kwargs):
  """``sampler.make_sampler`` for the run's parameters, on its mesh when it has one.

  A latent-space run's sampler decodes with the run's VAE (``decode_latents=False``: returns
  the latents); without a VAE that is an error naming the setting to give."""
  if decode_latents and run.config.data.on_latents and run.vae is None:
    raise ConfigError(
        "this run generates VAE latents and its config.pretrained.vae is empty: name the VAE "
        "directory (--pretrained_vae=DIR on the command line) to get images")
  return make_sampler(run.graphdef, run.model_config, param_shardings=run.param_shardings,
                      mesh=run.mesh, text_encoder=run.text_encoder,
                      vae=run.vae if decode_latents else None, **kwargs)


def export_run(workdir: str, out: str, *, step: int | None = None, use_ema: bool = True,
               dtype: str | None = None, mesh_config: mesh_lib.MeshConfig | None = None,
               write_files: bool = True) -> int:
  """Writes ``workdir``'s parameters (EMA by default; ``dtype``: cast floating ones, e.g.
  "bfloat16") with its config and tokenizer to the new directory ``out``; returns the step.
  With ``mesh_config`` the parameters are restored into their shards on that mesh and saved
  from there (every process of a pod takes part; ``write_files`` in one of them writes the
  small files). Never overwrites: ``out`` must not exist or be empty."""
  target = epath.Path(out)
  if target.exists() and any(target.iterdir()):
    raise ConfigError(f"--out={out} is not empty; exports never overwrite")
  if is_export(workdir):
    raise ConfigError(f"--workdir={workdir} is already an export")
  if jax.process_count() > 1:  # every process has checked before any of them writes
    multihost_utils.sync_global_devices("ecdit_jax export: target checked")
  # The frozen pretrained networks stay where the config names them: not part of an export.
  run = load_run(workdir, step=step, use_ema=use_ema, mesh_config=mesh_config,
                 load_pretrained=False)
  params = run.params
  if dtype is not None:
    params = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                          else x, params)
  target.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as writer:
    writer.save(target.absolute() / EXPORT_PARAMS, params)
  if not write_files:
    return run.step
  write_atomic(target / CONFIG_FILE, json.dumps(run.config.to_dict(), indent=2))
  tokenizer = epath.Path(workdir) / TOKENIZER_FILE
  if tokenizer.exists():  # absent when the run's text encoder is a frozen pretrained one
    write_atomic(target / TOKENIZER_FILE, tokenizer.read_bytes())
  write_atomic(target / EXPORT_INFO, json.dumps(
      {"step": run.step, "parameters": "ema" if use_ema else "raw", "dtype": dtype}, indent=2))
  return run.step


def read_prompts(path: str) -> list[str]:
  """One prompt per non-empty line of a text file."""
  if not epath.Path(path).exists():
    raise ConfigError(f"--prompts={path}: no such file")
  prompts = [line.strip() for line in epath.Path(path).read_text().splitlines() if line.strip()]
  if not prompts:
    raise ConfigError(f"--prompts={path} holds no prompts")
  return prompts
