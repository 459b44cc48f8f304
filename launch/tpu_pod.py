#!/usr/bin/env python3
"""Trains ecdit_jax on Cloud TPU slices: one slice or several (multislice), and keeps it going.

  launch/tpu_pod.sh --name=NAME --zone=ZONE --workdir=gs://BUCKET/RUN [--accelerator=v5p-256]
      [--num_slices=N] [--queued] [--reserved | --reservation=R | --spot]
      [--config=configs/FILE.py:ARG] [--dry_run] [-- --config.KEY=VALUE ...]
  launch/tpu_pod.sh --name=NAME --zone=ZONE [--num_slices=N] --logs | --stop | --delete

A training launch, in order (launch/README.md documents every flag and walks through a run):

1. Builds what the workers install, here, and uploads it under WORKDIR/launch/: the project wheel
   and the repository's configs/ (one object per content hash of this checkout), a lock of the
   `.[tpu]` requirements with every wheel it names (resolved once per run, for the workers'
   CPython on manylinux x86_64), and a CPython build the workers unpack. The workers then need
   nothing from the internet: they read the bucket alone.
2. Creates the slices (a TPU VM, or a queued resource of --num_slices nodes), or reuses READY ones.
3. Installs on every worker of every slice (skipped where the same artifacts are installed).
4. Starts one training process per worker under nohup, with JAX's persistent compilation cache
   in the bucket and the libtpu flags for collective overlap in its environment.
5. Watches: streams worker 0's log, polls the slices' state and every worker's exit record in
   the bucket. A preempted or failed slice is deleted, created again, reinstalled and restarted
   (training resumes from the workdir's latest checkpoint), at most --max_restarts times, until
   every worker has exited 0 at the run's last step.

Standard library only, Python 3.9 or newer: it runs where gcloud runs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROG = "tpu_pod.sh"

# TPU family -> (default runtime image, TensorCores per chip, chips per host in a multi-host slice).
# v4 and v5p sizes count TensorCores (2 per chip); v5e and v6e sizes count chips, and their
# slices of up to 8 chips are a single host.
FAMILIES = {
    "v4": ("tpu-ubuntu2204-base", 2, 4),
    "v5p": ("v2-alpha-tpuv5", 2, 4),
    "v5litepod": ("v2-alpha-tpuv5-lite", 1, 4),
    "v6e": ("v2-alpha-tpuv6e", 1, 4),
}
# libtpu's flags that overlap collectives (FSDP gathers, gradient reductions) with compute.
OVERLAP_FLAGS = (
    "--xla_tpu_enable_async_collective_fusion=true "
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true "
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true "
    "--xla_tpu_overlap_compute_collective_tc=true "
    "--xla_enable_async_all_gather=true")
# The workers' interpreter: the runtime images ship Python 3.10 and ecdit_jax needs 3.11+.
PYTHON_DIST = (
    "https://github.com/astral-sh/python-build-standalone/releases/download/20240909/"
    "cpython-3.12.6%2B20240909-x86_64-unknown-linux-gnu-install_only_stripped.tar.gz"
    "#sha256=b080463e4f0c452e592cdac1ca97936a6a19bb3d9a64da669a50ca843fce0108")
WORKER_GLIBC = (2, 35)  # Ubuntu 22.04, the base of every default runtime image above
BUILD_FROM_SOURCE = "promise"  # requirements published only as sdists (pure Python)
READY = {"READY", "ACTIVE"}
LOST = {"PREEMPTED", "TERMINATED", "STOPPED", "STOPPING", "FAILED", "SUSPENDING", "SUSPENDED",
        "DELETING", "HIDDEN", "HIDING"}
WAITING = {"CREATING", "STARTING", "RESTARTING", "REPAIRING", "ACCEPTED", "PROVISIONING",
           "WAITING_FOR_RESOURCES", "CREATING_RESOURCES", "UNHIDING"}
STOP_LINE = "stop requested: saved step"  # printed by every process that saved on a stop
REMOVED_FLAGS = {
    "--repo": "the workers install the wheel built from this checkout: check out the revision "
              "here instead of --repo/--ref",
    "--ref": "the workers install the wheel built from this checkout: check out the revision "
             "here instead of --repo/--ref",
    "--python": "the workers' interpreter is --python_dist (CPython 3.12 by default)",
}


def say(text: str) -> None:
  print(f"tpu_pod: {text}", flush=True)


def die(text: str, status: int = 2) -> None:
  print(f"{PROG}: {text}", file=sys.stderr, flush=True)
  sys.exit(status)


# ----------------------------------------------------------------------------------------------
# Arguments


class Parser(argparse.ArgumentParser):

  def error(self, message):
    die(f"{message} (see --help)")


def make_parser() -> argparse.ArgumentParser:
  p = Parser(prog=PROG, allow_abbrev=False, description=__doc__.split("\n\n")[0],
             formatter_class=argparse.RawDescriptionHelpFormatter,
             epilog="Flags take --flag=value or --flag value, with - or _ in their names. "
                    "Everything after '--' is appended to the training command.")
  slc = p.add_argument_group("slices")
  slc.add_argument("--name", help="TPU VM name, or queued resource name and node prefix")
  slc.add_argument("--zone", help="zone, e.g. us-east5-a (v5p) or us-central2-b (v4)")
  slc.add_argument("--project", help="Google Cloud project (default: gcloud's)")
  slc.add_argument("--accelerator", default="v5p-8", help="slice type (default v5p-8)")
  slc.add_argument("--version", help="TPU runtime version (default: by --accelerator)")
  slc.add_argument("--num_slices", type=int, default=1,
                   help="slices joined over DCN; >1 uses a queued resource and sets "
                        "--config.mesh.dcn_data to match")
  slc.add_argument("--queued", action="store_true", help="create through a queued resource")
  cap = slc.add_mutually_exclusive_group()
  cap.add_argument("--spot", action="store_true", help="Spot capacity (preemptible)")
  cap.add_argument("--reserved", action="store_true", help="use the project's reservation")
  cap.add_argument("--reservation", help="consume this reservation by name (queued resource, "
                   "through gcloud alpha)")
  slc.add_argument("--service_account", help="service account of the TPU VMs")
  slc.add_argument("--network", help="VPC network")
  slc.add_argument("--subnetwork", help="VPC subnetwork (Private Google Access on, for GCS)")
  slc.add_argument("--internal_ips", action="store_true", help="VMs without external IPs")
  slc.add_argument("--ssh_via", choices=("external", "internal", "iap"),
                   help="how gcloud reaches the workers: external IPs, internal IPs (the "
                        "launcher runs inside the VPC) or an IAP tunnel (default: iap with "
                        "--internal_ips, else external)")
  run = p.add_argument_group("run")
  run.add_argument("--workdir", help="gs://BUCKET/DIR: checkpoints, metrics, samples")
  run.add_argument("--config", default="configs/default.py", help="config under configs/")
  run.add_argument("--module", default="ecdit_jax.main",
                   help="the program every worker runs: ecdit_jax.main (training: --config and "
                        "--workdir are passed), or another, e.g. ecdit_jax.precompute, "
                        "ecdit_jax.export or ecdit_jax.evaluate, which gets only the "
                        "arguments after '--'")
  run.add_argument("--launch_dir", help="gs:// folder for artifacts, exit records and logs "
                   "(default WORKDIR/launch)")
  run.add_argument("--compilation_cache", help="JAX_COMPILATION_CACHE_DIR of the workers "
                   "(default WORKDIR/compilation_cache; '' turns it off)")
  run.add_argument("--libtpu_init_args", default=OVERLAP_FLAGS,
                   help="LIBTPU_INIT_ARGS of the workers (default: collective overlap; '' none)")
  run.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="more environment for the training processes (repeatable)")
  run.add_argument("--max_restarts", type=int, default=10,
                   help="slice recreations and restarts before giving up (default 10)")
  run.add_argument("--poll_seconds", type=float, default=60.0,
                   help="seconds between checks of the slices and the workers (default 60)")
  run.add_argument("--allow_local_workdir", action="store_true",
                   help="accept a workdir that every worker mounts (needs --launch_dir)")
  run.add_argument("--detach", action="store_true", help="start training and return")
  run.add_argument("--teardown", action="store_true", help="delete the slices at the end")
  run.add_argument("--skip_setup", action="store_true",
                   help="do not install on slices that were reused")
  run.add_argument("--dry_run", action="store_true", help="print every command, run none")
  art = p.add_argument_group("artifacts")
  art.add_argument("--python_dist", default=PYTHON_DIST, help="the workers' CPython: a "
                   "python-build-standalone install_only tarball, URL or file, with an "
                   "optional #sha256=HEX (default: a pinned CPython 3.12)")
  art.add_argument("--build_python", default=sys.executable,
                   help="interpreter whose pip builds the wheel and resolves the lock here")
  art.add_argument("--build_from_source", default=BUILD_FROM_SOURCE,
                   help="comma-separated requirements that publish no wheel (built here)")
  art.add_argument("--relock", action="store_true",
                   help="resolve the requirements again instead of reusing the run's lock")
  art.add_argument("--cache_dir", help="local cache (default ~/.cache/ecdit_jax/tpu_pod)")
  act = p.add_mutually_exclusive_group()
  actions = (("logs", "stream worker 0's log"),
             ("stop", "SIGTERM every worker: each saves one agreed step and exits"),
             ("delete", "delete the slices now"))
  for flag, what in actions:
    act.add_argument(f"--{flag}", dest="action", action="store_const", const=flag, help=what)
  p.set_defaults(action="train")
  return p


def normalize(token: str) -> str:
  """--dry-run=x -> --dry_run=x: flag names take - or _; values stay as they are."""
  if not token.startswith("--"):
    return token
  name, eq, value = token[2:].partition("=")
  return "--" + name.replace("-", "_") + eq + value


def parse(argv: list[str]) -> argparse.Namespace:
  own, overrides = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
      else (argv, [])
  for token in own:
    flag = token.split("=", 1)[0]
    if flag.startswith("--config."):
      die(f"unknown argument '{token}': config overrides go after '--'")
    if flag in REMOVED_FLAGS:
      die(f"{flag} is gone: {REMOVED_FLAGS[flag]}")
  opts = make_parser().parse_args([normalize(t) for t in own])
  opts.overrides = list(overrides)
  return opts


def mesh_slices(overrides: list[str]) -> dict[str, int]:
  """The --config.mesh.dcn_* values among the training overrides (either flag form)."""
  found = {}
  for i, token in enumerate(overrides):
    match = re.fullmatch(r"--config\.mesh\.(dcn_\w+)(?:=(.*))?", token)
    if not match:
      continue
    value = match.group(2) if match.group(2) is not None else (
        overrides[i + 1] if i + 1 < len(overrides) else "")
    try:
      found[match.group(1)] = int(value)
    except ValueError:
      die(f"{token}: expected a whole number of slices")
  return found


def check_slices(opts) -> None:
  """Validates the slice flags and derives the family, runtime, host count and node names."""
  if opts.num_slices < 1:
    die(f"--num_slices={opts.num_slices} must be at least 1")
  if opts.num_slices > 1 or opts.reservation:
    opts.queued = True  # multislice and named reservations exist only as queued resources
  family, _, size = opts.accelerator.rpartition("-")
  if family not in FAMILIES or not size.isdigit():
    if opts.action == "train":
      die(f"--accelerator={opts.accelerator}: expected one of "
          f"{', '.join(f + '-N' for f in FAMILIES)}")
  else:
    runtime, cores_per_chip, chips_per_host = FAMILIES[family]
    chips = int(size) // cores_per_chip
    opts.version = opts.version or runtime
    opts.hosts = 1 if chips <= 8 and cores_per_chip == 1 else max(1, chips // chips_per_host)
  opts.nodes = ([f"{opts.name}-{i}" for i in range(opts.num_slices)] if opts.num_slices > 1
                else [opts.name])
  opts.ssh_via = opts.ssh_via or ("iap" if opts.internal_ips else "external")


def check_mesh(opts) -> None:
  """Multislice: the mesh must span the slices. Adds --config.mesh.dcn_data=N, or checks the
  user's own dcn_* overrides against --num_slices."""
  given = mesh_slices(opts.overrides)
  if not given:
    if opts.num_slices > 1:
      opts.overrides.append(f"--config.mesh.dcn_data={opts.num_slices}")
    return
  product = 1
  for value in given.values():
    product *= value
  if product != opts.num_slices:
    spelled = " x ".join(f"{k}={v}" for k, v in sorted(given.items()))
    die(f"--config.mesh.{spelled} spans {product} slice(s), but --num_slices="
        f"{opts.num_slices}: make them agree (or leave dcn_* out: --num_slices sets dcn_data)")


