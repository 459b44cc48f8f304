"""Everything a training run needs, built from its config: ``build(cfg, workdir) -> Run``.

The mesh, the dataset and tokenizer, the frozen networks (replicated on the mesh), the train
state (initialised in its shards, or restored from the latest checkpoint into them), the
jitted step calls, the batches from the state's step on, the sampler, the metric writer and
the checkpointer. The loop (``train/loop.py``) only drives them.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
from etils import epath

from ecdit_jax.checkpoint import Checkpointer, check_same_data_order, check_same_model
from ecdit_jax.config import TrainConfig, upgrade
from ecdit_jax.data import batch as batch_keys
from ecdit_jax.data import sources
from ecdit_jax.data import tokenizer as tokenizer_lib
from ecdit_jax.encoders import frozen
from ecdit_jax.fileio import write_atomic
from ecdit_jax.inference import geneval
from ecdit_jax.inference.run import CONFIG_FILE, frozen_networks
from ecdit_jax.inference.sampler import make_sampler
from ecdit_jax.parallel import mesh as mesh_lib
from ecdit_jax.train import hooks, input as input_lib, sharding
from ecdit_jax.train.metrics import MetricWriter, log_line
from ecdit_jax.train.optimizer import make_optimizer
from ecdit_jax.train.profiling import ProfileWindow
from ecdit_jax.train.state import abstract_train_state
from ecdit_jax.train.step import make_train_step


class FrozenStages:
  """The frozen networks on the mesh and what they do to each host batch before the step: the
  text encoder turns tokens into context, the VAE (with ``data.vae_encode``) pixels into
  latents. With ``data.cached_context`` the batches carry context already and no text encoder
  is kept: one is loaded only to encode ``config.sample.prompts`` once.

  ``encoded_text``: batches reach the step as context; ``null_context``: the empty caption's
  (context, length) for caption dropout; ``sampler_text``: what the sampler encodes prompts
  with (a FrozenTextEncoder, a PrecomputedContext, or None for the model's own encoder)."""

  def __init__(self, cfg: TrainConfig, mesh):
    cached = cfg.data.cached_context
    samples = bool(cfg.sample_every_steps or cfg.eval_every_steps)
    text, vae = frozen_networks(cfg, text_encoder=not cached or samples,
                                vae=cfg.data.vae_encode or samples)
    self.vae = None if vae is None else vae.placed(mesh)
    self.encoded_text = cfg.model.has_pretrained_text_encoder
    self.null_context, self.sampler_text, self._stages = None, None, []
    if cached:
      self.null_context = input_lib.cached_context(cfg)
      if text is not None:
        table = frozen.PrecomputedContext.of(text.placed(mesh), _prompts_sampled(cfg))
        self.sampler_text = table.placed(mesh)
    elif text is not None:
      encoder = text.placed(mesh)
      self.null_context, self.sampler_text = encoder.null_caption(), encoder
      self._stages.append(frozen.make_batch_encoder(encoder, mesh))
    if cfg.data.vae_encode:
      self._stages.append(frozen.make_image_encoder(self.vae, mesh))

  def __call__(self, batch: dict) -> dict:
    for stage in self._stages:
      batch = stage(batch)
    return batch


def _prompts_sampled(cfg: TrainConfig) -> list[str]:
  """Every prompt the run's sample grids and evaluations encode."""
  prompts = list(cfg.sample.prompts) if cfg.sample_every_steps else []
  if cfg.eval_every_steps:
    prompts += geneval.evaluation_captions(cfg.eval.num_per_category)
  return list(dict.fromkeys(prompts))


def steps_in_call(cfg: TrainConfig, step: int) -> int:
  """Steps of the call starting at ``step``: up to the next multiple of ``steps_per_call``
  (where logging, checkpoints and evaluation fall), never past the end or the switch to
  unmasked steps. A run resumed off a multiple, or one that unmasks off one, realigns."""
  count = min(cfg.steps_per_call - step % cfg.steps_per_call, cfg.num_train_steps - step)
  if step < cfg.unmasked_from:
    count = min(count, cfg.unmasked_from - step)
  return count


class StepCalls:
  """The jitted train step: one step a call, or ``steps_per_call`` as a scan over batches
  stacked on the devices; masked until ``config.unmasked_from``, unmasked after."""

  def __init__(self, cfg: TrainConfig, graphdef, shardings, mesh, optimizer, null_tokens,
               stages: FrozenStages):
    self._cfg, self._mesh, self._stages = cfg, mesh, stages
    ranks = batch_keys.ranks(encoded_text=stages.encoded_text)
    stacked_too = {False, cfg.steps_per_call > 1}
    self._calls = {}
    for masked in {False, cfg.diffusion.mask_ratio > 0}:
      step = make_train_step(graphdef, cfg, optimizer, null_tokens, masked=masked,
                             null_context=stages.null_context)
      for stacked in stacked_too:
        self._calls[masked, stacked] = sharding.jit_train_step(step, shardings, mesh, ranks,
                                                               stacked=stacked)
    self._stack = sharding.make_batch_stacker(mesh, ranks) if cfg.steps_per_call > 1 else None

  def __call__(self, state, step: int, host_batches: list[dict]):
    batches = [self._stages(sharding.global_batch(b, self._mesh)) for b in host_batches]
    masked = step < self._cfg.unmasked_from
    if len(batches) == 1:
      return self._calls[masked, False](state, batches[0])
    return self._calls[masked, True](state, self._stack(batches))  # metrics stacked by step


@dataclasses.dataclass
class Run:
  config: TrainConfig
  workdir: str
  state: Any
  calls: StepCalls
  batches: Any  # iterator of host batches from the state's step on
  log: hooks.MetricsLog
  actions: list  # called after every call: sample grids, evaluation
  profile: ProfileWindow
  checkpointer: Checkpointer
  writer: MetricWriter
  data_order: dict

  def next_batches(self, count: int) -> list[dict]:
    batches = [next(self.batches) for _ in range(count)]
    for batch in batches:
      self.log.skipped_records += int(batch.pop(batch_keys.NUM_SKIPPED))
    return batches

  def save(self, step: int, state) -> None:
    self.log.flush()  # never save a state whose metrics were not checked
    self.checkpointer.save(step, state, self.config.to_dict(), self.data_order)
    log_line(f"step {step}: saving a checkpoint in {self.checkpointer.directory / str(step)}")

  def close(self) -> None:
    close = getattr(self.batches, "close", None)
    if close is not None:
      close()
    self.writer.close()
    self.checkpointer.close()  # waits for an async save: a finished run leaves it complete


def _restore_or_init(cfg: TrainConfig, workdir: str, checkpointer: Checkpointer, optimizer, mesh,
                     data_order: dict):
  """(graphdef, state, shardings): the newest readable checkpoint restored into the state's
  shards, or a state initialised in them when there is none."""
  graphdef, abstract = abstract_train_state(cfg.model, optimizer, cfg.seed, mesh)
  shardings = sharding.state_shardings(abstract, cfg.model, mesh, cfg.host_offloaded,
                                       cfg.mesh.param_rules())
  target = mesh_lib.with_shardings(abstract, shardings)

  def read(step):
    changes = check_same_model(upgrade(checkpointer.restore_config(step)), cfg.to_dict())
    check_same_data_order(checkpointer.restore_data_order(step), data_order)
    return changes, checkpointer.restore(step, target)

  found = checkpointer.read_newest(read, report=log_line, set_aside=True)
  if found is None:
    _, state, _ = sharding.init_train_state(cfg.model, optimizer, cfg.seed, mesh,
                                           cfg.host_offloaded, cfg.mesh.param_rules())
    if jax.process_index() == 0:
      write_atomic(epath.Path(workdir) / CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2))
    return graphdef, state, shardings
  step, (changes, state) = found
  for change in changes:
    log_line(f"resuming with {change}")
  log_line(f"resumed from step {step} in {checkpointer.directory}")
  return graphdef, state, shardings


