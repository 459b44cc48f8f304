r"""Writes GenEval-Shapes examples as a folder of captioned images.

  python -m ecdit_jax.data.geneval_folder --out=my_images [--count=64 --image_size=64 --seed=0]

Writes OUT/00000.png with its caption in OUT/00000.txt, and so on: the layout that
``python -m ecdit_jax.precompute --source=folder:OUT`` reads, so that the latent walk-through of
the README runs without images of your own. OUT must be new or empty.
"""

from __future__ import annotations

import os

from absl import flags
from PIL import Image

from ecdit_jax import cli
from ecdit_jax.data import geneval_shapes
from ecdit_jax.errors import ConfigError

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "New (or empty) directory for the images and captions.")
flags.DEFINE_integer("count", 64, "Examples to write.")
flags.DEFINE_integer("image_size", 64, "Image side in pixels (at least 16).")
flags.DEFINE_integer("seed", 0, "Seed of the examples.")
flags.mark_flags_as_required(["out"])


def write_folder(out: str, count: int, image_size: int, seed: int) -> None:
  if count < 1 or image_size < geneval_shapes.MIN_IMAGE_SIZE:
    raise ConfigError(f"--count={count} must be >= 1 and --image_size={image_size} >= "
                      f"{geneval_shapes.MIN_IMAGE_SIZE}")
  if os.path.isdir(out) and os.listdir(out):
    raise ConfigError(f"--out={out} is not empty; refusing to overwrite")
  os.makedirs(out, exist_ok=True)
  for index, example in enumerate(geneval_shapes.generate_examples(seed, count, image_size)):
    Image.fromarray(example.image).save(os.path.join(out, f"{index:05d}.png"))
    with open(os.path.join(out, f"{index:05d}.txt"), "w", encoding="utf-8") as f:
      f.write(example.caption + "\n")


def main(argv):
  del argv
  write_folder(FLAGS.out, FLAGS.count, FLAGS.image_size, FLAGS.seed)
  print(f"wrote {FLAGS.count} captioned images to {FLAGS.out}")


if __name__ == "__main__":
  cli.run(main)