def check_run(opts) -> None:
  if not opts.workdir:
    die("--workdir is required (gs://BUCKET/DIR)")
  if not opts.workdir.startswith("gs://") and not opts.allow_local_workdir:
    die(f"--workdir={opts.workdir} must be gs://... that all workers share (or a filesystem "
        "every worker mounts, with --allow_local_workdir and --launch_dir=gs://...)")
  opts.launch_dir = (opts.launch_dir or f"{opts.workdir}/launch").rstrip("/")
  if not opts.launch_dir.startswith("gs://"):
    die(f"--launch_dir={opts.launch_dir} must be gs://...: the workers install from it")
  if opts.compilation_cache is None:
    opts.compilation_cache = f"{opts.workdir.rstrip('/')}/compilation_cache"
  if opts.detach and opts.teardown:
    die("--detach and --teardown exclude each other")
  if opts.max_restarts < 0:
    die("--max_restarts must be 0 or more")
  for item in opts.env:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", item):
      die(f"--env={item}: expected KEY=VALUE")
  if opts.module != "ecdit_jax.main":
    return  # the other programs take their own flags, all after '--'
  config_file = opts.config.split(":", 1)[0]
  if not config_file.startswith("configs/") or not (ROOT / config_file).is_file():
    die(f"--config={opts.config}: expected a file under configs/ of this checkout (only "
        "configs/ travels to the workers)")
  check_mesh(opts)


