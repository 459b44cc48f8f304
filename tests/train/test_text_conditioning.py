"""Frozen pretrained text encoders and latent data: encodings, the context-form train step, and
the config errors that name their keys."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ecdit_jax.checkpoint import check_same_model
from ecdit_jax.config import TrainConfig, upgrade
from ecdit_jax.data import latents as latent_format
from ecdit_jax.encoders import frozen, random_init
from ecdit_jax.encoders.t5 import load_t5_encoder
from ecdit_jax.errors import ConfigError
from ecdit_jax.model import ModelConfig, TextToImageDiT
from ecdit_jax.model.keys import ParamKeys
from ecdit_jax.model.params import build_model, to_pure_dict
from ecdit_jax.train import input as input_lib
from ecdit_jax.train.step import make_loss_fn
from tests.encoders.random_clip import write_random_clip_text
from tests.tiny import tiny_train_config

CAPTIONS = ["a red circle", "two squares", "a blue triangle above a green square", ""]
T5_WIDTH = 32  # random_init's default d_model


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("t5") / "t5"
  random_init.write_random_t5(path, random_init.default_captions(), seed=3)
  return str(path)


def pretrained_model_config(kind="t5", **overrides):
  values = dict(image_size=16, in_channels=4, hidden_size=32, num_layers=2, num_heads=2,
                num_experts=4, text_encoder=kind, text_hidden_size=T5_WIDTH, text_max_len=12,
                dtype="float32")
  values.update(overrides)
  return ModelConfig(**values)


def test_frozen_t5_gives_the_directly_loaded_encoders_states(t5_dir):
  encoder = frozen.load_frozen_text_encoder("t5", t5_dir, "float32", pretrained_model_config())
  tokens = encoder.tokenize(CAPTIONS)
  context, lengths = jax.jit(encoder.encode)(encoder.placed(None).params, tokens)
  # T5 pads with 0 after the eos (1): the valid length is the number of non-pad tokens.
  np.testing.assert_array_equal(lengths, (tokens != 0).sum(axis=1))
  assert lengths[-1] == 1 and context.shape == (len(CAPTIONS), 12, T5_WIDTH)
  mask = np.arange(12)[None] < np.asarray(lengths)[:, None]
  direct = load_t5_encoder(t5_dir)(tokens, mask)
  for row, length in enumerate(np.asarray(lengths)):
    np.testing.assert_allclose(context[row, :length], direct[row, :length], rtol=1e-5,
                               atol=1e-5)
  null_context, null_length = encoder.null_caption()
  assert int(null_length) == 1
  np.testing.assert_allclose(null_context[:1], context[-1, :1], rtol=1e-5, atol=1e-5)


def test_frozen_clip_text_tower_from_a_text_only_directory(tmp_path):
  saved, eos = write_random_clip_text(tmp_path, width=T5_WIDTH)
  encoder = frozen.load_frozen_text_encoder("clip", str(tmp_path), "float32",
                                            pretrained_model_config("clip"))
  tokens = encoder.tokenize(CAPTIONS)
  context, lengths = jax.jit(encoder.encode)(encoder.params, tokens)
  # CLIP pads with the end token itself: the length runs to the first one.
  np.testing.assert_array_equal(lengths, np.argmax(tokens == eos, axis=1) + 1)
  assert lengths[-1] == 2  # "" is start + end
  direct = saved.text_model(tokens)
  for row, length in enumerate(np.asarray(lengths)):
    np.testing.assert_allclose(context[row, :length], direct[row, :length], rtol=1e-5,
                               atol=1e-5)
  with pytest.raises(ConfigError, match="config.model.text_max_len"):
    frozen.load_frozen_text_encoder("clip", str(tmp_path), "float32",
                                    pretrained_model_config("clip", text_max_len=17))


def test_context_batches_give_the_token_paths_loss():
  """Text encoded outside the model (as a frozen encoder does) must train the DiT exactly as the
  same encoder inside it: same timesteps, noise, dropped rows, masked tokens, hence loss."""
  config = TrainConfig.from_mapping(tiny_train_config(
      "", **{"diffusion.caption_dropout": 0.5, "diffusion.mask_ratio": 0.5,
             "model.moe_layout": "none"}))
  model_config = config.model
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(model_config, 0)))
  params = jax.jit(lambda: to_pure_dict(nnx.state(build_model(model_config, 0))))()
  # Away from the init, where adaLN-Zero and the zero cross-attention output ignore the text.
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: x + 0.05 * rng.normal(size=x.shape).astype(x.dtype), params)
  null = np.zeros(model_config.text_max_len, np.int32)
  null[0] = 1
  tokens = rng.integers(3, 40, (8, model_config.text_max_len)).astype(np.int32)
  tokens[:, 7:] = 0
  tokens[:, 6] = 1
  image = rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
  encode = jax.jit(lambda tokens: nnx.merge(graphdef, params).encode_text(tokens))
  context, lengths = encode(tokens)
  null_context, null_lengths = encode(null[None])
  key = jax.random.key(5)

  token_loss = make_loss_fn(graphdef, config, null, masked=True)
  loss_t, (velocity_loss_t, _) = jax.jit(token_loss)(params, {"image": image, "tokens": tokens},
                                                     key)

  @jax.jit
  def context_loss(null_caption):
    loss_fn = make_loss_fn(graphdef, config, None, masked=True, null_context=null_caption)
    batch = {"image": image, "context": context, "context_lengths": lengths}
    return loss_fn(params, batch, key)

  loss_c, (velocity_loss_c, _) = context_loss((null_context[0], null_lengths[0]))
  np.testing.assert_allclose(loss_c, loss_t, rtol=1e-5)
  np.testing.assert_allclose(velocity_loss_c, velocity_loss_t, rtol=1e-5)
  # Dropped rows must get the null caption: another one changes the loss.
  loss_w, _ = context_loss((jnp.zeros_like(null_context[0]), null_lengths[0]))
  assert abs(float(loss_w) - float(loss_t)) > 1e-4


def test_a_pretrained_model_has_no_text_parameters():
  model = nnx.eval_shape(lambda: TextToImageDiT(pretrained_model_config(), rngs=ParamKeys(0)))
  assert model.text_encoder is None
  with pytest.raises(ValueError, match="frozen pretrained"):
    model.encode_text(jnp.zeros((1, 12), jnp.int32))


def test_config_errors_name_their_keys(t5_dir, tmp_path):
  with pytest.raises(ConfigError, match="config.model.text_encoder"):
    pretrained_model_config("bert")

  config = tiny_train_config("", **{"model.text_encoder": "t5", "model.text_hidden_size": 32})
  with pytest.raises(ConfigError, match="config.pretrained.text_encoder"):
    TrainConfig.from_mapping(config)

  latents = tmp_path / "latents"
  latents.mkdir()
  latent_format.write_info(str(latents), {"latent_shape": [16, 16, 4]})
  on_latents = tiny_train_config("", **{"data.dataset": f"latents:{latents}",
                                        "model.in_channels": 4, "sample_every_steps": 10,
                                        "eval_every_steps": 0})
  with pytest.raises(ConfigError, match="config.pretrained.vae"):
    TrainConfig.from_mapping(on_latents)
  on_latents.sample_every_steps = 0
  with pytest.raises(ConfigError, match=r"config.model.image_size=32\b"):
    input_lib.check_latent_shape(TrainConfig.from_mapping(on_latents), source=None)
  on_latents.model.update(image_size=16, in_channels=3)
  with pytest.raises(ConfigError, match="config.model.in_channels=3") as error:
    input_lib.check_latent_shape(TrainConfig.from_mapping(on_latents), source=None)
  assert "image_size" not in str(error.value)
  on_latents.model.in_channels = 4
  input_lib.check_latent_shape(TrainConfig.from_mapping(on_latents), source=None)
  # A scratch tokenizer trained on the latents' captions is cached under a flat file name.
  assert "/" not in input_lib._cache_name(TrainConfig.from_mapping(on_latents))

  with pytest.raises(ConfigError, match=f"config.model.text_hidden_size=64.*{t5_dir}"):
    frozen.load_frozen_text_encoder("t5", t5_dir, "float32",
                                    pretrained_model_config(text_hidden_size=64))


def test_runs_saved_before_text_encoder_existed_still_resume():
  saved = upgrade({"model": {"hidden_size": 32}})
  assert check_same_model(saved, upgrade({"model": {"hidden_size": 32,
                                                    "text_encoder": "scratch"}})) == []
  with pytest.raises(ConfigError, match="config.model.text_encoder"):
    check_same_model(saved, upgrade({"model": {"hidden_size": 32, "text_encoder": "t5"}}))
  # With a frozen encoder on both sides the scratch encoder's sizes shape nothing.
  frozen_t5 = {"text_encoder": "t5", "text_hidden_size": 32}
  assert check_same_model(upgrade({"model": {**frozen_t5, "text_vocab_size": 128}}),
                          upgrade({"model": {**frozen_t5, "text_vocab_size": 32128}})) == []
