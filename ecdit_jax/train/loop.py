"""The training loop: ``train_and_evaluate(config, workdir)``.

Resumes from the latest checkpoint in ``workdir`` if there is one (model, optimizer, RNG and
data position), so a restarted or extended run (``--config.num_train_steps=N``) continues
exactly where it stopped. SIGTERM (e.g. a preempted TPU VM) saves a checkpoint and returns.
"""

from __future__ import annotations

import io
import json
import math
import signal
import threading

import jax
import ml_collections
import numpy as np
from etils import epath
from PIL import Image

from ecdit_jax.model import ConfigError, ModelConfig
from ecdit_jax.parallel import mesh as mesh_lib
from ecdit_jax.train import sharding
from ecdit_jax.train import geneval, input_pipeline, pretrained, text_conditioning
from ecdit_jax.train.checkpoint import Checkpointer, check_same_model
from ecdit_jax.train.metrics import MetricWriter, Progress, log_line, name_moe_layers
from ecdit_jax.train.optimizer import LR_DECAYS, MOMENTUM_DTYPES, make_optimizer
from ecdit_jax.train.profiling import ProfileWindow
from ecdit_jax.train.sampling import make_sampler, sample_grid, to_uint8
from ecdit_jax.train.state import TrainState, abstract_train_state
from ecdit_jax.train.step import make_train_step


def validate_config(config: ml_collections.ConfigDict):
  """Fails at start, naming the key, for values that cannot work."""
  model_config = ModelConfig.from_mapping(config.model)

  def check(ok, message):
    if not ok:
      raise ConfigError(message)

  for key in ("batch_size", "num_train_steps", "grad_accum_steps", "log_every_steps",
              "checkpoint_every_steps", "keep_checkpoints"):
    check(isinstance(config[key], int) and config[key] >= 1,
          f"config.{key}={config[key]!r} must be a positive integer")
  per_process, rest = divmod(config.batch_size, jax.process_count())
  check(rest == 0, f"config.batch_size={config.batch_size} must be divisible by the "
                   f"{jax.process_count()} processes")
  check(per_process % config.grad_accum_steps == 0,
        f"config.batch_size={config.batch_size} per process must be divisible by "
        f"config.grad_accum_steps={config.grad_accum_steps}")
  if model_config.routing_group_size > 1:
    micro = per_process // config.grad_accum_steps
    check(micro % model_config.routing_group_size == 0,
          f"config.model.routing_group_size={model_config.routing_group_size} must divide the "
          f"micro-batch of {micro} images")
  check(config.learning_rate > 0, f"config.learning_rate={config.learning_rate} must be > 0")
  check(config.warmup_steps >= 0, f"config.warmup_steps={config.warmup_steps} must be >= 0")
  check(config.get("lr_decay", "none") in LR_DECAYS,
        f"config.lr_decay={config.get('lr_decay')!r} must be one of {LR_DECAYS}")
  check(config.get("momentum_dtype", "float32") in MOMENTUM_DTYPES,
        f"config.momentum_dtype={config.get('momentum_dtype')!r} must be one of "
        f"{MOMENTUM_DTYPES}")
  check(0 <= config.ema_decay < 1, f"config.ema_decay={config.ema_decay} must be in [0, 1)")
  check(config.nonfinite_loss in ("stop", "skip"),
        f"config.nonfinite_loss={config.nonfinite_loss!r} must be 'stop' or 'skip'")
  check(0 <= config.diffusion.mask_ratio < 1,
        f"config.diffusion.mask_ratio={config.diffusion.mask_ratio} must be in [0, 1)")
  check(0 <= config.diffusion.caption_dropout <= 1,
        f"config.diffusion.caption_dropout={config.diffusion.caption_dropout} must be in [0, 1]")
  check(config.diffusion.timestep_scale > 0,
        f"config.diffusion.timestep_scale={config.diffusion.timestep_scale} must be > 0")
  check(config.sample.method in ("euler", "heun"),
        f"config.sample.method={config.sample.method!r} must be 'euler' or 'heun'")
  check(isinstance(config.eval_every_steps, int) and config.eval_every_steps >= 0,
        f"config.eval_every_steps={config.eval_every_steps!r} must be an integer >= 0")
  check(not config.eval_every_steps or config.data.dataset == "geneval_shapes",
        f"config.eval_every_steps={config.eval_every_steps} scores GenEval-Shapes prompts, but "
        f"config.data.dataset={config.data.dataset!r}; set it to 0")
  check(config.eval.num_per_category >= 1 and config.eval.batch_size >= 1,
        "config.eval.num_per_category and config.eval.batch_size must be >= 1")
  per_call = config.steps_per_call
  check(isinstance(per_call, int) and per_call >= 1,
        f"config.steps_per_call={per_call!r} must be a positive integer")
  for key in ("log_every_steps", "checkpoint_every_steps", "sample_every_steps",
              "eval_every_steps"):
    check(config[key] % per_call == 0,
          f"config.{key}={config[key]} must be a multiple of config.steps_per_call={per_call}")
  for key in ("num_steps", "skip_steps"):
    value = config.profile[key]
    check(isinstance(value, int) and value >= 0,
          f"config.profile.{key}={value!r} must be an integer >= 0")
  pretrained.check_config(config, model_config)
  mesh = mesh_lib.create_mesh(config.mesh)
  n_expert = mesh.shape["expert"]
  check(model_config.moe_layout == "none" or model_config.num_experts % n_expert == 0,
        f"config.model.num_experts={model_config.num_experts} must be divisible by "
        f"config.mesh.expert={n_expert}")
  shards = math.prod(mesh.shape[a] for a in mesh_lib.batch_axes(mesh))
  check(config.batch_size % (shards * config.grad_accum_steps) == 0,
        f"config.batch_size={config.batch_size} must be divisible by config.grad_accum_steps="
        f"{config.grad_accum_steps} x the {shards} batch shards of the mesh (config.mesh)")
  return model_config, mesh


