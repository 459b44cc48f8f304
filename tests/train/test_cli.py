"""The command-line tools end to end, as a user runs them (subprocesses, CPU-sized), around one
tiny run trained once for the module."""

import json
import os
import signal
import time

import jax
import numpy as np
import pytest
from PIL import Image

from ecdit_jax.checkpoint import Checkpointer
from ecdit_jax.inference import run as inference
from ecdit_jax.parallel.mesh import MeshConfig
from tests.commands import run, run_ok, start
from tests.tiny import tiny_train_flags

pytestmark = pytest.mark.slow


def _png(path):
  return np.asarray(Image.open(path), np.int32)


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  """A 4-step run that checkpoints at 2 and 4, and samples and scores itself at step 4."""
  root = tmp_path_factory.mktemp("cli")
  workdir = str(root / "run")
  result = run_ok(["ecdit_jax.main", "--config=configs/default.py", f"--workdir={workdir}",
                   *tiny_train_flags(**{"data.data_dir": data_dir, "num_train_steps": 4,
                                        "log_every_steps": 2, "checkpoint_every_steps": 2,
                                        "sample_every_steps": 4, "eval_every_steps": 4,
                                        "eval.num_per_category": 1})])
  prompts = root / "prompts.txt"
  prompts.write_text("a red circle\na blue square\n")
  samples = root / "samples"
  run_ok(["ecdit_jax.sample", f"--workdir={workdir}", f"--prompts={prompts}",
          f"--outdir={samples}", "--steps=3", "--seed=1"])
  return root, workdir, result, prompts, samples


def test_training_writes_checkpoints_metrics_grid_and_score(trained):
  _, workdir, result, _, _ = trained
  stdout = result.stdout
  assert "step 4/4" in stdout
  # What the run does is said as it happens, in plain lines a redirected log keeps readable.
  for said in ("compiled in", "step 2: saving a checkpoint",
               "step 4: sample grid", "step 4: GenEval-Shapes", "finished: step 4 of 4"):
    assert said in stdout, said
  output = stdout + result.stderr
  for noise in ("\r", "\x1b[", "OpenCV", "custom data configuration"):
    assert noise not in output, noise
  assert Checkpointer(workdir).all_steps() == [2, 4]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [2, 4, 4]  # step 4: training scalars, then the eval
  assert "routing/block_01/tokens_2plus_experts" in rows[1]
  assert 0.0 <= rows[2]["eval/geneval_shapes/overall"] <= 1.0
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert not os.path.exists(os.path.join(workdir, "profile"))  # config.profile is off by default
  grid = Image.open(os.path.join(workdir, "samples", "step_0000004.png"))
  assert grid.size[0] == 4 * 32 * 4  # four 32x32 samples a row, enlarged 4x


def test_samples_are_pngs_that_do_not_depend_on_their_batch(trained):
  root, workdir, _, prompts, samples = trained
  assert sorted(os.listdir(samples)) == ["00000.png", "00001.png"]
  first = np.asarray(Image.open(samples / "00000.png"))
  assert first.shape == (32, 32, 3) and first.dtype == np.uint8
  alone_prompts = root / "one_prompt.txt"
  alone_prompts.write_text("a red circle\n")
  alone = root / "alone"
  run_ok(["ecdit_jax.sample", f"--workdir={workdir}", f"--prompts={alone_prompts}",
          f"--outdir={alone}", "--steps=3", "--seed=1"])
  np.testing.assert_array_equal(np.asarray(Image.open(alone / "00000.png")), first)
  # Existing samples are never overwritten.
  result = run(["ecdit_jax.sample", f"--workdir={workdir}", f"--prompts={prompts}",
                f"--outdir={alone}"])
  assert result.returncode != 0 and "not empty" in result.stderr


def test_an_export_samples_the_same_images_and_is_never_overwritten(trained):
  root, workdir, _, prompts, samples = trained
  exported = str(root / "export")
  result = run_ok(["ecdit_jax.export", f"--workdir={workdir}", f"--out={exported}"])
  assert "exported step 4" in result.stdout
  from_export = root / "from_export"
  run_ok(["ecdit_jax.sample", f"--workdir={exported}", f"--prompts={prompts}",
          f"--outdir={from_export}", "--steps=3", "--seed=1"])
  for name in ("00000.png", "00001.png"):
    np.testing.assert_array_equal(_png(from_export / name), _png(samples / name))
  result = run(["ecdit_jax.export", f"--workdir={workdir}", f"--out={exported}"])
  assert result.returncode != 0 and "never overwrite" in result.stderr


def test_routing_analysis_samples_the_same_images_and_records_every_step(trained):
  root, workdir, _, prompts, samples = trained
  analysis = root / "routing"
  run_ok(["ecdit_jax.analyze_routing", f"--workdir={workdir}", f"--prompts={prompts}",
          f"--outdir={analysis}", "--steps=3", "--seed=1"])
  for name in ("00000.png", "00001.png"):  # the package's own sampler: the same images
    np.testing.assert_array_equal(_png(analysis / "images" / name), _png(samples / name))
    assert (analysis / "heatmaps" / name).exists()
  summary = json.loads((analysis / "summary.json").read_text())
  assert len(summary["experts_per_token_by_step"]) == 3
  assert np.load(analysis / "counts.npy").shape == (3, 1, 2, 64)


