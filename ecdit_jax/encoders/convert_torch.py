r"""Converts PyTorch weight files to safetensors, once.

  python -m ecdit_jax.encoders.convert_torch PATH

The package reads weights from safetensors only: a PyTorch ``.bin`` or ``.pth`` file is a
pickle, and reading one runs its unpickler. This converter, run once on weights you trust,
reads them with ``torch.load(weights_only=True)`` (PyTorch's own restricted loader; it needs
``pip install -e ".[torch]"``) and writes the same tensors, names and PyTorch layout as
safetensors beside them:

  DIR with pytorch_model.bin           -> DIR/model.safetensors
  DIR with pytorch_model.bin.index.json and its shards
                                       -> DIR/model.safetensors.index.json and its shards
  DIR with diffusion_pytorch_model.bin -> DIR/diffusion_pytorch_model.safetensors (a VAE)
  FILE.pth or FILE.bin                 -> FILE.safetensors (e.g. pytorch-fid's Inception)

Nothing is overwritten: a target that exists already is an error.
"""

from __future__ import annotations

import json
import os

from ecdit_jax import cli
from ecdit_jax.errors import ConfigError

# The .bin names of Hugging Face directories and the safetensors names that replace them.
DIRECTORY_NAMES = {"pytorch_model": "model", "diffusion_pytorch_model": "diffusion_pytorch_model"}


def _torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
    from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ConfigError("converting PyTorch files needs torch: pip install -e \".[torch]\"") from e
  return torch, save_file


def convert_file(source: str, target: str) -> int:
  """One state dict ``source`` (a torch.save file) -> the safetensors file ``target``; returns
  the number of tensors."""
  if os.path.exists(target):
    raise ConfigError(f"{target} exists already; conversions never overwrite")
  torch, save_file = _torch()
  state = torch.load(source, map_location="cpu", weights_only=True)
  if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
    state = state["state_dict"]
  tensors = {key: value.detach().clone().contiguous() for key, value in state.items()
             if isinstance(value, torch.Tensor)}
  if not tensors:
    raise ConfigError(f"{source} holds no tensors")
  save_file(tensors, target, metadata={"format": "pt"})
  return len(tensors)


def _safetensors_name(name: str, stem: str) -> str:
  """``pytorch_model-00001-of-00002.bin`` -> ``model-00001-of-00002.safetensors``."""
  return DIRECTORY_NAMES[stem] + name[len(stem):-len(".bin")] + ".safetensors"


def convert_directory(directory: str) -> list[str]:
  """Every PyTorch checkpoint of a Hugging Face directory (single or sharded); returns the
  files written."""
  written = []
  for stem in DIRECTORY_NAMES:
    single = os.path.join(directory, f"{stem}.bin")
    index = os.path.join(directory, f"{stem}.bin.index.json")
    if os.path.isfile(single):
      target = os.path.join(directory, _safetensors_name(f"{stem}.bin", stem))
      convert_file(single, target)
      written.append(target)
    elif os.path.isfile(index):
      with open(index, encoding="utf-8") as f:
        listing = json.load(f)
      shards = sorted(set(listing["weight_map"].values()))
      renamed = {shard: _safetensors_name(shard, stem) for shard in shards}
      for shard, name in renamed.items():
        convert_file(os.path.join(directory, shard), os.path.join(directory, name))
        written.append(os.path.join(directory, name))
      target = os.path.join(directory, f"{DIRECTORY_NAMES[stem]}.safetensors.index.json")
      listing["weight_map"] = {k: renamed[v] for k, v in listing["weight_map"].items()}
      with open(target, "x", encoding="utf-8") as f:
        json.dump(listing, f, indent=2)
      written.append(target)
  if not written:
    raise ConfigError(f"no pytorch_model.bin or diffusion_pytorch_model.bin (or their shard "
                      f"index) in {directory}")
  return written


def convert(path: str) -> list[str]:
  """A directory or a single ``.pth`` / ``.bin`` file; returns the files written."""
  if os.path.isdir(path):
    return convert_directory(path)
  if os.path.isfile(path) and path.endswith((".pth", ".bin", ".pt")):
    target = os.path.splitext(path)[0] + ".safetensors"
    convert_file(path, target)
    return [target]
  raise ConfigError(f"{path} is neither a directory nor a .pth/.bin file")


def main(argv):
  if len(argv) != 2:
    raise ConfigError("usage: python -m ecdit_jax.encoders.convert_torch PATH (a Hugging Face "
                      "directory, or a .pth/.bin file)")
  for written in convert(argv[1]):
    print(f"wrote {written}")


if __name__ == "__main__":
  cli.run(main, positional=True)
