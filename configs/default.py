r"""The embedded default: a tiny EC-DiT (8 experts) trained on GenEval-Shapes, 32x32 pixels.

Sized to learn visibly within minutes on a 2-core CPU; the same code scales to the paper's
models (configs/ecdit.py). Run it with:

  python -m ecdit_jax.main --config=configs/default.py --workdir=workdirs/default

Any key can be overridden on the command line, e.g. ``--config.batch_size=32``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # config.model: the fields of ecdit_jax.model.ModelConfig.
  config.model = ml_collections.ConfigDict(dict(
      image_size=32,
      in_channels=3,
      patch_size=4,  # 64 tokens: learns within minutes on a CPU (the paper uses 2 on latents)
      hidden_size=128,
      num_layers=6,
      num_heads=4,
      num_kv_heads=2,
      qk_norm=True,
      mlp_ratio=4.0,
      moe_layout="every_other",
      router="expert_choice",
      num_experts=8,
      capacity_factor=2.0,
      eval_capacity_factor=2.0,
      routing_group_size=1,
      router_z_loss_weight=0.0,
      token_choice_top_k=2,
      token_choice_capacity_factor=1.25,
      load_balance_loss_weight=0.01,
      moe_dispatch="gather",  # or "einsum" / "hybrid": one-hot matmuls in place of scatter-add
      text_encoder="scratch",  # or "t5" / "clip": frozen pretrained, weights in config.pretrained
      text_vocab_size=128,  # the tokenizer trained on the captions has fewer pieces
      text_max_len=16,
      text_hidden_size=128,
      text_num_layers=2,
      text_num_heads=4,
      dtype="float32",  # bfloat16 is slower than float32 on most CPUs; use it on accelerators
      param_dtype="float32",
      attention_impl="auto",
      remat="none",  # or "block" / "dots": recompute blocks in the backward pass to save memory
      # True: stack the blocks and scan over layers: compiles in a fraction of the time (see
      # bench/RESULTS.md); on GPU it pays off with remat="block", where it costs about 3%.
      scan_layers=False,
  ))

  # Frozen pretrained networks, as Hugging Face format directories (configs/t2i_256.py uses them):
  # text_encoder: T5 or CLIP weights + tokenizer, required when model.text_encoder != "scratch";
  # vae: the diffusers VAE of a latent model: decodes its samples (sample grids, sample CLI) and,
  # with data.vae_encode, encodes the training images;
  # dtype: the compute dtype of both.
  config.pretrained = ml_collections.ConfigDict(dict(text_encoder="", vae="", dtype="bfloat16"))

  # Data: GenEval-Shapes is generated locally on first use and cached under data_dir;
  # "latents:DIR" reads VAE latents written by `python -m ecdit_jax.precompute`.
  config.data = ml_collections.ConfigDict(dict(
      dataset="geneval_shapes",
      data_dir="",  # empty: ~/tensorflow_datasets
      num_train=20_000,
      num_test=1_000,
      generator_seed=0,
      image_key="image",
      text_key="caption",
      tokenizer_path="",  # empty: train a sentencepiece model on the captions and cache it
      tokenizer_vocab_size=64,
      worker_count=0,  # grain worker processes; 0 reads in the main process
      # Decode every record once, keep them in host memory and draw batches from there: for
      # datasets that fit in RAM, when decoding is slower than training (small models on GPU).
      # worker_count is then unused.
      cache_in_memory=False,
      # Encode images with pretrained.vae as they are read (center crop, resize to image_size x
      # the VAE's factor): training on latents without a precompute pass.
      vae_encode=False,
  ))

  # Rectified flow.
  config.diffusion = ml_collections.ConfigDict(dict(
      timestep_loc=0.0,  # logit-normal timesteps: sigmoid(N(loc, scale^2))
      timestep_scale=1.0,
      caption_dropout=0.1,  # probability of the null caption (classifier-free guidance)
      mask_ratio=0.0,  # MaskDiT-style token masking; the paper uses 0.5
      unmasked_final_steps=0,  # last steps trained without masking
  ))

  # Device mesh (ecdit_jax/parallel/mesh.py): devices per axis within a slice, -1 = the rest;
  # dcn_* = TPU slices (or GPU hosts) along an axis. The batch is split over data x fsdp x expert.
  config.mesh = ml_collections.ConfigDict(dict(
      data=-1, fsdp=1, expert=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_expert=1))

  # Optimisation (keys follow the flax examples).
  config.batch_size = 32  # global batch; split over devices and accumulation steps
  config.grad_accum_steps = 1
  config.num_train_steps = 10_000
  # RMSProp with momentum 0.9 takes steps ~1/(1 - 0.9) = 10x the learning rate in size, so
  # 3e-4 here is comparable to Adam at 3e-3; 1e-3 and above train worse or diverge.
  config.learning_rate = 3e-4
  config.warmup_steps = 500
  config.lr_decay = "none"  # or "cosine" / "linear" to 0 at num_train_steps (fixed budgets)
  config.momentum = 0.9  # RMSProp with momentum, as in the paper
  config.momentum_dtype = "float32"  # or "bfloat16": less memory traffic a step; fixed for a run
  config.rmsprop_decay = 0.999
  config.rmsprop_eps = 1e-8
  config.grad_clip_norm = 1.0
  config.weight_decay = 0.0
  # 0.995 averages over ~200 steps: 0.999 lags too far behind in runs of ~10K steps.
  config.ema_decay = 0.995
  config.nonfinite_loss = "stop"  # or "skip": drop the update of a step with a NaN/inf loss
  # Training steps per jitted call (a lax.scan over stacked batches). Dispatching a step costs
  # the host time per state buffer (~900 of them for the default model), which exceeds a small
  # model's device time on a GPU; several steps a call amortise it. The logging, checkpoint,
  # sample and eval intervals must be multiples of it.
  config.steps_per_call = 1

  # Logging, checkpoints, samples.
  config.log_every_steps = 100
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 3
  config.sample_every_steps = 1000
  # GenEval-Shapes score of the EMA parameters during training (0 = off), with the sampler
  # settings of config.sample; logged as eval/geneval_shapes/*. The full evaluation (100 prompts
  # a category, capacity sweeps) is `python -m ecdit_jax.evaluate`.
  config.eval_every_steps = 2500
  config.eval = ml_collections.ConfigDict(dict(num_per_category=10, batch_size=60))
  # A jax.profiler trace of num_steps steps (0 = none), skip_steps after the run's first step
  # (past compilation), into workdir/profile; bench/trace_summary.py summarises it.
  config.profile = ml_collections.ConfigDict(dict(num_steps=0, skip_steps=20))
  config.sample = ml_collections.ConfigDict(dict(
      num_steps=25,
      method="euler",  # or heun
      cfg_scale=3.0,
      prompts=("a red circle", "a blue square", "a green triangle", "a yellow circle",
               "a purple square", "a cyan triangle", "a red square and a blue circle",
               "two triangles"),
  ))
  return config


def runlocal_schedule(config: ml_collections.ConfigDict) -> None:
  """The step counts of every ``runlocal`` variant: a few steps of batch 8 that still log,
  checkpoint and sample, so a laptop run goes through the whole loop in seconds."""
  config.batch_size = 8
  config.num_train_steps = 20
  config.warmup_steps = 5
  config.log_every_steps = 5
  config.checkpoint_every_steps = 10
  config.sample_every_steps = 20