def test_sampling_on_a_mesh_restores_shards_and_gives_the_same_images(trained):
  root, workdir, _, _, samples = trained
  prompts = root / "one_prompt_mesh.txt"
  prompts.write_text("a red circle\n")
  # On 8 simulated devices (experts over 2, FSDP over 2, data over 2) the parameters are
  # restored in shards and the images are those of one device, up to rounding.
  on_mesh = root / "on_mesh"
  run_ok(["ecdit_jax.sample", f"--workdir={workdir}", f"--prompts={prompts}",
          f"--outdir={on_mesh}", "--steps=3", "--seed=1", "--mesh=expert=2,fsdp=2"])
  assert np.abs(_png(on_mesh / "00000.png") - _png(samples / "00000.png")).max() <= 1
  sharded = inference.load_run(workdir, mesh_config=MeshConfig.parse("expert=2,fsdp=2"))
  specs = {str(leaf.sharding.spec) for leaf in jax.tree.leaves(sharded.params)}
  assert any("expert" in spec for spec in specs) and any("fsdp" in spec for spec in specs)
  result = run(["ecdit_jax.sample", f"--workdir={workdir}", f"--prompts={prompts}",
                f"--outdir={root / 'bad_mesh'}", "--mesh=expert=3"])
  assert result.returncode != 0 and "--mesh" in result.stderr


def test_evaluation_at_capacities_and_at_the_training_settings(trained):
  _, workdir, _, _, _ = trained
  result = run_ok(["ecdit_jax.evaluate", f"--workdir={workdir}", "--num_per_category=2",
                   "--capacity_factors=1,2", "--steps=2"])
  assert "| overall |" in result.stdout
  [report] = [r for r in os.listdir(os.path.join(workdir, "eval")) if "_n2_" in r]
  results = json.loads(open(os.path.join(workdir, "eval", report)).read())["results"]
  assert set(results) == {"1.0", "2.0"}
  for summary in results.values():
    assert set(summary["counts"].values()) == {2} and len(summary["counts"]) == 6
    assert 0.0 <= summary["overall"] <= 1.0
  # The CLI at the training run's settings gives the score logged during training.
  run_ok(["ecdit_jax.evaluate", f"--workdir={workdir}", "--num_per_category=1",
          "--capacity_factors=2", "--steps=2", "--seed=0", "--batch_size=3"])
  [report] = [r for r in os.listdir(os.path.join(workdir, "eval")) if "_n1_" in r]
  again = json.loads(open(os.path.join(workdir, "eval", report)).read())["results"]["2.0"]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    in_training = [json.loads(line) for line in f][-1]
  assert again["overall"] == in_training["eval/geneval_shapes/overall"]


def test_bad_overrides_fail_at_start_naming_the_key(data_dir, tmp_path):
  base = ["ecdit_jax.main", "--config=configs/default.py", f"--workdir={tmp_path / 'bad'}",
          f"--config.data.data_dir={data_dir}"]
  result = run(base + ["--config.model.num_heads=5"])
  assert result.returncode != 0 and "config.model.num_heads" in result.stderr
  result = run(base + ["--config.no_such_key=1"])
  assert result.returncode != 0 and "no_such_key" in result.stderr


def _wait_for_steps(proc, workdir, count, timeout=300):
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= count):
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline, "training never logged"
    time.sleep(0.2)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_save_a_checkpoint_and_exit_cleanly(data_dir, tmp_path, signum):
  workdir = str(tmp_path / "term")
  proc = start(["ecdit_jax.main", "--config=configs/default.py", f"--workdir={workdir}",
                *tiny_train_flags(**{"data.data_dir": data_dir, "num_train_steps": 100000,
                                     "checkpoint_every_steps": 100000})])
  _wait_for_steps(proc, workdir, 1)
  proc.send_signal(signum)
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-3000:]
  steps = Checkpointer(workdir).all_steps()
  assert len(steps) == 1 and 1 <= steps[0] < 100000
  assert f"saved step {steps[0]}" in stdout


def test_kill_during_training_never_damages_saved_checkpoints(data_dir, tmp_path):
  workdir = str(tmp_path / "killed")
  args = ["ecdit_jax.main", "--config=configs/default.py", f"--workdir={workdir}",
          *tiny_train_flags(**{"data.data_dir": data_dir, "checkpoint_every_steps": 1,
                               "keep_checkpoints": 2})]
  proc = start([*args, "--config.num_train_steps=100000"], stdout=None)
  # Saves are asynchronous and happen every step, so a kill lands in or next to a save.
  _wait_for_steps(proc, workdir, 4)
  proc.kill()
  proc.wait(timeout=60)
  steps = Checkpointer(workdir).all_steps()
  assert steps, "completed checkpoints survive the kill"
  latest = steps[-1]
  # Restarting resumes from the newest complete checkpoint and trains on.
  result = run_ok([*args, f"--config.num_train_steps={latest + 2}"])
  assert f"resumed from step {latest}" in result.stdout
  assert Checkpointer(workdir).all_steps()[-1] == latest + 2
