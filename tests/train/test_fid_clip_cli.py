"""``evaluate --eval=fid,clip`` end to end, against pytorch-fid's network and transformers' CLIP.

A tiny run is trained for two steps; random-weight reference networks are saved in the real
files' layouts. The CLI's FID and CLIP score must equal those computed by the reference PyTorch
implementations (with a scipy Frechet distance) on the images the sample CLI writes for the same
captions and seed, and on the same real images.
"""

import json
import os

import numpy as np
import pytest
import scipy.linalg
from PIL import Image

from ecdit_jax.data import geneval_shapes_tfds
from ecdit_jax.encoders import clip, clip_tokenizer, convert_torch
from tests.eval.reference_models import (
  pytorch_fid_features,
  save_random_fid_inception,
  transformers_clip_cosines,
  write_clip_tokenizer_dir,
)
from tests.commands import run
from tests.tiny import tiny_train_flags

pytestmark = pytest.mark.slow  # trains, or runs the tools: CI runs it, the fast lane skips it

NUM_IMAGES = 10


def _scipy_fid(real, fake):
  mu1, mu2 = real.mean(0), fake.mean(0)
  s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def _save_random_clip(directory, transformers, torch):
  write_clip_tokenizer_dir(directory)
  tokenizer = clip_tokenizer.load_clip_tokenizer(directory)
  common = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 2}
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=tokenizer.vocab_size, max_position_embeddings=32,
                       bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                       pad_token_id=tokenizer.pad_id, **common),
      vision_config=dict(image_size=32, patch_size=8, **common), projection_dim=16)
  torch.manual_seed(0)
  model = transformers.CLIPModel(config).eval()
  model.save_pretrained(directory, safe_serialization=True)
  return model, tokenizer


def test_fid_and_clip_match_reference_implementations(data_dir, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  workdir = str(tmp_path / "run")
  result = run(["ecdit_jax.main", "--config=configs/default.py", f"--workdir={workdir}",
                *tiny_train_flags(**{"data.data_dir": data_dir, "num_train_steps": 2})])
  assert result.returncode == 0, result.stderr[-3000:]
  inception_net = save_random_fid_inception(tmp_path / "pt_inception_random.pth")
  [inception_path] = convert_torch.convert(str(tmp_path / "pt_inception_random.pth"))
  clip_dir = tmp_path / "clip"
  clip_dir.mkdir()
  hf_clip, tokenizer = _save_random_clip(clip_dir, transformers, torch)
  stats_path = tmp_path / "reference_stats.npz"
  evaluate = ["ecdit_jax.evaluate", f"--workdir={workdir}", "--eval=fid,clip",
              f"--inception_weights={inception_path}", f"--clip_weights={clip_dir}",
              f"--num_images={NUM_IMAGES}", "--steps=2", "--batch_size=4",
              f"--reference_stats={stats_path}"]
  result = run(evaluate)
  assert result.returncode == 0, result.stderr[-3000:]
  [report] = os.listdir(os.path.join(workdir, "eval"))
  with open(os.path.join(workdir, "eval", report)) as f:
    got = json.load(f)
  assert got["num_images"] == NUM_IMAGES and "FID" in result.stdout

  # The reference side: the run's own dataset (test split), its first records.
  builder = geneval_shapes_tfds.prepare(data_dir, image_size=32, num_train=96, num_test=16,
                                        seed=0)
  records = [builder.as_data_source("test")[i] for i in range(NUM_IMAGES)]
  captions = [r["caption"].decode() for r in records]
  real = np.stack([r["image"] for r in records])
  prompts = tmp_path / "captions.txt"
  prompts.write_text("".join(c + "\n" for c in captions))
  outdir = tmp_path / "generated"
  result = run(["ecdit_jax.sample", f"--workdir={workdir}", f"--prompts={prompts}",
                f"--outdir={outdir}", "--steps=2", "--seed=0"])
  assert result.returncode == 0, result.stderr[-3000:]
  fake = np.stack([np.asarray(Image.open(outdir / f"{i:05d}.png")) for i in range(NUM_IMAGES)])

  want_fid = _scipy_fid(pytorch_fid_features(inception_net, real),
                        pytorch_fid_features(inception_net, fake))
  np.testing.assert_allclose(got["fid"], want_fid, rtol=1e-3)

  pixels = clip.preprocess_images(fake, 32)
  ids, mask = tokenizer.encode_batch(captions, 32)
  cosines = transformers_clip_cosines(hf_clip, pixels, ids, mask)
  want_clip = np.mean(100 * np.maximum(cosines, 0))
  np.testing.assert_allclose(got["clip_score"], want_clip, rtol=1e-4)

  # The cached reference statistics are read, not rewritten, and give the same FID.
  assert stats_path.exists()
  written = stats_path.stat().st_mtime_ns
  result = run(evaluate[:2] + ["--eval=fid"] + evaluate[3:4] + evaluate[5:])
  assert result.returncode == 0, result.stderr[-3000:]
  [report] = [r for r in os.listdir(os.path.join(workdir, "eval")) if r.startswith("fid_step")]
  with open(os.path.join(workdir, "eval", report)) as f:
    again = json.load(f)
  assert again["fid"] == got["fid"] and "clip_score" not in again
  assert stats_path.stat().st_mtime_ns == written


def test_missing_weights_fail_before_sampling(tmp_path):
  result = run(["ecdit_jax.evaluate", f"--workdir={tmp_path}", "--eval=fid"])
  assert result.returncode != 0 and "--eval=fid needs --inception_weights" in result.stderr
  missing = tmp_path / "nothing.pth"
  result = run(["ecdit_jax.evaluate", f"--workdir={tmp_path}", "--eval=clip",
                f"--clip_weights={missing}"])
  assert result.returncode != 0 and "no such file" in result.stderr
