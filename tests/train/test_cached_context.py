"""Captions encoded once by ``precompute --text_encoder`` (``config.data.cached_context``) train
the DiT exactly as the same frozen encoder run on every batch, for T5 and CLIP; the stored states
are the encoder's; a run refuses captions encoded by another encoder, width or length, and
``precompute`` refuses to mix settings in one directory."""

import json
import os

import jax
import numpy as np
import pytest

from ecdit_jax.config import TrainConfig
from ecdit_jax.data import latents as latent_format
from ecdit_jax.encoders import frozen, random_init
from ecdit_jax.errors import ConfigError
from ecdit_jax.train import input as input_lib
from ecdit_jax.train import setup
from tests.commands import run, run_ok
from tests.encoders.random_clip import write_random_clip_text
from tests.tiny import tiny_train_config

pytestmark = pytest.mark.slow  # runs precompute and builds runs: CI runs it, the fast lane skips

WIDTH, MAX_LEN, IMAGE_SIZE = 32, 12, 32  # the random VAE halves images: 16x16x4 latents


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  root = tmp_path_factory.mktemp("cached")
  images = root / "images"
  run_ok(["ecdit_jax.data.geneval_folder", f"--out={images}", "--count=10",
          f"--image_size={IMAGE_SIZE}"])
  t5_dir, vae_dir = random_init.write_random_models(root / "weights")
  clip_dir = root / "weights" / "clip"
  clip_dir.mkdir()
  write_random_clip_text(clip_dir, width=WIDTH)
  return root, images, {"t5": t5_dir, "clip": str(clip_dir)}, vae_dir


def precompute(inputs, kind, out_name, *extra):
  """The precompute command storing ``kind``'s states of the captions in ROOT/out_name."""
  root, images, encoders, vae_dir = inputs
  return ["ecdit_jax.precompute", f"--source=folder:{images}", f"--vae={vae_dir}",
          f"--out={root / out_name}", f"--image_size={IMAGE_SIZE}", "--batch_size=4",
          "--chunk_size=6", f"--text_encoder={encoders[kind]}", f"--text_encoder_kind={kind}",
          f"--text_max_len={MAX_LEN}", "--text_dtype=float32", *extra]


def train_config(inputs, kind, latents, cached: bool, **overrides):
  _, _, encoders, vae_dir = inputs
  values = {"data.dataset": f"latents:{latents}", "data.cached_context": cached,
            "model.image_size": 16, "model.in_channels": 4, "model.text_encoder": kind,
            "model.text_hidden_size": WIDTH, "model.text_max_len": MAX_LEN,
            "pretrained.vae": vae_dir, "pretrained.dtype": "float32",
            # No sampling: a cached run then needs no text encoder at all.
            "pretrained.text_encoder": "" if cached else encoders[kind],
            "diffusion.caption_dropout": 0.5, "diffusion.mask_ratio": 0.5}
  values.update(overrides)
  return TrainConfig.from_mapping(tiny_train_config("", **values))


@pytest.mark.parametrize("kind", ["t5", "clip"])
def test_cached_captions_train_as_the_encoder_run_on_every_batch(inputs, kind, tmp_path):
  root = inputs[0]
  run_ok(precompute(inputs, kind, f"latents_{kind}"))
  latents = str(root / f"latents_{kind}")
  losses = {}
  for cached in (False, True):
    build = setup.build(train_config(inputs, kind, latents, cached), str(tmp_path / str(cached)))
    try:
      state = build.state
      for step in range(2):
        state, metrics = build.calls(state, step, build.next_batches(1))
        losses[cached, step] = float(metrics["loss"])
    finally:
      build.close()
  for step in range(2):
    np.testing.assert_allclose(losses[True, step], losses[False, step], rtol=2e-5)


def test_stored_states_are_the_encoders_and_settings_are_checked(inputs):
  root, images, encoders, _ = inputs
  out = root / "latents_checked"
  run_ok(precompute(inputs, "t5", out.name, "--text_dtype=bfloat16"))
  source = latent_format.LatentSource(str(out))
  records = [source[i] for i in range(len(source))]
  captions = [r["caption"].decode() for r in records]
  encoder = frozen.load_text_encoder("t5", encoders["t5"], "bfloat16", max_len=MAX_LEN,
                                     output_dtype="bfloat16").placed(None)
  # One caption at a time: a record's states do not depend on the batch it was encoded in.
  for record, caption in zip(records, captions):
    context, length = jax.jit(encoder.encode)(encoder.params, encoder.tokenize([caption]))
    stored = record["context"]
    assert stored.dtype == np.dtype("bfloat16") and stored.shape == (int(length[0]), WIDTH)
    np.testing.assert_allclose(stored.astype(np.float32),
                               np.asarray(context[0, :int(length[0])], np.float32),
                               rtol=2e-2, atol=2e-2)
  null, null_length = latent_format.read_null_context(str(out))
  assert null.shape == (MAX_LEN, WIDTH) and null_length == 1
  info = json.loads((out / latent_format.INFO_FILE).read_text())
  assert info["text_context"] == {"kind": "t5", "weights": os.path.abspath(encoders["t5"]),
                                  "width": WIDTH, "max_len": MAX_LEN, "dtype": "bfloat16"}
  assert info["count"] == 10 and info["skipped"] == 0

  # Other encoder settings, or none, on the same directory are refused, naming both.
  for extra in (["--text_max_len=8"], ["--text_dtype=float32"]):
    result = run(precompute(inputs, "t5", out.name, *extra))
    assert result.returncode != 0 and "use another --out" in result.stderr
  assert "max_len=12" in result.stderr
  result = run(["ecdit_jax.precompute", f"--source=folder:{images}", f"--vae={inputs[3]}",
                f"--out={out}", f"--image_size={IMAGE_SIZE}"])
  assert result.returncode != 0 and "no --text_encoder" in result.stderr

  # A run whose model would read the captions otherwise is refused, naming its keys.
  for overrides, key in (({"model.text_max_len": 16}, "config.model.text_max_len=16"),
                         ({"model.text_hidden_size": 48}, "config.model.text_hidden_size=48"),
                         ({"model.text_encoder": "clip"}, "config.model.text_encoder='clip'")):
    cfg = train_config(inputs, "t5", str(out), True, **overrides)
    with pytest.raises(ConfigError, match=key):
      input_lib.cached_context(cfg)
  assert input_lib.cached_context(train_config(inputs, "t5", str(out), True))[1] == 1
  # Latents without encoded captions: the error says how to get them.
  plain = root / "latents_plain"
  run_ok(["ecdit_jax.precompute", f"--source=folder:{images}", f"--vae={inputs[3]}",
          f"--out={plain}", f"--image_size={IMAGE_SIZE}", "--batch_size=4"])
  with pytest.raises(ConfigError, match="--text_encoder"):
    input_lib.cached_context(train_config(inputs, "t5", str(plain), True))
