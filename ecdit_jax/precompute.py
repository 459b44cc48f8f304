r"""Precomputes VAE latents of an image-caption dataset, so that training skips the encoder.

  python -m ecdit_jax.precompute --source=folder:DIR | tfds:NAME[:SPLIT] --vae=VAE_DIR \
      --out=OUT_DIR [--image_size=256 --batch_size=32 --chunk_size=1000 --data_dir= \
      --image_key=image --text_key=caption --sample_latents=false --seed=0] \
      [--text_encoder=T5_OR_CLIP_DIR --text_max_len=120 --text_encoder_kind=t5 \
       --text_dtype=bfloat16]

``folder:DIR`` reads every png/jpg/jpeg/webp file of DIR, sorted by name, with its caption in the
same-stem ``.txt`` file. ``tfds:NAME[:SPLIT]`` (split ``train`` by default) reads a prepared TFDS
dataset through ``tfds.data_source``. Each image is center-cropped, bicubic-resized to
``--image_size`` and encoded to scaled latents (the posterior mean, or a sample keyed by
``--seed`` and the record index with ``--sample_latents``); the format is in
``ecdit_jax.data.latents``.

With ``--text_encoder`` each caption is also run through that frozen T5 (or CLIP) encoder,
padded or cut to ``--text_max_len`` tokens as a model with that ``text_max_len`` would, and its
states of the valid tokens are stored beside the latent in ``--text_dtype``: a run with
``config.data.cached_context`` then trains without a text encoder on its devices.

Each process splits the VAE's and the text encoder's weights over its own devices (an fsdp
axis, by the model's rules: a T5-XXL need not fit on one chip) and every batch along them;
``--batch_size`` is rounded up to a multiple of the devices.

Source record i goes to JAX process i % process_count; each process groups its records, in order,
into chunks of ``--chunk_size`` source records. Records that cannot be used (an image that does
not decode, a missing or empty caption) are skipped and counted, so a chunk may hold fewer
records. Completed chunks are never rewritten: rerunning the same command resumes an interrupted
run. An output directory holding latents of another ``--vae``, ``--image_size``, ``--source``
or text encoder setting is refused.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os

from absl import flags, logging
from etils import epath

from ecdit_jax import cli, fileio
from ecdit_jax.errors import ConfigError

FLAGS = flags.FLAGS
flags.DEFINE_string("source", None, "folder:DIR or tfds:NAME[:SPLIT].")
flags.DEFINE_string("vae", None, "diffusers VAE directory (config.json + safetensors).")
flags.DEFINE_string("out", None, "Output directory for the latent chunks.")
flags.DEFINE_integer("image_size", 256, "Square image resolution fed to the VAE.")
flags.DEFINE_integer("batch_size", None, "Images per VAE call (default: 32 on an accelerator, "
                     "4 on a CPU, where large batches of 256 px images exhaust memory).")
flags.DEFINE_integer("chunk_size", 1000, "Source records per ArrayRecord chunk.")
flags.DEFINE_string("data_dir", None, "TFDS data_dir (tfds sources only).")
flags.DEFINE_string("image_key", "image", "Image feature of a TFDS source.")
flags.DEFINE_string("text_key", "caption", "Caption feature of a TFDS source.")
flags.DEFINE_bool("sample_latents", False, "Sample from the VAE posterior instead of its mean.")
flags.DEFINE_integer("seed", 0, "Seed of the posterior samples (with --sample_latents).")
flags.DEFINE_string("text_encoder", None, "Hugging Face T5 or CLIP directory: store every "
                    "caption's encoder states too (for config.data.cached_context).")
flags.DEFINE_enum("text_encoder_kind", "t5", ["t5", "clip"], "The --text_encoder's kind "
                  "(config.model.text_encoder of the runs that train on it).")
flags.DEFINE_integer("text_max_len", None, "Prompt length in tokens, the training config's "
                     "config.model.text_max_len (required with --text_encoder).")
flags.DEFINE_enum("text_dtype", "bfloat16", ["bfloat16", "float32"],
                  "Dtype of the encoder's weights and of the states stored.")
flags.mark_flags_as_required(["source", "vae", "out"])

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
# Decoding and resizing release the GIL in PIL, so threads overlap them with the VAE.
_LOADER_THREADS = 8


class FolderSource:
  """Images of a directory (local or gs://) sorted by file name; ``None`` for those without a
  usable caption. One listing finds the images and their captions."""

  def __init__(self, directory: str):
    from etils import epath

    root = epath.Path(directory)
    if not root.is_dir():
      raise ConfigError(f"--source folder {directory} does not exist")
    names = {path.name for path in root.iterdir()}
    images = sorted(n for n in names if n.lower().endswith(IMAGE_EXTENSIONS))
    self.paths = [root / n for n in images]
    captions = [f"{os.path.splitext(n)[0]}.txt" for n in images]
    self.captions = [root / n if n in names else None for n in captions]

  def __len__(self) -> int:
    return len(self.paths)

  def load(self, index: int):
    """(uint8 image, caption), or None when the record is to be skipped."""
    import io

    import numpy as np
    from PIL import Image

    if self.captions[index] is None:
      return None
    caption = self.captions[index].read_text(encoding="utf-8").strip()
    if not caption:
      return None
    with Image.open(io.BytesIO(self.paths[index].read_bytes())) as image:
      image.load()
      if image.mode not in ("L", "RGB", "RGBA"):  # palette, CMYK, 16-bit ...
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
      return np.asarray(image), caption


class TfdsSource:
  """A prepared TFDS dataset, read by index."""

  def __init__(self, name: str, split: str, data_dir: str | None, image_key: str,
               text_key: str):
    import tensorflow_datasets as tfds

    self.source = tfds.data_source(name, split=split, data_dir=data_dir)
    self.image_key, self.text_key = image_key, text_key

  def __len__(self) -> int:
    return len(self.source)

  def load(self, index: int):
    import numpy as np

    example = self.source[index]
    caption = example[self.text_key]
    if isinstance(caption, bytes):
      caption = caption.decode("utf-8")
    caption = str(caption).strip()
    if not caption:
      return None
    return np.asarray(example[self.image_key]), caption


def parse_source(spec: str, *, data_dir: str | None, image_key: str, text_key: str):
  kind, _, rest = spec.partition(":")
  if kind == "folder" and rest:
    return FolderSource(rest)
  if kind == "tfds" and rest:
    name, _, split = rest.partition(":")
    return TfdsSource(name, split or "train", data_dir or None, image_key, text_key)
  raise ConfigError(f"--source={spec} is neither folder:DIR nor tfds:NAME[:SPLIT]")


def check_out_dir(out: str, expected: dict, process_count: int) -> None:
  """Raises ConfigError when ``out`` holds latents that the requested ones would not match."""
  from ecdit_jax.data import latents as latent_format

  info = latent_format.read_info(out)
  if info is not None:
    for key in ("vae", "image_size", "source"):
      if info.get(key) != expected[key]:
        raise ConfigError(f"--{key}={expected[key]} differs from {key}={info.get(key)} of the "
                          f"latents already in --out={out}; use another --out")
    if info.get("text_context") != expected["text_context"]:
      raise ConfigError(f"the text encoder settings {_describe(expected['text_context'])} differ "
                        f"from those of the latents already in --out={out} "
                        f"({_describe(info.get('text_context'))}); use another --out")
  suffix = f"-of-{process_count:05d}-"
  for path in latent_format.latent_files(out):
    if suffix not in path.rsplit("/", 1)[-1]:
      raise ConfigError(f"--out={out} holds chunks written by a different number of processes "
                        f"({path.rsplit('/', 1)[-1]}); resume with the same process count")


def _describe(text_context: dict | None) -> str:
  if text_context is None:
    return "no --text_encoder"
  return ", ".join(f"{key}={value}" for key, value in sorted(text_context.items()))


def text_settings() -> dict | None:
  """What info.json records of the caption encoding (None without ``--text_encoder``); runs
  with ``config.data.cached_context`` check kind, width and max_len against their model."""
  if FLAGS.text_encoder is None:
    return None
  if FLAGS.text_max_len is None or FLAGS.text_max_len <= 0:
    raise ConfigError("--text_encoder needs --text_max_len, the config.model.text_max_len of the "
                      "runs that will train on these captions")
  from ecdit_jax.encoders.frozen import encoder_width

  kind = FLAGS.text_encoder_kind
  return {"kind": kind, "weights": fileio.absolute(FLAGS.text_encoder),
          "width": encoder_width(kind, FLAGS.text_encoder, "--text_encoder"),
          "max_len": FLAGS.text_max_len, "dtype": FLAGS.text_dtype}


def make_caption_encoder(encoder, batch_size: int, mesh):
  """captions -> a list of each caption's states of its valid tokens, (n, width) numpy arrays
  in the encoder's output dtype. ``encoder`` is placed on ``mesh``; batches are padded to
  ``batch_size`` so it compiles once."""
  import jax
  import numpy as np

  from ecdit_jax.data import batch as batch_keys
  from ecdit_jax.encoders import frozen
  from ecdit_jax.parallel.mesh import batch_sharding

  encode = frozen.make_batch_encoder(encoder, mesh)

  def run(captions: list[str]) -> list:
    tokens = encoder.tokenize(captions + [""] * (batch_size - len(captions)))
    tokens = jax.device_put(tokens, batch_sharding(mesh, 2))
    out = jax.device_get(encode({batch_keys.TOKENS: tokens}))
    context, lengths = out[batch_keys.CONTEXT], out[batch_keys.CONTEXT_LENGTHS]
    return [np.asarray(context[i, :lengths[i]]) for i in range(len(captions))]

  return run


def local_mesh():
  """This process's devices as one fsdp axis: the frozen networks' weights are split over them
  by the model's rules (``encoders.frozen``) and every batch is split along them."""
  import jax

  from ecdit_jax.parallel import mesh as mesh_lib

  return mesh_lib.create_mesh(mesh_lib.MeshConfig(data=1, fsdp=-1), jax.local_devices())


def make_encoder(vae, batch_size: int, sample: bool, seed: int, mesh):
  """A function (uint8 (n, S, S, 3), record indices (n,)) -> float32 numpy latents (n, h, w, C).

  Batches are padded to ``batch_size`` (a multiple of the mesh's devices) so the VAE compiles
  once. Each image is encoded on its own under vmap, so its latent (and its posterior sample)
  does not depend on the batching.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from ecdit_jax.encoders import frozen
  from ecdit_jax.parallel.mesh import batch_sharding

  graphdef, state = nnx.split(vae)
  state = frozen.place(state, mesh)
  base_key = jax.random.key(seed)

  @functools.partial(jax.jit, in_shardings=(frozen.shardings_of(state), batch_sharding(mesh, 4),
                                            batch_sharding(mesh, 1)),
                     out_shardings=batch_sharding(mesh, 4))
  def encode(state, images, indices):
    model = nnx.merge(graphdef, state)
    images = images.astype(jnp.float32) / 127.5 - 1.0
    if not sample:
      return model.latents_from_images(images)

    def one(image, index):
      rng = jax.random.fold_in(base_key, index)
      return model.latents_from_images(image[None], rng)[0]
    return jax.vmap(one)(images, indices)

  def run(images: np.ndarray, indices: np.ndarray) -> np.ndarray:
    n = len(images)
    pad = batch_size - n
    if pad:
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
      indices = np.concatenate([indices, np.zeros((pad,), indices.dtype)])
    # Placed explicitly: in a multi-process job jit takes no host arrays for a split input.
    images = jax.device_put(images, batch_sharding(mesh, 4))
    indices = jax.device_put(indices, batch_sharding(mesh, 1))
    return np.asarray(encode(state, images, indices), np.float32)[:n]

  return run


def _load_record(source, size: int, index: int):
  """(index, (resized uint8 image, caption)), or None: anything that fails to decode is skipped
  and counted, never fatal."""
  from ecdit_jax.data import latents as latent_format

  try:
    item = source.load(int(index))
    if item is None:
      return None
    image, caption = item
    return int(index), (latent_format.center_crop_resize(image, size), caption)
  except Exception as e:  # noqa: BLE001
    logging.warning("skipping record %d: %s", index, e)
    return None


def _encode_chunk(items, encode, encode_captions, batch_size: int) -> list[bytes]:
  """The records of one chunk's usable (index, (image, caption)) items."""
  import numpy as np

  from ecdit_jax.data import latents as latent_format

  records = []
  for start in range(0, len(items), batch_size):
    batch = items[start:start + batch_size]
    captions = [caption for _, (_, caption) in batch]
    latents = encode(np.stack([image for _, (image, _) in batch]),
                     np.asarray([i for i, _ in batch], np.uint32))
    contexts = encode_captions(captions) if encode_captions else [None] * len(batch)
    records += [latent_format.encode_record(*fields)
                for fields in zip(latents, captions, contexts)]
  return records


def write_chunks(out: str, source, chunks, encode, encode_captions, batch_size: int,
                 image_size: int) -> tuple[int, int]:
  """Writes this process's chunks not yet done; (records written, records skipped), counting
  those of chunks completed by an earlier, interrupted run."""
  from array_record.python import array_record_data_source

  from ecdit_jax.data import latents as latent_format

  written = skipped = 0
  process_index, process_count = _process()
  load = functools.partial(_load_record, source, image_size)
  with concurrent.futures.ThreadPoolExecutor(_LOADER_THREADS) as pool:
    for chunk, indices in enumerate(chunks):
      path = latent_format.chunk_path(out, process_index, process_count, chunk)
      if latent_format.chunk_done(path):  # resume: count what the completed chunk holds
        count = len(array_record_data_source.ArrayRecordDataSource([path]))
      else:
        items = [item for item in pool.map(load, indices) if item]
        records = _encode_chunk(items, encode, encode_captions, batch_size)
        latent_format.write_chunk(path, records)
        count = len(records)
      written += count
      skipped += len(indices) - count
      print(f"chunk {chunk + 1} of {len(chunks)}: {written} records written, {skipped} skipped",
            flush=True)
  return written, skipped


def _process() -> tuple[int, int]:
  import jax

  return jax.process_index(), jax.process_count()


def _caption_encoder(settings: dict | None, batch_size: int, out: str, mesh):
  """The caption encoder of ``--text_encoder`` (None without it); process 0 also writes the
  empty caption's states, which the runs use for caption dropout."""
  if settings is None:
    return None
  import jax

  from ecdit_jax.data import latents as latent_format
  from ecdit_jax.encoders import frozen

  encoder = frozen.load_text_encoder(
      settings["kind"], settings["weights"], settings["dtype"], max_len=settings["max_len"],
      output_dtype=settings["dtype"], key="--text_encoder").placed(mesh)
  if jax.process_index() == 0:
    latent_format.write_null_context(out, *encoder.null_caption())
  return make_caption_encoder(encoder, batch_size, mesh)


def main(argv):
  del argv
  for name in ("image_size", "batch_size", "chunk_size"):
    if getattr(FLAGS, name) is not None and getattr(FLAGS, name) <= 0:
      raise ConfigError(f"--{name} must be positive, got {getattr(FLAGS, name)}")
  cli.start_processes()
  import jax  # pylint: disable=import-outside-toplevel  (after joining the job)
  import numpy as np

  from ecdit_jax.data import latents as latent_format
  from ecdit_jax.encoders.vae import load_vae

  process_index, process_count = _process()
  expected = {"vae": fileio.absolute(FLAGS.vae), "image_size": FLAGS.image_size,
              "source": FLAGS.source, "text_context": text_settings()}
  check_out_dir(FLAGS.out, expected, process_count)
  source = parse_source(FLAGS.source, data_dir=FLAGS.data_dir, image_key=FLAGS.image_key,
                        text_key=FLAGS.text_key)

  vae = load_vae(FLAGS.vae)
  size = FLAGS.image_size
  latent_shape = jax.eval_shape(
      vae.latents_from_images, jax.ShapeDtypeStruct((1, size, size, 3), np.float32)).shape[1:]
  mesh = local_mesh()
  batch_size = FLAGS.batch_size or (4 if jax.default_backend() == "cpu" else 32)
  batch_size = -(-batch_size // mesh.size) * mesh.size  # whole rows for every device
  encode = make_encoder(vae, batch_size, FLAGS.sample_latents, FLAGS.seed, mesh)
  epath.Path(FLAGS.out).mkdir(parents=True, exist_ok=True)
  encode_captions = _caption_encoder(expected["text_context"], batch_size, FLAGS.out, mesh)
  info = dict(expected, latent_shape=list(latent_shape), dtype="float32", count=None,
              skipped=None, sample_latents=FLAGS.sample_latents, seed=FLAGS.seed,
              chunk_size=FLAGS.chunk_size, process_count=process_count)
  if process_index == 0 and latent_format.read_info(FLAGS.out) is None:
    # Written up front (counts unknown) so that a run interrupted before the end is still
    # guarded against being resumed with other settings.
    latent_format.write_info(FLAGS.out, info)

  mine = np.arange(process_index, len(source), process_count)
  chunks = [mine[i:i + FLAGS.chunk_size] for i in range(0, len(mine), FLAGS.chunk_size)]
  written, skipped = write_chunks(FLAGS.out, source, chunks, encode, encode_captions, batch_size,
                                  size)
  if process_count > 1:
    from jax.experimental import multihost_utils
    totals = multihost_utils.process_allgather(np.asarray([written, skipped])).sum(axis=0)
    written, skipped = int(totals[0]), int(totals[1])
  if process_index == 0:
    latent_format.write_info(FLAGS.out, dict(info, count=written, skipped=skipped))
  print(f"wrote {written} records to {FLAGS.out}, skipped {skipped}")


if __name__ == "__main__":
  cli.run(main)
