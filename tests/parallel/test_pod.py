"""A pod simulated on this machine: processes with their own CPU devices joined through a
coordinator on 127.0.0.1, running the same commands a TPU pod's workers run.

Four processes of two devices train; SIGTERM reaches one of them only, and all four save the
same step and exit cleanly. The run then resumes on two processes of four devices, on another
mesh, and every logged loss is that of one uninterrupted process fed the same global batches.
The finished run is exported and sampled by two processes, with the parameters in shards over
all their devices, and the images are those one device draws."""

import json
import os
import signal
import time

import jax
import numpy as np
import pytest
from PIL import Image

from ecdit_jax.checkpoint import Checkpointer
from ecdit_jax.config import TrainConfig
from ecdit_jax.data import sources
from ecdit_jax.data import tokenizer as tokenizer_lib
from ecdit_jax.inference import images, run as inference
from ecdit_jax.train import input as input_lib
from ecdit_jax.train.optimizer import make_optimizer
from ecdit_jax.train.state import create_train_state
from ecdit_jax.train.step import make_train_step
from tests.commands import finish, start_pod
from tests.tiny import tiny_train_config, tiny_train_flags

pytestmark = pytest.mark.slow

STOP_WITHIN_S = 60


def _train_args(workdir, data_dir, **overrides):
  return ["ecdit_jax.main", "--config=configs/default.py", f"--workdir={workdir}",
          *tiny_train_flags(**{"data.data_dir": data_dir, "checkpoint_every_steps": 1000,
                               **overrides})]


def _logged_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _uninterrupted_losses(workdir, data_dir, num_steps):
  """One process on one device, the same global batches from step 0."""
  cfg = TrainConfig.from_mapping(tiny_train_config(data_dir))
  source = sources.open_source(cfg.data, "train", image_size=cfg.model.image_size)
  tok = tokenizer_lib.load_tokenizer(os.path.join(workdir, "tokenizer.model"))  # the run's own
  batches = input_lib.train_batches(cfg, source, tok, start_step=0, process_index=0,
                                    process_count=1)
  optimizer = make_optimizer(cfg)
  graphdef, state = create_train_state(cfg.model, optimizer, cfg.seed)
  step = jax.jit(make_train_step(graphdef, cfg, optimizer,
                                 tokenizer_lib.null_tokens(tok, cfg.model.text_max_len),
                                 masked=False))
  losses = {}
  for number in range(1, num_steps + 1):
    batch = next(batches)
    state, metrics = step(state, {k: batch[k] for k in ("image", "tokens")})
    losses[number] = float(metrics["loss"])
  return losses


@pytest.fixture(scope="module")
def pod_run(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("pod") / "run")
  # 4 processes x 2 devices: data 2 x fsdp 2 x expert 2, training until told to stop.
  pod = start_pod(_train_args(workdir, data_dir, num_train_steps=100_000,
                               **{"mesh.fsdp": 2, "mesh.expert": 2}), 4, 2)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 400
  while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 3):
    assert all(p.poll() is None for p in pod), [p.communicate()[1][-2000:] for p in pod]
    assert time.time() < deadline, "the pod never trained three steps"
    time.sleep(0.2)
  pod[2].send_signal(signal.SIGTERM)  # one worker of four is preempted
  stopped_at = time.time()
  outputs = finish(pod, STOP_WITHIN_S)
  stop_seconds = time.time() - stopped_at
  return workdir, outputs, stop_seconds


def test_one_sigterm_stops_every_process_at_the_same_saved_step(pod_run):
  workdir, outputs, stop_seconds = pod_run
  assert stop_seconds < STOP_WITHIN_S
  saved = set()
  for out in outputs:
    [line] = [l for l in out.splitlines() if l.startswith("stop requested: saved step")]
    saved.add(int(line.split()[4].rstrip(";")))
  assert len(saved) == 1
  [step] = saved
  assert Checkpointer(workdir).all_steps() == [step]


def test_the_run_resumes_on_two_processes_with_the_uninterrupted_losses(pod_run, data_dir):
  workdir, _, _ = pod_run
  stopped = Checkpointer(workdir).latest_step()
  # 2 processes x 4 devices, another mesh (data 2 x expert 4), the same global batch.
  outputs = finish(start_pod(_train_args(workdir, data_dir, num_train_steps=stopped + 3,
                                           **{"mesh.expert": 4}), 2, 4), 400)
  assert f"resumed from step {stopped}" in outputs[0]
  logged = _logged_losses(workdir)
  assert sorted(logged) == list(range(1, stopped + 4))
  expected = _uninterrupted_losses(workdir, data_dir, stopped + 3)
  for step in logged:
    np.testing.assert_allclose(logged[step], expected[step], rtol=1e-3, err_msg=f"step {step}")


def test_two_processes_export_and_sample_in_shards(pod_run, tmp_path):
  workdir, _, _ = pod_run
  exported = str(tmp_path / "export")
  finish(start_pod(["ecdit_jax.export", f"--workdir={workdir}", f"--out={exported}"], 2, 4),
          300)
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a red circle\ntwo squares\n")
  outdir = tmp_path / "samples"
  outputs = finish(start_pod(["ecdit_jax.sample", f"--workdir={exported}",
                                f"--prompts={prompts}", f"--outdir={outdir}", "--steps=3",
                                "--mesh=expert=2,fsdp=2"], 2, 4), 300)
  assert "wrote 2 images" in outputs[0]
  alone = inference.load_run(exported)  # this process: one device, the parameters whole
  sampler = inference.make_run_sampler(alone, num_steps=3, cfg_scale=alone.config.sample.cfg_scale,
                                       method="euler")
  tokens = alone.tokenizer.encode_batch(["a red circle", "two squares"],
                                        alone.model_config.text_max_len)
  want = images.to_uint8(sampler(alone.params, tokens, alone.null_tokens, 0)).astype(int)
  for i in range(2):
    got = np.asarray(Image.open(outdir / f"{i:05d}.png"), int)
    assert np.abs(got - want[i]).max() <= 1
