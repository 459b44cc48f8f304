r"""Text-to-image at 256x256 on your own images: ``configs/t2i_256.py:VARIANT[,runlocal]``.

VARIANT is XL-32E, XXL-32E, 3XL-32E or M-64E (ecdit_jax/model/presets.py). The DiT works on SD-VAE
latents (256 px images -> 32x32x4, patch 2: 256 tokens), conditioned on a frozen T5 v1.1 XXL
encoder (width 4096; prompts padded or cut to 120 tokens, eos included), and trains as in the
paper: RMSProp with momentum, lr 1e-4 after 20K warmup steps, batch 4096, 800K steps, token
masking 0.5, capacity factor 2, expert-choice MoE in every other block, bfloat16.

Nothing is downloaded. Bring, in Hugging Face format (see README.md, "Training on your own
images with pretrained encoders"): a T5 v1.1 XXL encoder directory (config.json, safetensors,
spiece.model) and a diffusers VAE directory (config.json, safetensors). Every process reads
them, and the latents, from local paths: on a pod or cluster, a filesystem every host mounts.

1. Latents and the captions' T5 states, once (resumable; a folder of images with same-name .txt
   captions, or tfds:NAME):

  python -m ecdit_jax.precompute --source=folder:/data/my_images --vae=/data/sd-vae-ft-ema \
      --out=/data/latents/mine --image_size=256 \
      --text_encoder=/data/t5-v1_1-xxl --text_max_len=120

   Training then reads each caption's states (``config.data.cached_context``, on here) and keeps
   no T5 on the devices: it is loaded at start only to encode config.sample.prompts. On disk an
   image costs its latent (32x32x4 float32, 16 KiB) plus 8 KiB per caption token (4096 bfloat16
   values; a 20-token caption 160 KiB). Without --text_encoder, set
   --config.data.cached_context=False: the T5 then encodes every batch on the devices, split over
   the mesh like the DiT.

2. Train on a Cloud TPU pod (launch/README.md documents every argument):

  launch/tpu_pod.sh --name=ecdit-t2i --zone=us-east5-a --project=my-project \
    --accelerator=v5p-256 --workdir=gs://my-bucket/runs/t2i_xl32e \
    --config=configs/t2i_256.py:XL-32E -- --config.data.dataset=latents:/data/latents/mine \
    --config.pretrained.text_encoder=/data/t5-v1_1-xxl --config.pretrained.vae=/data/sd-vae-ft-ema \
    --config.mesh.expert=8

   or on one host with GPUs. The batch of 4096 is split over the GPUs and then over
   config.grad_accum_steps micro-batches; take the fewest steps that fit, since each micro-batch
   passes over all the weights. On one H200, 4 steps (1024 images each) ran fastest and 8 took
   113 GiB (bench/RESULTS.md). With 8 GPUs sharing the state (fsdp), 1 step puts 512 images on
   each; that is sized from the one-GPU memory plan, not yet run on 8 GPUs:

  python -m ecdit_jax.main --config=configs/t2i_256.py:XL-32E --workdir=/data/runs/t2i_xl32e \
      --config.data.dataset=latents:/data/latents/mine --config.grad_accum_steps=1 \
      --config.pretrained.text_encoder=/data/t5-v1_1-xxl --config.pretrained.vae=/data/sd-vae-ft-ema

3. Sample (PNGs at 256x256, decoded by the run's VAE):

  python -m ecdit_jax.sample --workdir=/data/runs/t2i_xl32e --prompts=prompts.txt --outdir=out

``runlocal`` keeps the variant's MoE structure (layout, expert count, capacity) but shrinks width,
depth, text length, batch and steps for a CPU, in float32, on the tiny random-weight T5 (width 32)
and VAE (2x downsampling: 32 px images -> 16x16x4 latents) that ``ecdit_jax.encoders.random_init``
writes. The whole sequence on a laptop, from a folder my_images/ of images with .txt captions:

  python -m ecdit_jax.encoders.random_init --out=/tmp/t2i/weights   # add --captions=FILE
  python -m ecdit_jax.precompute --source=folder:my_images --vae=/tmp/t2i/weights/vae \
      --out=/tmp/t2i/latents --image_size=32 --text_encoder=/tmp/t2i/weights/t5 \
      --text_max_len=16 --text_dtype=float32
  python -m ecdit_jax.main --config=configs/t2i_256.py:XL-32E,runlocal --workdir=/tmp/t2i/run \
      --config.data.dataset=latents:/tmp/t2i/latents \
      --config.pretrained.text_encoder=/tmp/t2i/weights/t5 \
      --config.pretrained.vae=/tmp/t2i/weights/vae
  printf "a red circle\na blue square\n" > /tmp/t2i/prompts.txt
  python -m ecdit_jax.sample --workdir=/tmp/t2i/run --prompts=/tmp/t2i/prompts.txt \
      --outdir=/tmp/t2i/samples

(``--captions=FILE``, one caption per line, e.g. ``awk 1 my_images/*.txt > FILE``, trains the
random T5's vocabulary on your captions; by default it knows the GenEval-Shapes words.)
"""