def check(opts) -> None:
  if not opts.name:
    die("--name is required")
  if not opts.zone:
    die("--zone is required")
  check_slices(opts)
  if opts.action == "train":
    check_run(opts)


# ----------------------------------------------------------------------------------------------
# Running commands


class Shell:
  """Runs commands, or under --dry_run prints them (copy-pasteable) and runs none."""

  def __init__(self, dry_run: bool):
    self.dry_run = dry_run

  def show(self, argv: list[str]) -> None:
    print("+ " + shlex.join(argv), flush=True)

  def note(self, text: str) -> None:
    """A step that is not a command (a download, packing files), said as a comment."""
    if self.dry_run:
      print(f"# {text}", flush=True)

  def run(self, argv: list[str], check: bool = True) -> int:
    if self.dry_run:
      self.show(argv)
      return 0
    status = subprocess.run(argv, check=False).returncode
    if status and check:
      die(f"this failed with status {status}: {shlex.join(argv)[:300]}", 1)
    return status

  def output(self, argv: list[str]) -> str | None:
    """The command's standard output; None if it fails, and under --dry_run."""
    if self.dry_run:
      self.show(argv)
      return None
    result = subprocess.run(argv, check=False, capture_output=True, text=True)
    return result.stdout if result.returncode == 0 else None

  def spawn(self, argv: list[str]) -> subprocess.Popen | None:
    """Starts the command in its own process group (so it can be ended with its children)."""
    if self.dry_run:
      self.show(argv)
      return None
    return subprocess.Popen(argv, start_new_session=True)


