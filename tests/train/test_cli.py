"""The command-line tools end to end, as a user runs them (subprocesses, CPU-sized)."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
from PIL import Image

from ecdit_jax.train import inference
from ecdit_jax.train.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--config.model.hidden_size=32", "--config.model.num_layers=2",
        "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
        "--config.model.num_experts=4", "--config.model.text_hidden_size=16",
        "--config.model.text_num_layers=1", "--config.model.text_num_heads=2",
        "--config.data.num_train=96", "--config.data.num_test=16", "--config.batch_size=8",
        "--config.warmup_steps=2", "--config.sample.num_steps=2"]


def run(args, **kwargs):
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=600, **kwargs)


def test_train_then_sample(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  result = run(["ecdit_jax.main", "--config=configs/default.py", f"--workdir={workdir}",
                f"--config.data.data_dir={data_dir}", "--config.num_train_steps=4",
                "--config.log_every_steps=2", "--config.checkpoint_every_steps=2",
                "--config.sample_every_steps=4", "--config.eval_every_steps=4",
                "--config.eval.num_per_category=1", *TINY])
  assert result.returncode == 0, result.stderr[-3000:]
  assert "step 4/4" in result.stdout
  assert Checkpointer(workdir).all_steps() == [2, 4]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [2, 4, 4]  # step 4: training scalars, then the eval
  assert "routing/block_01/tokens_2plus_experts" in rows[1]
  in_training = rows[2]
  assert 0.0 <= in_training["eval/geneval_shapes/overall"] <= 1.0
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert not os.path.exists(os.path.join(workdir, "profile"))  # config.profile is off by default
  grid = Image.open(os.path.join(workdir, "samples", "step_0000004.png"))
  assert grid.size[0] == 4 * 32 * 4  # four 32x32 samples a row, enlarged 4x

  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a red circle\na blue square\n")
  outdir = str(tmp_path / "samples")
  result = run(["ecdit_jax.sample", f"--workdir={workdir}", f"--prompts={prompts}",
                f"--outdir={outdir}", "--steps=3", "--seed=1"])
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(outdir)) == ["00000.png", "00001.png"]
  first = np.asarray(Image.open(os.path.join(outdir, "00000.png")))
  assert first.shape == (32, 32, 3) and first.dtype == np.uint8
  # An export (EMA parameters, config, tokenizer; no optimizer state) samples the same images.
  exported = str(tmp_path / "export")
  result = run(["ecdit_jax.export", f"--workdir={workdir}", f"--out={exported}"])
  assert result.returncode == 0, result.stderr[-3000:]
  assert "exported step 4" in result.stdout
  from_export = str(tmp_path / "from_export")
  result = run(["ecdit_jax.sample", f"--workdir={exported}", f"--prompts={prompts}",
                f"--outdir={from_export}", "--steps=3", "--seed=1"])
  assert result.returncode == 0, result.stderr[-3000:]
  for name in ("00000.png", "00001.png"):
    np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(from_export, name))),
                                  np.asarray(Image.open(os.path.join(outdir, name))))
  result = run(["ecdit_jax.export", f"--workdir={workdir}", f"--out={exported}"])
  assert result.returncode != 0 and "never overwrite" in result.stderr
  # Routing analysis of the same prompts and seed: the same images, plus where compute went.
  analysis = str(tmp_path / "routing")
  result = run(["ecdit_jax.analyze_routing", f"--workdir={workdir}", f"--prompts={prompts}",
                f"--outdir={analysis}", "--steps=3", "--seed=1"])
  assert result.returncode == 0, result.stderr[-3000:]
  for name in ("00000.png", "00001.png"):
    got = np.asarray(Image.open(os.path.join(analysis, "images", name)), np.int32)
    want = np.asarray(Image.open(os.path.join(outdir, name)), np.int32)
    assert np.abs(got - want).max() <= 1  # per-step jit vs one fused loop: rounding only
    assert os.path.exists(os.path.join(analysis, "heatmaps", name))
  with open(os.path.join(analysis, "summary.json")) as f:
    routing_summary = json.load(f)
  assert len(routing_summary["experts_per_token_by_step"]) == 3
  assert np.load(os.path.join(analysis, "counts.npy")).shape == (3, 1, 2, 64)
  # Image 0 does not depend on its batch mates: sampled alone it is identical.
  prompts.write_text("a red circle\n")
  alone = str(tmp_path / "alone")
  result = run(["ecdit_jax.sample", f"--workdir={workdir}", f"--prompts={prompts}",
                f"--outdir={alone}", "--steps=3", "--seed=1"])
  assert result.returncode == 0, result.stderr[-3000:]
  np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(alone, "00000.png"))), first)
  # On a mesh (8 simulated devices: experts over 2, FSDP over 2, data over 2) the parameters
  # are restored in shards and the images are those of one device, up to rounding.
  on_mesh = str(tmp_path / "on_mesh")
  result = run(["ecdit_jax.sample", f"--workdir={workdir}", f"--prompts={prompts}",
                f"--outdir={on_mesh}", "--steps=3", "--seed=1", "--mesh=expert=2,fsdp=2"])
  assert result.returncode == 0, result.stderr[-3000:]
  got = np.asarray(Image.open(os.path.join(on_mesh, "00000.png")), np.int32)
  assert np.abs(got - first.astype(np.int32)).max() <= 1
  sharded = inference.load_run(workdir, mesh_sizes=inference.parse_mesh("expert=2,fsdp=2"))
  specs = {str(leaf.sharding.spec) for leaf in jax.tree.leaves(sharded.params)}
  assert any("expert" in spec for spec in specs) and any("fsdp" in spec for spec in specs)
  result = run(["ecdit_jax.sample", f"--workdir={workdir}", f"--prompts={prompts}",
                f"--outdir={tmp_path / 'bad_mesh'}", "--mesh=expert=3"])
  assert result.returncode != 0 and "--mesh" in result.stderr
  # The GenEval-Shapes evaluation at two inference capacities.
  result = run(["ecdit_jax.evaluate", f"--workdir={workdir}", "--num_per_category=2",
                "--capacity_factors=1,2", "--steps=2"])
  assert result.returncode == 0, result.stderr[-3000:]
  assert "| overall |" in result.stdout
  [report] = os.listdir(os.path.join(workdir, "eval"))
  with open(os.path.join(workdir, "eval", report)) as f:
    results = json.load(f)["results"]
  assert set(results) == {"1.0", "2.0"}
  for summary in results.values():
    assert set(summary["counts"].values()) == {2} and len(summary["counts"]) == 6
    assert 0.0 <= summary["overall"] <= 1.0
  # The CLI at the training run's settings gives the score logged during training.
  result = run(["ecdit_jax.evaluate", f"--workdir={workdir}", "--num_per_category=1",
                "--capacity_factors=2", "--steps=2", "--seed=0", "--batch_size=3"])
  assert result.returncode == 0, result.stderr[-3000:]
  [report] = [r for r in os.listdir(os.path.join(workdir, "eval")) if "_n1_" in r]
  with open(os.path.join(workdir, "eval", report)) as f:
    again = json.load(f)["results"]["2.0"]
  assert again["overall"] == in_training["eval/geneval_shapes/overall"]
  # Existing samples are never overwritten.
  result = run(["ecdit_jax.sample", f"--workdir={workdir}", f"--prompts={prompts}",
                f"--outdir={alone}"])
  assert result.returncode != 0 and "not empty" in result.stderr


def test_bad_overrides_fail_at_start_naming_the_key(data_dir, tmp_path):
  base = ["ecdit_jax.main", "--config=configs/default.py", f"--workdir={tmp_path / 'bad'}",
          f"--config.data.data_dir={data_dir}"]
  result = run(base + ["--config.model.num_heads=5"])
  assert result.returncode != 0 and "config.model.num_heads" in result.stderr
  result = run(base + ["--config.no_such_key=1"])
  assert result.returncode != 0 and "no_such_key" in result.stderr


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data_dir, tmp_path):
  workdir = str(tmp_path / "term")
  proc = subprocess.Popen(
      [sys.executable, "-m", "ecdit_jax.main", "--config=configs/default.py",
       f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
       "--config.num_train_steps=100000", "--config.log_every_steps=1",
       "--config.checkpoint_every_steps=100000", *TINY],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline, "training never logged a step"
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-3000:]
  steps = Checkpointer(workdir).all_steps()
  assert len(steps) == 1 and 1 <= steps[0] < 100000


def test_kill_during_training_never_damages_saved_checkpoints(data_dir, tmp_path):
  workdir = str(tmp_path / "killed")
  args = ["ecdit_jax.main", "--config=configs/default.py", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", "--config.log_every_steps=1",
          "--config.checkpoint_every_steps=1", "--config.keep_checkpoints=2", *TINY]
  proc = subprocess.Popen([sys.executable, "-m", *args, "--config.num_train_steps=100000"],
                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  # Saves are asynchronous and happen every step, so a kill lands in or next to a save.
  while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 4):
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline, "training never logged"
    time.sleep(0.2)
  proc.kill()
  proc.wait(timeout=60)
  steps = Checkpointer(workdir).all_steps()
  assert steps, "completed checkpoints survive the kill"
  latest = steps[-1]
  # Restarting resumes from the newest complete checkpoint and trains on.
  result = run([*args, f"--config.num_train_steps={latest + 2}"])
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"resumed from step {latest}" in result.stdout
  assert Checkpointer(workdir).all_steps()[-1] == latest + 2
