"""Reference PyTorch networks with random weights, saved as the real weight files are laid out.

pytorch-fid's FID Inception and a tiny transformers CLIPModel (with a tiny CLIP tokenizer), for
tests that compare our ports and CLIs with the reference implementations. Nothing is downloaded.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ecdit_jax.encoders import clip_tokenizer

# A tiny CLIP BPE vocabulary: every byte symbol alone and word-final, these merges, the specials.
CLIP_MERGES = [("r", "e"), ("re", "d</w>"), ("c", "i"), ("ci", "r"), ("l", "e</w>"),
               ("cir", "cle</w>"), ("c", "le</w>"), ("t", "w"), ("tw", "o</w>"), ("t", "r"),
               ("s", "q"), ("u", "a"), ("t", "o</w>"), ("l", "e"), ("an", "g"), ("a", "n"),
               ("i", "a"), ("s</w>", "x")]


def write_clip_tokenizer_dir(directory, tokenizer_config: dict | None = None):
  symbols = list(clip_tokenizer.bytes_to_unicode().values())
  tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in CLIP_MERGES]
  tokens = list(dict.fromkeys(tokens + ["<|startoftext|>", "<|endoftext|>"]))
  (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
  (directory / "merges.txt").write_text(
      "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in CLIP_MERGES))
  if tokenizer_config is not None:
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
  return directory


def _randomise_batch_norms(network, batch_norms, generator):
  """Random affine parameters and running statistics that keep activations of order one.

  Statistics are first measured on random images (one training-mode pass with a cumulative
  average), then perturbed per channel, so that using them wrongly (or not at all) changes the
  features while no layer blows up or vanishes.
  """
  import torch

  with torch.no_grad():
    for bn in batch_norms:
      bn.weight.copy_(torch.empty(bn.num_features).uniform_(0.5, 2.0, generator=generator))
      bn.bias.copy_(0.5 * torch.randn(bn.num_features, generator=generator))
      bn.momentum = None
      bn.reset_running_stats()
    network.train()
    network(torch.rand(2, 3, 48, 48, generator=generator))
    network.eval()
    for bn in batch_norms:
      std = bn.running_var.sqrt()
      bn.running_mean += 0.1 * std * torch.randn(bn.num_features, generator=generator)
      bn.running_var *= torch.empty(bn.num_features).uniform_(0.8, 1.25, generator=generator)


def save_random_fid_inception(path, seed: int = 0):
  """Writes a random FID Inception weights file at ``path``; returns pytorch-fid's pool3 network
  (``InceptionV3([3])``, eval mode) holding those weights."""
  torch = pytest.importorskip("torch")
  pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")
  torch.manual_seed(seed)
  built = []
  build_torchvision_inception = pytorch_fid_inception._inception_v3

  def remember_built(*args, **kwargs):
    built.append(build_torchvision_inception(*args, **kwargs))
    return built[-1]

  # fid_inception_v3 builds the network, swaps in the FID blocks, then loads downloaded weights:
  # hand it the network's own (random) state dict instead.
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(pytorch_fid_inception, "_inception_v3", remember_built)
    patch.setattr(pytorch_fid_inception, "load_state_dict_from_url",
                  lambda *args, **kwargs: built[0].state_dict())
    network = pytorch_fid_inception.InceptionV3([3]).eval()
  full_inception = built[0]
  batch_norms = [m for m in full_inception.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  _randomise_batch_norms(network, batch_norms, torch.Generator().manual_seed(seed + 1))
  torch.save(full_inception.state_dict(), path)
  return network


def pytorch_fid_features(network, images_uint8):
  """pool3 features (N, 2048) of uint8 images by pytorch-fid's network."""
  import torch

  with torch.no_grad():
    unit = torch.from_numpy(images_uint8).float().div(255.0).permute(0, 3, 1, 2)
    (pool3,) = network(unit)
  return pool3[:, :, 0, 0].double().numpy()


def transformers_clip_cosines(hf_model, pixels, ids, mask):
  """Cosine of each image with its caption under a transformers CLIPModel, (N,) numpy.

  ``pixels`` are preprocessed (N, H, W, 3) floats; ``ids``/``mask`` the tokenized captions.
  """
  import torch

  with torch.no_grad():
    image = hf_model.get_image_features(
        pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()))
    text = hf_model.get_text_features(input_ids=torch.from_numpy(ids).long(),
                                      attention_mask=torch.from_numpy(mask).long())
  features = []
  for output in (image, text):
    # Newer transformers return a model output rather than a tensor here.
    output = output if isinstance(output, torch.Tensor) else output.pooler_output
    features.append(torch.nn.functional.normalize(output, dim=-1).numpy())
  return np.sum(features[0] * features[1], axis=-1)