def end(proc: subprocess.Popen | None) -> None:
  if proc is not None and proc.poll() is None:
    try:
      os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
      pass
    proc.wait()


class Cloud:
  """The gcloud commands for this launch's slices and its bucket."""

  def __init__(self, opts, shell: Shell):
    self.opts, self.shell = opts, shell
    self.loc = [f"--zone={opts.zone}"] + ([f"--project={opts.project}"] if opts.project else [])

  def tpus(self, *words: str, alpha: bool = False) -> list[str]:
    return ["gcloud", *(["alpha"] if alpha else []), "compute", "tpus", *words]

  def state(self) -> str | None:
    """The slices' state (the queued resource's, or the TPU VM's); None when absent."""
    o = self.opts
    if o.queued:
      argv = self.tpus("queued-resources", "describe", o.name, *self.loc,
                       "--format=value(state.state)")
    else:
      argv = self.tpus("tpu-vm", "describe", o.name, *self.loc, "--format=value(state)")
    out = self.shell.output(argv)
    return (out or "").strip() or None

  def create_flags(self) -> list[str]:
    o = self.opts
    flags = ["--spot"] if o.spot else ["--reserved"] if o.reserved else []
    if o.reservation:
      flags.append(f"--reservation={o.reservation}")
    for flag, value in (("service-account", o.service_account), ("network", o.network),
                        ("subnetwork", o.subnetwork)):
      if value:
        flags.append(f"--{flag}={value}")
    return flags + (["--internal-ips"] if o.internal_ips else [])

  def create(self) -> None:
    o = self.opts
    if o.queued:
      nodes = ([f"--node-count={o.num_slices}", f"--node-prefix={o.name}"] if o.num_slices > 1
               else [f"--node-id={o.name}"])
      argv = self.tpus("queued-resources", "create", o.name, *self.loc, *nodes,
                       f"--accelerator-type={o.accelerator}", f"--runtime-version={o.version}",
                       *self.create_flags(), alpha=bool(o.reservation))
    else:
      argv = self.tpus("tpu-vm", "create", o.name, *self.loc,
                       f"--accelerator-type={o.accelerator}", f"--version={o.version}",
                       *self.create_flags())
    self.shell.run(argv)

  def delete(self, check: bool = True) -> None:
    o = self.opts
    if o.queued:
      argv = self.tpus("queued-resources", "delete", o.name, *self.loc, "--force", "--quiet")
    else:
      argv = self.tpus("tpu-vm", "delete", o.name, *self.loc, "--quiet")
    self.shell.run(argv, check=check)

  def ssh(self, node: str, worker: str, script: str) -> list[str]:
    via = {"external": [], "internal": ["--internal-ip"], "iap": ["--tunnel-through-iap"]}
    return self.tpus("tpu-vm", "ssh", node, *self.loc, f"--worker={worker}",
                     *via[self.opts.ssh_via], f"--command={script}")

  def on_all_workers(self, script: str) -> list[int]:
    """Runs the script on every worker of every slice, the slices in parallel."""
    procs = [self.shell.spawn(self.ssh(node, "all", script)) for node in self.opts.nodes]
    return [proc.wait() if proc is not None else 0 for proc in procs]


def storage(*words: str) -> list[str]:
  return ["gcloud", "storage", *words]


# ----------------------------------------------------------------------------------------------
# Artifacts: built here once, uploaded to the bucket, installed from there by every worker


class Artifacts:
  """What the workers install and where it lies in the bucket."""

  def __init__(self, opts):
    base = opts.launch_dir
    url, _, fragment = opts.python_dist.partition("#")
    self.python_src = url
    self.python_sha256 = fragment[len("sha256="):] if fragment.startswith("sha256=") else ""
    self.python_name = urllib.parse.unquote(os.path.basename(urllib.parse.urlparse(url).path))
    version = re.match(r"cpython-(\d+)\.(\d+)\.", self.python_name)
    if not version or not self.python_name.endswith((".tar.gz", ".tgz")):
      die(f"--python_dist={opts.python_dist}: expected a python-build-standalone "
          "cpython-X.Y.Z+DATE-x86_64-unknown-linux-gnu-install_only tarball")
    self.python_version = f"{version.group(1)}.{version.group(2)}"
    self.python_gs = f"{base}/python/{self.python_name}"
    self.lock_gs = f"{base}/requirements.lock"
    self.wheelhouse_gs = f"{base}/wheelhouse"
    self.code_hash = ""
    self.code_gs = ""
    self.status_dir = f"{base}/status"
    self.logs_dir = f"{base}/logs"

  def set_code(self, code_hash: str, base: str) -> None:
    self.code_hash = code_hash
    self.code_gs = f"{base}/code/{code_hash}.tar"