import ml_collections

from configs import default
from ecdit_jax.config import DEFAULT_PROMPTS, config_dict
from ecdit_jax.model.presets import model_overrides

VARIANTS = ("XL-32E", "XXL-32E", "3XL-32E", "M-64E")
# Rematerialisation: every variant recomputes its blocks in the backward pass. Memory kept for
# matmul outputs is memory taken from the micro-batch, and larger micro-batches won: on one H200
# XL-32E's step ran at 338.4 model TFLOP/s with block remat at 1024 images a micro-batch, against
# 272.4 keeping matmul outputs at 128, the most that fit
# (bench/records/2026-12-05_h200_recipe-micro-batch-and-unrolled/).
REMAT = "block"
# Scan over layers for the larger variants: it compiles several times faster
# (bench/records/2026-11-26_h100_scan-over-layers/). XL-32E stays unrolled: its step was 5% faster
# and used 13 GiB less memory than the scan at the same micro-batch (the record above), for
# about 100 s of compile instead of 30. A checkpoint keeps its layout: a workdir saved with the
# other one resumes with --config.model.scan_layers=True or False.
SCAN_LAYERS = {"XL-32E": False, "XXL-32E": True, "3XL-32E": True, "M-64E": True}
# The qk-norm and its projection's bias as fused Pallas kernels on GPUs (XLA ops on TPUs, where
# the kernels are untimed): on one H200 XL-32E's recipe step (batch 4096, 1024 images a
# micro-batch) ran 4.1% faster with them, 361.4 against 347.1 model TFLOP/s, the same loss
# (bench/records/2026-12-06_h200_recipe-and-dense-with-qk-kernels/).
QK_NORM_IMPL = "auto"
T5_V1_1_XXL_WIDTH = 4096
TEXT_MAX_LEN = 120  # as PixArt-alpha: long enough for most dense captions


def get_config(arg: str = "XL-32E") -> ml_collections.ConfigDict:
  variant, *flags = [part.strip() for part in arg.split(",")]
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} in {arg!r}; choose one of {VARIANTS}")
  unknown = set(flags) - {"runlocal"}
  if unknown:
    raise ValueError(f"unknown config flag(s) {sorted(unknown)} in {arg!r}; only 'runlocal'")
  config = config_dict()
  config.model.update(model_overrides(variant))
  config.model.update(in_channels=4, remat=REMAT, scan_layers=SCAN_LAYERS[variant],
                      qk_norm_impl=QK_NORM_IMPL,
                      text_encoder="t5", text_hidden_size=T5_V1_1_XXL_WIDTH,
                      text_max_len=TEXT_MAX_LEN)
  # Required on the command line: the latents and the weights directories
  # (config.pretrained.text_encoder and config.pretrained.vae).
  config.data.update(dataset="latents:", worker_count=4, cached_context=True)
  config.mesh.update(data=1, fsdp=-1)
  config.batch_size = 4096
  config.num_train_steps = 800_000
  config.learning_rate = 1e-4
  config.warmup_steps = 20_000
  config.ema_decay = 0.9999  # ~10K steps of averaging: short next to 800K steps
  config.diffusion.mask_ratio = 0.5
  config.checkpoint_every_steps = 5_000
  config.keep_checkpoints = 2
  config.sample_every_steps = 10_000
  config.eval_every_steps = 0  # GenEval-Shapes scores the built-in data only
  config.sample.prompts = (
      "a photograph of an astronaut riding a horse", "a red bicycle leaning against a wall",
      "a bowl of fruit on a wooden table", "a lighthouse on a cliff at sunset",
      "a cat sleeping on a windowsill", "a city street in the rain at night",
      "a snowy mountain above a lake", "a watercolor painting of a fox")
  if "runlocal" in flags:
    config.model.update(hidden_size=64, num_layers=2, num_heads=2, dtype="float32",
                        remat="none", image_size=16, text_hidden_size=32, text_max_len=16)
    config.data.worker_count = 0
    config.pretrained.dtype = "float32"  # bfloat16 is slower than float32 on most CPUs
    config.ema_decay = 0.995
    default.runlocal_schedule(config)
    config.sample.num_steps = 10
    config.sample.prompts = DEFAULT_PROMPTS
  return config
