"""Two JAX processes on this machine (coordinator on 127.0.0.1, CPU collectives) train with the
data split between them, checkpoint, restart and resume; their losses are those of one process
fed the same global batches."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import default
from ecdit_jax.data import pipeline
from ecdit_jax.model import ModelConfig
from ecdit_jax.train import input_pipeline
from ecdit_jax.train.optimizer import make_optimizer
from ecdit_jax.train.state import create_train_state
from ecdit_jax.train.step import make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OVERRIDES = {
    "model.hidden_size": 32, "model.num_layers": 2, "model.num_heads": 2,
    "model.num_kv_heads": 1, "model.num_experts": 4, "model.text_hidden_size": 16,
    "model.text_num_layers": 1, "model.text_num_heads": 2, "data.num_train": 96,
    "data.num_test": 16, "batch_size": 8, "warmup_steps": 2, "log_every_steps": 1,
    "checkpoint_every_steps": 2, "sample_every_steps": 4, "sample.num_steps": 2,
    # 2 processes x 2 devices: batch over data, experts over expert.
    "mesh.data": 2, "mesh.expert": 2,
}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _train_two_processes(workdir, data_dir, num_steps):
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  flags += [f"--config.data.data_dir={data_dir}", f"--config.num_train_steps={num_steps}"]
  procs = [subprocess.Popen(
      [sys.executable, "-m", "ecdit_jax.main", "--config=configs/default.py",
       f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
       f"--process_id={i}", *flags],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outputs = []
  for proc in procs:
    try:
      outputs.append(proc.communicate(timeout=400)[0])
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      pytest.fail("the two-process run did not finish")
  for proc, output in zip(procs, outputs):
    assert proc.returncode == 0, output[-3000:]
  return outputs


def _reference_losses(workdir, data_dir, num_steps):
  """One process, one device: each step's batch is process 0's rows then process 1's."""
  config = default.get_config()
  for key, value in {**OVERRIDES, "data.data_dir": data_dir}.items():
    parent, leaf = key.rsplit(".", 1) if "." in key else (None, key)
    (config[parent] if parent else config)[leaf] = value
  model_config = ModelConfig.from_mapping(config.model)
  source = input_pipeline.data_source(config, "train")
  tok = input_pipeline.tokenizer_for(config, workdir, source)  # the run's own tokenizer
  null = input_pipeline.null_tokens(tok, model_config.text_max_len)
  iterators = [pipeline.make_dataset_iterator(
      source, tokenizer=tok, batch_size=config.batch_size // 2,
      image_size=model_config.image_size, max_text_len=model_config.text_max_len,
      seed=config.seed, image_key="image", text_key="caption", shard_index=i, shard_count=2)
      for i in range(2)]
  optimizer = make_optimizer(config)
  graphdef, state = create_train_state(model_config, optimizer, config.seed)
  step = jax.jit(make_train_step(graphdef, model_config, config, optimizer, null, masked=False))
  losses = []
  for _ in range(num_steps):
    parts = [next(it) for it in iterators]
    batch = {k: np.concatenate([p[k] for p in parts]) for k in ("image", "tokens")}
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return losses


def test_two_processes_train_checkpoint_resume_and_match_one(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  first = _train_two_processes(workdir, data_dir, num_steps=2)
  assert "process 0 of 2" in first[0] and "process 1 of 2" in first[1]
  second = _train_two_processes(workdir, data_dir, num_steps=4)  # both restart, then resume
  assert "resumed from step 2" in second[0]
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    logged = {r["step"]: r["loss"] for r in map(json.loads, f)}
  assert sorted(logged) == [1, 2, 3, 4]
  # The sampler ran on the mesh too (parameters in their shards, prompts in both processes).
  assert os.path.exists(os.path.join(workdir, "samples", "step_0000004.png"))
  expected = _reference_losses(workdir, data_dir, num_steps=4)
  np.testing.assert_allclose([logged[s] for s in (1, 2, 3, 4)], expected, rtol=2e-5)
