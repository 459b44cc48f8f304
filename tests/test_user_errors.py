"""Mistakes a user makes on the command line end in one line on stderr that names the flag or
key to fix, with exit status 2, and leave nothing behind."""

import os

import pytest

from tests.commands import run

pytestmark = pytest.mark.slow  # each case starts a tool


@pytest.fixture(scope="module")
def full(tmp_path_factory):
  """A directory that is not empty."""
  path = tmp_path_factory.mktemp("full")
  (path / "something").write_text("kept")
  return path


CASES = {
    "unknown config key": (["ecdit_jax.main", "--config=configs/default.py",
                            "--config.model.routr=1"], "--config.model.routr"),
    "missing config file": (["ecdit_jax.main", "--config=configs/nope.py"],
                            "--config=configs/nope.py: no such config file"),
    "no prompts to sample": (["ecdit_jax.main", "--config=configs/default.py",
                              "--config.sample.prompts=()"], "config.sample.prompts"),
    "unknown dataset": (["ecdit_jax.main", "--config=configs/default.py",
                         "--config.data.dataset=no_such_dataset", "--config.eval_every_steps=0"],
                        "config.data.dataset='no_such_dataset'"),
    "zero batch": (["ecdit_jax.sample", "--prompts=p.txt", "--outdir=o", "--batch_size=0"],
                   "--batch_size=0"),
    "no prompts file": (["ecdit_jax.sample", "--prompts=no_such.txt", "--outdir=o"],
                        "--prompts=no_such.txt"),
    "zero prompts a category": (["ecdit_jax.evaluate", "--num_per_category=0"],
                                "--num_per_category=0"),
    "capacity factors not numbers": (["ecdit_jax.evaluate", "--capacity_factors=abc"],
                                     "--capacity_factors=abc"),
    "export over a full directory": (["ecdit_jax.export", "--out={full}"], "never overwrite"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_mistakes_give_one_line_naming_what_to_fix(name, full, tmp_path, data_dir):
  args, expected = CASES[name]
  workdir = tmp_path / "typo_workdir"
  args = [a.format(full=full) for a in args]
  args += [f"--workdir={workdir}", f"--config.data.data_dir={data_dir}"] if args[0].endswith(
      "main") else [f"--workdir={workdir}"]
  result = run(args)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
  assert expected in lines[0]
  assert not workdir.exists()  # a mistake creates nothing
  assert os.listdir(full) == ["something"]