def _tokenizers(cfg: TrainConfig, workdir: str, source, stages: FrozenStages):
  """(the data pipeline's tokenizer, or None when the batches carry encoded captions; the
  sample prompts' tokenizer and empty caption, or None when the run does not sample)."""
  if cfg.data.cached_context:
    table = stages.sampler_text
    return None, (None if table is None else (table.rows, table.null_row))
  if stages.sampler_text is not None:  # the pretrained encoder's vocabulary
    tok = stages.sampler_text.tokenizer
  else:
    tok = input_lib.tokenizer_for(cfg, workdir, source, jax.process_index())
    input_lib.check_tokenizer_fits(tok, cfg.model)
  return tok, (tok, tokenizer_lib.null_tokens(tok, cfg.model.text_max_len))


def build(cfg: TrainConfig, workdir: str) -> Run:
  mesh = mesh_lib.create_mesh(cfg.mesh)
  stages = FrozenStages(cfg, mesh)
  vae_factor = stages.vae.downsample_factor if cfg.data.vae_encode else 1
  # Images encoded as they are read are image_size x the VAE's factor pixels (GenEval-Shapes is
  # generated at that size).
  source = sources.open_source(cfg.data, "train", image_size=cfg.model.image_size * vae_factor)
  input_lib.check_latent_shape(cfg, source)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # once the inputs are known to work
  tokenizer, prompt_text = _tokenizers(cfg, workdir, source, stages)
  null_tokens = None if tokenizer is None else prompt_text[1]
  optimizer = make_optimizer(cfg)
  checkpointer = Checkpointer(workdir, max_to_keep=cfg.keep_checkpoints)
  data_order = input_lib.data_order(cfg, source)
  graphdef, state, shardings = _restore_or_init(cfg, workdir, checkpointer, optimizer, mesh,
                                                data_order)
  start = int(state.step)
  batches = input_lib.train_batches(
      cfg, source, tokenizer, start_step=start, process_index=jax.process_index(),
      process_count=jax.process_count(), vae_factor=vae_factor)
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
  actions = []
  if cfg.sample_every_steps or cfg.eval_every_steps:
    sampler = make_sampler(graphdef, cfg.model, num_steps=cfg.sample.num_steps,
                           cfg_scale=cfg.sample.cfg_scale, method=cfg.sample.method,
                           param_shardings=shardings.ema_params, mesh=mesh,
                           text_encoder=stages.sampler_text, vae=stages.vae)
    actions = [hooks.SampleGrids(cfg, sampler, *prompt_text, workdir, writer,
                                 write_files=jax.process_index() == 0),
               hooks.Evaluation(cfg, sampler, *prompt_text, writer)]
  return Run(config=cfg, workdir=workdir, state=state,
             calls=StepCalls(cfg, graphdef, shardings, mesh, optimizer, null_tokens, stages),
             batches=batches,
             log=hooks.MetricsLog(cfg, writer, start, checkpointer.latest_step),
             actions=actions,
             profile=ProfileWindow(workdir, start + cfg.profile.skip_steps, cfg.profile.num_steps),
             checkpointer=checkpointer, writer=writer, data_order=data_order)