def source_files() -> list[str]:
  """This checkout's files: tracked, and untracked ones git does not ignore (edits travel)."""
  try:
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"],
                         check=True, capture_output=True).stdout
  except (OSError, subprocess.CalledProcessError):
    die(f"{ROOT} is not a git checkout: the workers' code is built from one")
  return sorted(f for f in out.decode().split("\0") if f and (ROOT / f).is_file())


def content_hash(files: list[str]) -> str:
  digest = hashlib.sha256()
  for name in files:
    digest.update(name.encode() + b"\0" + hashlib.sha256((ROOT / name).read_bytes()).digest())
  return digest.hexdigest()[:16]


def requirements_key() -> str:
  """What the lock depends on besides the interpreter: the project's declared requirements."""
  return hashlib.sha256((ROOT / "setup.py").read_bytes()).hexdigest()[:16]


def worker_platforms() -> list[str]:
  """pip --platform values for the workers: every manylinux tag their glibc runs."""
  major, minor = WORKER_GLIBC
  tags = [f"manylinux_{major}_{m}_x86_64" for m in range(minor, 16, -1)]
  return [flag for tag in tags + ["manylinux2014_x86_64"] for flag in ("--platform", tag)]


def build_wheel(opts, shell: Shell, files: list[str], build: Path) -> Path:
  """Copies the checkout's files to build/src and builds the project wheel into build/dist."""
  src, dist = build / "src", build / "dist"
  shell.note(f"copy the checkout's {len(files)} files to {src}")
  if not shell.dry_run:
    shutil.rmtree(build, ignore_errors=True)
    for name in files:
      (src / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(ROOT / name, src / name)
  shell.run([opts.build_python, "-m", "pip", "wheel", "--quiet", "--no-deps",
             "--wheel-dir", str(dist), str(src)])
  wheels = sorted(dist.glob("ecdit_jax-*.whl"))
  if shell.dry_run:
    return dist / "ecdit_jax-VERSION-py3-none-any.whl"
  if len(wheels) != 1:
    die(f"expected one ecdit_jax wheel in {dist}, found {len(wheels)}", 1)
  return wheels[0]


def pack_code(shell: Shell, files: list[str], build: Path, wheel: Path) -> Path:
  """The code object: the wheel and configs/ (configs are not part of the package)."""
  out = build / "code.tar"
  shell.note(f"pack {wheel.name} and configs/ into {out}")
  if not shell.dry_run:
    with tarfile.open(out, "w") as tar:
      tar.add(wheel, arcname=wheel.name)
      for name in files:
        if name.startswith("configs/"):
          tar.add(build / "src" / name, arcname=name)
  return out


def parse_lock(text: str | None) -> dict[str, str]:
  """The '# key: value' header of a lock written by write_lock."""
  header = {}
  for line in (text or "").splitlines():
    match = re.fullmatch(r"# (\w+): (\S+)", line)
    if match:
      header[match.group(1)] = match.group(2)
  return header


def write_lock(wheelhouse: Path, path: Path, python_version: str) -> None:
  """name==version --hash=sha256:... for every wheel the workers install, with a header."""
  lines = ["# ecdit_jax's .[tpu] requirements for the TPU workers, pinned for this run.",
           "# launch/tpu_pod.sh wrote it; --relock resolves them again.",
           f"# python: {python_version}", f"# requirements: {requirements_key()}"]
  for wheel in sorted(wheelhouse.glob("*.whl")):
    name, version = wheel.name.split("-")[:2]
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    lines.append(f"{name}=={version} --hash=sha256:{digest}")
  path.write_text("\n".join(lines) + "\n")


def resolve_lock(opts, shell: Shell, art: Artifacts, wheel: Path, cache: Path) -> None:
  """Downloads every wheel of `wheel[tpu]` for the workers' platform, writes the lock from
  them, and uploads both (the lock last: its presence means the wheelhouse is complete)."""
  sdists, wheelhouse, lock = cache / "built", cache / "wheelhouse", cache / "requirements.lock"
  names = [n.strip() for n in opts.build_from_source.split(",") if n.strip()]
  if names:  # pure-Python sdists become wheels here; the workers cannot build anything
    shell.run([opts.build_python, "-m", "pip", "wheel", "--quiet", "--no-deps",
               "--wheel-dir", str(sdists), *names])
  if not shell.dry_run:
    shutil.rmtree(wheelhouse, ignore_errors=True)
  shell.run([opts.build_python, "-m", "pip", "download", "--quiet", "--dest", str(wheelhouse),
             "--find-links", str(sdists), "--only-binary=:all:", "--implementation", "cp",
             "--python-version", art.python_version, *worker_platforms(),
             f"ecdit_jax[tpu] @ {wheel.as_uri()}"])
  shell.note(f"write {lock} from the wheels in {wheelhouse} (all but ecdit_jax's)")
  if not shell.dry_run:
    for own in wheelhouse.glob("ecdit_jax-*.whl"):
      own.unlink()
    write_lock(wheelhouse, lock, art.python_version)
  shell.run(storage("rsync", "--delete-unmatched-destination-objects", str(wheelhouse),
                    art.wheelhouse_gs))
  shell.run(storage("cp", str(lock), art.lock_gs))


def lock_is_current(opts, shell: Shell, art: Artifacts) -> bool:
  if opts.relock:
    return False
  header = parse_lock(shell.output(storage("cat", art.lock_gs)))
  if not header:
    return False
  if header.get("python") != art.python_version or header.get("requirements") != \
      requirements_key():
    say(f"{art.lock_gs} was resolved for other requirements or another Python: resolving again")
    return False
  say(f"reusing the run's lock {art.lock_gs}")
  return True


def fetch_python(shell: Shell, art: Artifacts, cache: Path) -> Path:
  """The interpreter tarball here: the given file, or a download checked against its sha256."""
  if "://" not in art.python_src:
    local = Path(art.python_src)
  else:
    local = cache / "python" / art.python_name
    if not local.exists():
      shell.note(f"download {art.python_src} to {local}")
      if not shell.dry_run:
        local.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(art.python_src) as response, \
            open(f"{local}.part", "wb") as out:
          shutil.copyfileobj(response, out)
        os.replace(f"{local}.part", local)
  if art.python_sha256 and not shell.dry_run:
    digest = hashlib.sha256(local.read_bytes()).hexdigest()
    if digest != art.python_sha256:
      die(f"{local}: sha256 {digest} is not the expected {art.python_sha256}", 1)
  return local


def exists(shell: Shell, url: str) -> bool:
  return shell.output(storage("ls", url)) is not None


def prepare_artifacts(opts, shell: Shell) -> Artifacts:
  """Builds and uploads what is missing from the bucket; reuses what is there."""
  art = Artifacts(opts)
  cache = Path(opts.cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
               / "ecdit_jax" / "tpu_pod").expanduser().absolute()
  files = source_files()
  art.set_code(content_hash(files), opts.launch_dir)
  have_code = exists(shell, art.code_gs)
  have_lock = lock_is_current(opts, shell, art)
  if have_code:
    say(f"reusing {art.code_gs} (this checkout, hash {art.code_hash})")
  if not (have_code and have_lock):
    build = cache / "build" / art.code_hash
    wheel = build_wheel(opts, shell, files, build)
    if not have_lock:
      resolve_lock(opts, shell, art, wheel, cache)
    if not have_code:
      shell.run(storage("cp", str(pack_code(shell, files, build, wheel)), art.code_gs))
  if not exists(shell, art.python_gs):
    shell.run(storage("cp", str(fetch_python(shell, art, cache)), art.python_gs))
  return art


# ----------------------------------------------------------------------------------------------
# What runs on the workers (bash; every value from here is quoted)

REMOTE = 'R="$HOME/ecdit_run"'
METADATA = ("http://metadata.google.internal/computeMetadata/v1/instance/attributes/"
            "agent-worker-number")


def install_script(art: Artifacts) -> str:
  """Installs from the bucket alone; each part only when what the bucket holds changed."""
  q = shlex.quote
  return f"""set -euo pipefail
{REMOTE}; mkdir -p "$R"; cd "$R"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
if [ ! -x python/bin/python3 ]; then
  gcloud storage cp {q(art.python_gs)} python.tar.gz
  tar -xzf python.tar.gz && rm python.tar.gz
fi
[ -x venv/bin/python ] || python/bin/python3 -m venv venv
gcloud storage cp {q(art.lock_gs)} requirements.new
if ! cmp -s requirements.new requirements.lock; then
  rm -rf wheelhouse && mkdir wheelhouse
  gcloud storage rsync {q(art.wheelhouse_gs)} wheelhouse
  venv/bin/pip install --quiet --no-index --find-links=wheelhouse --require-hashes \\
    -r requirements.new
  mv requirements.new requirements.lock
fi
rm -f requirements.new
if [ "$(cat code.id 2>/dev/null)" != {q(art.code_hash)} ]; then
  rm -rf code && mkdir code
  gcloud storage cp {q(art.code_gs)} code.tar && tar -xf code.tar -C code && rm code.tar
  venv/bin/pip install --quiet --no-index --no-deps --force-reinstall code/ecdit_jax-*.whl
  echo {q(art.code_hash)} > code.id
fi
echo "installed on $(hostname)"
"""


def worker_env(opts) -> list[tuple[str, str]]:
  env = []
  if opts.compilation_cache:
    env.append(("JAX_COMPILATION_CACHE_DIR", opts.compilation_cache))
  if opts.libtpu_init_args:
    env.append(("LIBTPU_INIT_ARGS", opts.libtpu_init_args))
  return env + [tuple(item.split("=", 1)) for item in opts.env]


def training_wrapper(opts, art: Artifacts, attempt: str, node: str) -> str:
  """Runs training on one worker ($1: its index), uploads its log, then records how it exited
  (the record comes last: the launcher takes it to mean the worker is done)."""
  q = shlex.quote
  own = ([f"--config={opts.config}", f"--workdir={opts.workdir}"]
         if opts.module == "ecdit_jax.main" else [])
  train = shlex.join(["-m", opts.module, *own, *opts.overrides])
  exports = "".join(f"export {k}={q(v)}\n" for k, v in worker_env(opts))
  record = f"{art.status_dir}/{attempt}/{node}-w"
  log = f"{art.logs_dir}/{attempt}/{node}-w"
  return f"""{REMOTE}; worker="$1"
{exports}"$R/venv/bin/python" {train} &
echo $! > "$R/train.pid"
status=0; wait $! || status=$?
outcome=finished
if [ -e "$R/stop_requested" ]; then outcome=stopped_by_user
elif grep -q {q(STOP_LINE)} "$R/train.log"; then outcome=stopped; fi
gcloud storage cp "$R/train.log" {q(log)}"$worker.log"
echo {q(node)} "$worker $status $outcome" | gcloud storage cp - {q(record)}"$worker"
"""


def start_script(opts, art: Artifacts, attempt: str, node: str) -> str:
  """Writes the wrapper to $R/train.sh and starts it detached: it outlives the connection."""
  return f"""set -euo pipefail
{REMOTE}
if [ -f "$R/train.pid" ] && kill -0 "$(cat "$R/train.pid")" 2>/dev/null; then
  echo "training already runs on $(hostname); stop it with --stop" >&2; exit 3
fi
rm -f "$R/train.pid" "$R/stop_requested"
cat > "$R/train.sh" <<'ECDIT_TRAIN'
{training_wrapper(opts, art, attempt, node)}ECDIT_TRAIN
worker="$(curl -sf -m 10 -H Metadata-Flavor:Google {METADATA} || hostname)"
cd "$R/code"
nohup setsid bash "$R/train.sh" "$worker" > "$R/train.log" 2>&1 < /dev/null &
echo "started on $(hostname) (worker $worker)"
"""


def follow_script(lines: str) -> str:
  """Streams this worker's training log until its process exits."""
  return f"""{REMOTE}
for _ in $(seq 60); do [ -s "$R/train.pid" ] && break; sleep 1; done
tail -n {lines} --pid="$(cat "$R/train.pid")" -F "$R/train.log"
"""


STOP_SCRIPT = f"""{REMOTE}
if [ -f "$R/train.pid" ] && kill -0 "$(cat "$R/train.pid")" 2>/dev/null; then
  touch "$R/stop_requested"; kill -TERM "$(cat "$R/train.pid")"
  echo "SIGTERM sent on $(hostname): it saves a checkpoint and exits"
else
  echo "no training runs on $(hostname)"
fi
"""

# After a worker failed the others may hang in a collective: SIGTERM, then SIGKILL after 60 s.
END_SCRIPT = f"""{REMOTE}
pid="$(cat "$R/train.pid" 2>/dev/null || true)"
if [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null; then
  for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || exit 0; sleep 2; done
  kill -KILL "$pid" 2>/dev/null || true
fi
"""


# ----------------------------------------------------------------------------------------------
# The slices' life: create, install, start, watch, recreate


def wait_until_ready(opts, cloud: Cloud) -> None:
  while True:
    state = cloud.state()
    if cloud.shell.dry_run or state in READY:
      return
    if state is None or state in LOST:
      die(f"{opts.name} became {state or 'absent'} while starting; run again to retry", 1)
    say(f"{opts.name} is {state}; checking again in {opts.poll_seconds:g} s")
    time.sleep(opts.poll_seconds)


def ensure_slices(opts, cloud: Cloud) -> bool:
  """Makes the slices READY; True when they are new (and so need installing)."""
  state = cloud.state()
  if state in READY:
    say(f"reusing {opts.name} ({state})")
    return False
  if state in LOST:
    say(f"{opts.name} is {state}: deleting it and creating it again")
    cloud.delete()
  elif state is not None and state not in WAITING:
    die(f"{opts.name} is {state}; wait for it, or delete it with --delete", 1)
  if state is None or state in LOST:
    cloud.create()
  wait_until_ready(opts, cloud)
  return True


def start(opts, cloud: Cloud, art: Artifacts, attempt: str) -> None:
  procs = [cloud.shell.spawn(cloud.ssh(node, "all", start_script(opts, art, attempt, node)))
           for node in opts.nodes]
  statuses = [proc.wait() if proc is not None else 0 for proc in procs]
  if any(statuses):  # the workers said why; a run still going is the usual reason
    die(f"starting training failed on {opts.name} (status {max(statuses)}). If a run is "
        "still going there, follow it with --logs, or stop it with --stop and run this again", 1)


def read_records(cloud: Cloud, art: Artifacts, attempt: str) -> list[list[str]]:
  """The exit records of this attempt: [node, worker, status, outcome] per exited worker."""
  out = cloud.shell.output(storage("cat", f"{art.status_dir}/{attempt}/*"))
  return [line.split() for line in (out or "").splitlines() if len(line.split()) == 4]


class LogStream:
  """Worker 0's log, streamed while training runs; a dropped connection is opened again."""

  def __init__(self, opts, cloud: Cloud):
    self.opts, self.cloud, self.proc, self.lines = opts, cloud, None, "+1"

  def keep_up(self) -> None:
    if self.proc is not None and self.proc.poll() in (None, 0):
      return  # streaming, or ended with the training process
    script = follow_script(self.lines)
    self.proc = self.cloud.shell.spawn(self.cloud.ssh(self.opts.nodes[0], "0", script))
    self.lines = "20"  # a stream that dropped picks up near where it was

  def close(self, wait: bool) -> None:
    """wait: give the stream a few seconds for the last lines (training has exited)."""
    if wait and self.proc is not None:
      try:
        self.proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        pass
    end(self.proc)


def exits(opts, cloud: Cloud, art: Artifacts, attempt: str) -> str | None:
  """What the exit records say: 'failed' (a worker exited non-zero), None while some worker
  has none yet, else 'stopped_by_user', 'stopped' (a preemption notice) or 'finished'."""
  records = read_records(cloud, art, attempt)
  failed = [r for r in records if r[2] != "0"]
  for node, worker, status, _ in failed:
    say(f"worker {worker} of {node} exited with status {status}; its log: "
        f"{art.logs_dir}/{attempt}/{node}-w{worker}.log")
  if failed:
    return "failed"
  if len(records) < len(opts.nodes) * opts.hosts:
    return None
  outcomes = {r[3] for r in records}
  return next(o for o in ("stopped_by_user", "stopped", "finished") if o in outcomes)


def watch(opts, cloud: Cloud, art: Artifacts, attempt: str) -> str:
  """Streams worker 0's log and polls the slices and the exit records until the attempt ends:
  'lost' when the slices went away (or cannot be described three times running), else what
  exits() says."""
  stream, outcome, misses = LogStream(opts, cloud), None, 0
  try:
    while outcome is None:
      stream.keep_up()
      state = cloud.state()
      misses = 0 if state else misses + 1
      if not cloud.shell.dry_run and ((state and state not in READY) or misses >= 3):
        say(f"{opts.name} is {state or 'gone'}: every worker's training ended with it")
        outcome = "lost"
        break
      outcome = exits(opts, cloud, art, attempt)
      if cloud.shell.dry_run:
        cloud.shell.note(f"the last two commands repeat every {opts.poll_seconds:g} s until "
                         f"all {len(opts.nodes) * opts.hosts} workers have exit records")
        return "dry_run"
      if outcome is None:
        time.sleep(opts.poll_seconds)
    return outcome
  finally:
    stream.close(wait=outcome in ("finished", "stopped", "stopped_by_user"))


def attempt_id(restarts: int) -> str:
  return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + f"-{restarts}"


def run_once(opts, cloud: Cloud, art: Artifacts, restarts: int) -> str:
  """Slices up, installed and training; then watches. Returns watch's outcome."""
  created = ensure_slices(opts, cloud)
  if (created or not opts.skip_setup) and any(cloud.on_all_workers(install_script(art))):
    die(f"installing failed on {opts.name}", 1)
  attempt = attempt_id(restarts)
  start(opts, cloud, art, attempt)
  say(f"training started (attempt {attempt}); exit records: {art.status_dir}/{attempt}/")
  if opts.detach:
    return "detached"
  return watch(opts, cloud, art, attempt)


def train(opts, shell: Shell) -> int:
  art = prepare_artifacts(opts, shell)
  cloud = Cloud(opts, shell)
  restarts = 0
  again = f"{PROG} --name={opts.name} --zone={opts.zone}"
  try:
    while True:
      outcome = run_once(opts, cloud, art, restarts)
      if outcome in ("finished", "stopped_by_user", "failed", "detached", "dry_run"):
        break
      if restarts >= opts.max_restarts:
        say(f"gave up after {restarts} restart(s) (--max_restarts={opts.max_restarts}); the "
            "checkpoints are in the workdir: run the same command to resume")
        outcome = "gave_up"
        break
      restarts += 1
      say(f"restart {restarts} of at most {opts.max_restarts}: resuming from the latest "
          "checkpoint")
  except KeyboardInterrupt:
    say(f"stopped watching; training goes on. Follow it: {again} --logs; stop it: {again} "
        "--stop")
    return 130
  last = " at the run's last step" if opts.module == "ecdit_jax.main" else ""
  report = {"finished": f"{opts.module} finished: every worker exited 0{last}",
            "stopped_by_user": "training stopped on request (--stop); run the same command "
                               "to resume",
            "detached": f"training runs in the background; follow it: {again} --logs",
            "failed": "training failed; the other workers were ended",
            "dry_run": "dry run: nothing was created or started",
            "gave_up": "training did not finish"}
  if outcome == "failed":
    cloud.on_all_workers(END_SCRIPT)
  say(report[outcome])
  if opts.teardown:
    cloud.delete(check=False)
  return 0 if outcome in ("finished", "stopped_by_user", "detached", "dry_run") else 1


def main(argv: list[str]) -> int:
  opts = parse(argv)
  check(opts)
  shell = Shell(opts.dry_run)
  cloud = Cloud(opts, shell)
  if opts.action == "delete":
    cloud.delete()
    return 0
  if opts.action == "stop":
    cloud.on_all_workers(STOP_SCRIPT)
    return 0
  if opts.action == "logs":
    return shell.run(cloud.ssh(opts.nodes[0], "0", follow_script("+1")), check=False)
  return train(opts, shell)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