class _StopRequest:
  """Turns SIGTERM into a flag the loop checks between steps (main thread only)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def config_as_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def _restore_or_init(config, model_config, optimizer, checkpointer, iterator, workdir, mesh):
  """The train state laid out on the mesh: initialised in place, or restored sharded."""
  latest = checkpointer.latest_step()
  if latest is None:
    graphdef, state, shardings = sharding.init_train_state(model_config, optimizer, config.seed,
                                                           mesh)
    if jax.process_index() == 0:
      (epath.Path(workdir) / "config.json").write_text(json.dumps(config_as_dict(config),
                                                                  indent=2))
    return graphdef, state, shardings
  for change in check_same_model(checkpointer.restore_config(latest), config_as_dict(config)):
    log_line(f"resuming with {change}")
  graphdef, abstract = abstract_train_state(model_config, optimizer, config.seed)
  shardings = sharding.state_shardings(abstract, model_config, mesh)
  state = checkpointer.restore(latest, sharding.with_shardings(abstract, shardings), iterator)
  log_line(f"resumed from step {latest} in {checkpointer.directory}")
  return graphdef, state, shardings


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  model_config, mesh = validate_config(config)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  source = input_pipeline.data_source(config, "train")
  input_pipeline.check_latent_shape(config, source)
  # The VAE decodes samples and, with config.data.vae_encode, encodes the training images.
  encodes_images = bool(config.data.get("vae_encode", False))
  needs_vae = encodes_images or config.sample_every_steps or config.eval_every_steps
  frozen = _Frozen(pretrained.load_text_encoder(config, model_config),
                   pretrained.load_vae(config, model_config) if needs_vae else None, mesh,
                   encodes_images)
  if frozen.text_encoder is None:
    tokenizer = input_pipeline.tokenizer_for(config, workdir, source)
    input_pipeline.check_tokenizer_fits(tokenizer, model_config)
  else:  # the pretrained encoder's vocabulary; nothing to train or copy into the workdir
    tokenizer = frozen.text_encoder.tokenizer
  null_tokens = input_pipeline.null_tokens(tokenizer, model_config.text_max_len)
  iterator = input_pipeline.train_iterator(
      config, source, tokenizer, vae_factor=frozen.vae.downsample_factor if encodes_images else 1)
  optimizer = make_optimizer(config)
  checkpointer = Checkpointer(workdir, max_to_keep=config.keep_checkpoints)
  try:
    graphdef, state, shardings = _restore_or_init(config, model_config, optimizer,
                                                  checkpointer, iterator, workdir, mesh)
    with jax.set_mesh(mesh):
      return _train(config, model_config, workdir, graphdef, state, shardings, mesh, optimizer,
                    iterator, checkpointer, tokenizer, null_tokens, frozen)
  finally:
    checkpointer.close()  # waits for an async save: a finished run leaves complete checkpoints


class _Frozen:
  """The frozen networks replicated on the mesh: the text encoder (batch encoding, the null
  caption's encoding) and the VAE (decoding samples; encoding the batch's images when
  ``encodes_images``); either may be None. Only the replicated copies are kept."""

  def __init__(self, text_encoder, vae, mesh, encodes_images: bool = False):
    self.null_context = None
    self.text_encoder = None if text_encoder is None else text_encoder.placed(mesh)
    self.vae = None if vae is None else vae.placed(mesh)
    stages = []
    if self.text_encoder is not None:
      with jax.set_mesh(mesh):
        self.null_context = self.text_encoder.null_caption()
      stages.append(text_conditioning.make_batch_encoder(self.text_encoder, mesh))
    if encodes_images:
      stages.append(pretrained.make_image_encoder(self.vae, mesh))
    self._stages = stages

  def encode_batch(self, batch: dict) -> dict:
    for stage in self._stages:
      batch = stage(batch)
    return batch


def _train(config, model_config, workdir, graphdef, state, shardings, mesh, optimizer, iterator,
           checkpointer, tokenizer, null_tokens, frozen) -> TrainState:
  start, total = int(state.step), config.num_train_steps
  if start >= total:
    log_line(f"step {start} >= config.num_train_steps={total}: nothing to train")
    return state
  # A frozen text encoder turns the batch's tokens into context before the step (encode_batch).
  batch_ranks = (text_conditioning.CONTEXT_BATCH_RANKS if frozen.text_encoder is not None
                 else sharding.TOKEN_BATCH_RANKS)
  train_steps = {masked: make_train_step(graphdef, model_config, config, optimizer, null_tokens,
                                         masked=masked, null_context=frozen.null_context)
                 for masked in {False, config.diffusion.mask_ratio > 0}}
  # steps[masked, stacked]: one step a call, or a scan over stacked batches (steps_per_call > 1).
  per_call = config.steps_per_call
  steps = {(masked, stacked): sharding.jit_train_step(fn, shardings, mesh, batch_ranks,
                                                      stacked=stacked)
           for masked, fn in train_steps.items() for stacked in {False, per_call > 1}}
  stack = sharding.make_batch_stacker(mesh, batch_ranks) if per_call > 1 else None
  unmasked_from = total - config.diffusion.unmasked_final_steps
  sampler = None
  if config.sample_every_steps or config.eval_every_steps:
    sampler = make_sampler(graphdef, model_config, num_steps=config.sample.num_steps,
                           cfg_scale=config.sample.cfg_scale, method=config.sample.method,
                           param_shardings=shardings.ema_params, mesh=mesh,
                           text_encoder=frozen.text_encoder, vae=frozen.vae)
    prompt_tokens = tokenizer.encode_batch(list(config.sample.prompts), model_config.text_max_len)
  writer = MetricWriter(workdir)
  progress = Progress(start, total, config.batch_size)
  config_dict = config_as_dict(config)
  losses, skipped_records, skipped_updates = [], 0, 0
  pending = None  # (first step number, metrics): checked one call late to keep the device busy
  profile = ProfileWindow(workdir, start + config.profile.skip_steps, config.profile.num_steps)

  def check(first_step, metrics):
    nonlocal skipped_updates
    losses.extend(np.atleast_1d(np.asarray(metrics["loss"])).tolist())
    for index in np.flatnonzero(np.atleast_1d(np.asarray(metrics["nonfinite"]))):
      if config.nonfinite_loss == "stop":
        raise FloatingPointError(
            f"non-finite loss or gradient at step {first_step + index}; stopping "
            f"(config.nonfinite_loss='stop'). Checkpoints already saved are untouched; the "
            f"latest is step {checkpointer.latest_step()}.")
      skipped_updates += 1
      log_line(f"step {first_step + index}: non-finite loss or gradient, update skipped")

  with _StopRequest() as stop:
    step = start
    while step < total:
      profile.before_step(step)
      count = _steps_in_call(step, total, per_call, unmasked_from)
      batches = []
      for _ in range(count):
        batch = next(iterator)
        skipped_records += int(batch.pop("num_skipped"))
        batches.append(frozen.encode_batch(sharding.global_batch(batch, mesh)))
      masked = config.diffusion.mask_ratio > 0 and step < unmasked_from
      if count == 1:
        state, metrics = steps[masked, False](state, batches[0])
      else:  # metrics come stacked over the call's steps
        state, metrics = steps[masked, True](state, stack(batches))
      if pending is not None:
        check(*pending)
      pending = (step + 1, metrics)
      step = done = step + count
      profile.after_step(done, state)

      if done % config.log_every_steps == 0 or done == total:
        check(*pending)
        pending = None
        rates = progress.update(done)
        if count > 1:  # the call's last step speaks for it
          metrics = jax.tree.map(lambda x: x[-1], metrics)
        scalars = {"loss": float(np.mean(losses)), "aux_loss": float(metrics["aux_loss"]),
                   "grad_norm": float(metrics["grad_norm"]),
                   "learning_rate": float(metrics["learning_rate"]),
                   "skipped_records": skipped_records, "skipped_updates": skipped_updates,
                   **rates}
        scalars.update({f"routing/{k}": v for k, v in
                        name_moe_layers(metrics["moe"], model_config.moe_layer_indices).items()})
        writer.write_scalars(done, scalars)
        log_line(Progress.line(done, total, scalars["loss"], rates))
        losses.clear()

      if config.sample_every_steps and done % config.sample_every_steps == 0:
        _write_samples(sampler, state, prompt_tokens, null_tokens, config, workdir, writer, done)
      if config.eval_every_steps and done % config.eval_every_steps == 0:
        result = geneval.geneval_shapes_score(
            sampler, state.ema_params, tokenizer, null_tokens, model_config.text_max_len,
            num_per_category=config.eval.num_per_category, seed=config.seed,
            batch_size=config.eval.batch_size)
        writer.write_scalars(done, geneval.as_scalars(result))
        log_line(f"step {done}: GenEval-Shapes {result['overall']:.3f} (EMA, "
                 f"{config.eval.num_per_category} prompts a category)")

      if done % config.checkpoint_every_steps == 0 or done == total or stop.requested:
        if pending is not None:  # never save a state that has not been checked
          check(*pending)
          pending = None
        checkpointer.save(done, state, iterator, config_dict, force=True)
      if stop.requested:
        log_line(f"SIGTERM: saved step {done}, exiting")
        break
  profile.stop(done, state)  # a window cut short by the end of the run or SIGTERM
  writer.close()
  return state


def _steps_in_call(step: int, total: int, per_call: int, unmasked_from: int) -> int:
  """Steps the call starting at ``step`` runs: up to the next multiple of ``per_call`` (where
  logging, checkpoints and evaluation fall), never past the end or the switch to unmasked
  steps. A run resumed off a multiple, or one that unmasks off a multiple, realigns."""
  count = min(per_call - step % per_call, total - step)
  if step < unmasked_from:
    count = min(count, unmasked_from - step)
  return count


def _write_samples(sampler, state, prompt_tokens, null_tokens, config, workdir, writer, step):
  images = to_uint8(sampler(state.ema_params, prompt_tokens, null_tokens, config.seed))
  # Small images are enlarged to cells of at least 128 pixels; decoded latents keep their size.
  grid = sample_grid(images, list(config.sample.prompts), scale=max(1, 128 // images.shape[2]))
  if jax.process_index() == 0:
    outdir = epath.Path(workdir) / "samples"
    outdir.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    Image.fromarray(grid).save(png, format="PNG")
    (outdir / f"step_{step:07d}.png").write_bytes(png.getvalue())
    (outdir / f"step_{step:07d}.txt").write_text("\n".join(config.sample.prompts) + "\n")
    writer.write_image(step, "samples", grid)
