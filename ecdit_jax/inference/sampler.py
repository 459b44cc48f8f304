"""Text-to-image sampling: prompts' tokens + seeded noise -> images, one jitted function.

The prompt and the null text are encoded once; every ODE step then runs the DiT on the
conditional and unconditional halves in one batch (classifier-free guidance). Routing is per
image (by default), so an image depends only on its own prompt and noise, never on what else
is in the batch. The same sampler serves training's sample grids and evaluations, the sampling
tools and the routing analysis, which asks it for the experts each token got at every step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ecdit_jax.diffusion.samplers import cfg_velocity_fn, sample
from ecdit_jax.encoders.frozen import shardings_of
from ecdit_jax.model.config import ModelConfig
from ecdit_jax.model.layer_stacking import params_for_compute
from ecdit_jax.parallel import mesh as mesh_lib


def generate(model, tokens: jax.Array, null_tokens: jax.Array, noise: jax.Array, *,
             num_steps: int, cfg_scale: float, method: str = "euler",
             capacity_factor: float | None = None,
             encode_text: Callable[[jax.Array], tuple[jax.Array, jax.Array]] | None = None,
             step_outputs: Callable[[dict], object] | None = None):
  """Integrates the model's velocity from noise (t=1) to an image (t=0).

  Args:
    model: a TextToImageDiT (``encode_text`` and ``dit``).
    tokens: (B, L) prompt tokens; null_tokens: (L,) the empty caption's tokens.
    noise: (B, H, W, C) starting noise.
    capacity_factor: expert-choice capacity at inference; None uses the config's eval value.
    encode_text: tokens (B, L) -> (context (B, L, width), lengths (B,)); default
      ``model.encode_text``. A frozen pretrained encoder outside the model goes here.
    step_outputs: ``step_outputs(aux, B)``, called at every step on the model's aux of the
      doubled batch (the B conditional rows first); what it returns is stacked over the steps
      and returned beside the samples.
  Returns:
    (B, H, W, C) float32 samples, nominally in [-1, 1]; with ``step_outputs``, (samples,
    stacked outputs).
  """
  encode_text = model.encode_text if encode_text is None else encode_text
  context, lengths = encode_text(tokens)
  null_context, null_lengths = encode_text(jnp.broadcast_to(null_tokens, tokens.shape))
  batch = tokens.shape[0]

  def model_fn(x, t, cond):
    velocity, aux = model.dit(x, t, *cond, train=False, capacity_factor=capacity_factor)
    return velocity if step_outputs is None else (velocity, step_outputs(aux, batch))

  velocity_fn = cfg_velocity_fn(model_fn, (context, lengths), (null_context, null_lengths),
                                cfg_scale, with_outputs=step_outputs is not None)
  return sample(velocity_fn, noise.astype(jnp.float32), num_steps, method=method,
                with_outputs=step_outputs is not None)


def make_sampler(graphdef: nnx.GraphDef, model_config: ModelConfig, *, num_steps: int,
                 cfg_scale: float, method: str, capacity_factor: float | None = None,
                 param_shardings=None, mesh=None, text_encoder=None, vae=None,
                 record_routing: bool = False):
  """sampler(params, tokens, null_tokens, seed, first_index) -> (B, H, W, C) float32.

  Image ``first_index + i`` of a run is drawn from noise keyed by (seed, first_index + i), so a
  prompt's image does not depend on how prompts are batched. With ``param_shardings`` and
  ``mesh`` the parameters stay in their shards; prompts and images are replicated.

  ``text_encoder`` (an ``encoders.frozen.FrozenTextEncoder``) encodes the prompts for a model
  without its own text encoder; ``vae`` (``encoders.frozen.FrozenVae``) decodes the sampled
  latents of a latent-space model, and the sampler then returns images (B, h f, w f, 3)
  nominally in [-1, 1]. Both networks' parameters are arguments of the jitted function, not
  constants of it (pass them already placed on the mesh: ``encoders.frozen.place``).
  ``record_routing``: the sampler returns (images, experts per token (steps, MoE layers, B,
  tokens) int32) of the conditional half.
  """
  shape = (model_config.image_size, model_config.image_size, model_config.in_channels)
  jit_kwargs = {}
  if mesh is not None:
    whole = NamedSharding(mesh, PartitionSpec())
    frozen = [whole if net is None else shardings_of(net.params) for net in (text_encoder, vae)]
    jit_kwargs = dict(in_shardings=(param_shardings, *frozen, whole, whole, whole, whole),
                      out_shardings=whole)
  # token_counts: (MoE layers, 2B, tokens); the conditional half comes first.
  step_outputs = (lambda aux, b: aux["token_counts"][:, :b]) if record_routing else None

  @functools.partial(jax.jit, **jit_kwargs)
  def run(params, text_params, vae_params, tokens, null_tokens, seed, indices):
    # Parameters kept in host memory (a run's offloaded EMA) are moved to the devices first;
    # the weights are cast to the compute dtype once, not in every ODE step.
    model = nnx.merge(graphdef, params_for_compute(mesh_lib.to_device_memory(params),
                                                   model_config.compute_dtype))
    seed_key = jax.random.key(seed)
    noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(seed_key, i), shape))(
        indices)
    encode_text = None
    if text_encoder is not None:
      encode_text = functools.partial(text_encoder.encode, text_params)
    out = generate(model, tokens, null_tokens, noise, num_steps=num_steps, cfg_scale=cfg_scale,
                   method=method, capacity_factor=capacity_factor, encode_text=encode_text,
                   step_outputs=step_outputs)
    samples, counts = out if record_routing else (out, None)
    if vae is not None:
      samples = vae.decode(vae_params, samples)
    return (samples, counts) if record_routing else samples

  text_params = None if text_encoder is None else text_encoder.params
  vae_params = None if vae is None else vae.params

  def sampler(params, tokens, null_tokens, seed: int, first_index: int = 0):
    # Host (numpy) inputs: valid in every process of a multi-process run.
    indices = np.arange(first_index, first_index + len(tokens), dtype=np.int32)
    return run(params, text_params, vae_params, np.asarray(tokens), np.asarray(null_tokens),
               np.uint32(seed), indices)

  # The jitted function itself, run(params, text_params, vae_params, tokens, null_tokens, seed,
  # indices): for benchmarks that lower and compile it on their own.
  sampler.jitted = run
  return sampler
