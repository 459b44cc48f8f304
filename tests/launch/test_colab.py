"""The Colab notebook: clean (no outputs, one parameters cell), its install and device choices
checked without a TPU, and the whole notebook executed on CPU (one device, and eight
simulated ones for expert parallelism)."""

import ast
import base64
import importlib.metadata
import io
import os
import pathlib
import subprocess
import sys

import pytest

from tests.commands import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(ROOT, "launch")
NOTEBOOK = os.path.join(LAUNCH, "colab_tpu.ipynb")


def read_notebook():
  nbformat = pytest.importorskip("nbformat")
  return nbformat.read(NOTEBOOK, as_version=4)


def code_cell(nb, text):
  """The one code cell whose source contains ``text``."""
  [cell] = [c for c in nb.cells if c.cell_type == "code" and text in c.source]
  return cell


def definitions(source, **names):
  """The imports, functions and upper-case constants of a cell, run in a fresh namespace holding
  ``names``; the cell's other statements (what it does when run) are left out."""
  def kept(node):
    if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef)):
      return True
    return isinstance(node, ast.Assign) and all(
        isinstance(t, ast.Name) and t.id.isupper() for t in node.targets)
  module = ast.parse(source)
  module.body = [node for node in module.body if kept(node)]
  namespace = dict(names)
  exec(compile(module, "<notebook cell>", "exec"), namespace)  # noqa: S102 (the notebook's code)
  return namespace


def test_notebook_is_clean():
  nbformat = pytest.importorskip("nbformat")
  nb = read_notebook()
  nbformat.validate(nb)
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  assert all(not cell.outputs and cell.execution_count is None for cell in code)
  assert [cell for cell in code if "parameters" in cell.metadata.get("tags", [])] == [code[0]]
  # As shipped, the notebook installs nothing unless told where from: no placeholder to fail.
  assert '\nINSTALL_FROM = ""' in "\n" + code[0].source


@pytest.mark.parametrize("platform, kind, devices, experts, found, settings", [
    ("tpu", "TPU v2", 8, 8, ("TPU v2-8: expert parallelism, mesh.expert=8: each device holds "
                             "1 of the 8 experts"), {"model.dtype": "bfloat16", "mesh.expert": 8}),
    ("tpu", "TPU v5 lite", 1, 8, "TPU v5e-1: one device", {"model.dtype": "bfloat16"}),
    ("tpu", "TPU v6 lite", 1, 8, "TPU v6e-1: one device", {"model.dtype": "bfloat16"}),
    ("tpu", "TPU v6e", 1, 8, "TPU v6e-1: one device", {"model.dtype": "bfloat16"}),
    ("tpu", "TPU v4", 4, 8, ("TPU v4 x4: expert parallelism, mesh.expert=4: each device holds "
                             "2 of the 8 experts"), {"model.dtype": "bfloat16", "mesh.expert": 4}),
    ("tpu", "TPU v2", 8, 4, ("TPU v2-8: expert parallelism, mesh.expert=4: each device holds "
                             "1 of the 4 experts of every MoE layer, data parallel over 2"),
     {"model.dtype": "bfloat16", "mesh.expert": 4}),
    ("tpu", "TPU v2", 8, 0, "TPU v2-8: data parallelism over 8", {"model.dtype": "bfloat16"}),
    ("gpu", "Tesla T4", 1, 8, "GPU Tesla T4 x1: one device", {"model.dtype": "float32"}),
    ("cpu", "cpu", 1, 8, "CPU, 1 device: one device", {"model.dtype": "float32"}),
    ("cpu", "cpu", 8, 8, "CPU, 8 devices: expert parallelism, mesh.expert=8",
     {"model.dtype": "float32", "mesh.expert": 8}),
])
def test_device_plan(platform, kind, devices, experts, found, settings):
  cell = code_cell(read_notebook(), "def device_plan(")
  description, chosen = definitions(cell.source)["device_plan"](platform, kind, devices, experts)
  assert description.startswith(found)
  assert chosen == settings


def test_install_requirement():
  requirement = definitions(code_cell(read_notebook(), "def requirement(").source)["requirement"]
  url = "git+https://example.org/owner/ecdit_jax.git@main"
  assert requirement(url, "[tpu]") == f"ecdit_jax[tpu] @ {url}"
  wheel = "https://example.org/ecdit_jax-0.1.0-py3-none-any.whl"
  assert requirement(wheel, "") == f"ecdit_jax @ {wheel}"
  assert requirement(ROOT, "[gpu]") == f"ecdit_jax[gpu] @ {pathlib.Path(ROOT).as_uri()}"
  assert requirement("ecdit_jax==0.1.0", "[tpu]") == "ecdit_jax==0.1.0"


def run_install_cell(install_from, monkeypatch):
  """The install cell with ``install_from``; returns the pip commands it ran."""
  calls = []
  monkeypatch.setattr(subprocess, "run", lambda args, **kwargs: calls.append(args))
  cell = code_cell(read_notebook(), "def requirement(")
  exec(cell.source, {"INSTALL_FROM": install_from})  # noqa: S102
  return calls


def test_install_from_a_url(monkeypatch):
  url = "git+https://example.org/owner/ecdit_jax.git"
  calls = run_install_cell(url, monkeypatch)
  extra = definitions(code_cell(read_notebook(), "def jax_extra(").source)["jax_extra"]()
  assert calls == [[sys.executable, "-m", "pip", "install", "-q", f"ecdit_jax{extra} @ {url}"]]


def test_install_uses_what_is_installed(monkeypatch):
  assert run_install_cell("", monkeypatch) == []


def test_install_without_a_source_says_what_to_set(monkeypatch, tmp_path):
  def not_installed(name):
    raise importlib.metadata.PackageNotFoundError(name)
  monkeypatch.setattr(importlib.metadata, "version", not_installed)
  monkeypatch.chdir(tmp_path)  # not inside a checkout
  with pytest.raises(RuntimeError, match="set INSTALL_FROM in the first cell"):
    run_install_cell("", monkeypatch)
  monkeypatch.chdir(LAUNCH)  # inside this checkout: installs it
  [[*_, requirement]] = run_install_cell("", monkeypatch)
  assert requirement.endswith(f" @ {pathlib.Path(ROOT).as_uri()}")


def png_size(output):
  image = pytest.importorskip("PIL.Image")
  return image.open(io.BytesIO(base64.b64decode(output["data"]["image/png"]))).size


def pngs(cell):
  return [output for output in cell.outputs if "image/png" in output.get("data", {})]


def cell_text(cell):
  return "".join(output.get("text", "") for output in cell.outputs)


# The CPU-sized model of tests/train/train_testing.py, two steps, a grid at the second.
TINY = {"model.hidden_size": 32, "model.num_layers": 2, "model.num_heads": 2,
        "model.num_kv_heads": 1, "model.num_experts": 4, "model.text_hidden_size": 16,
        "model.text_num_layers": 1, "model.text_num_heads": 2, "model.text_max_len": 12,
        "data.num_train": 96, "data.num_test": 16, "batch_size": 4, "warmup_steps": 1,
        "log_every_steps": 1, "checkpoint_every_steps": 2, "sample.num_steps": 2}


@pytest.mark.slow
@pytest.mark.parametrize("num_devices", [1, 8])
def test_notebook_trains_on_cpu(num_devices, data_dir, tmp_path):
  """One CPU device, as on a CPU-only Colab; eight simulated ones take the branch of a TPU v2-8
  (8 experts, one on each device)."""
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  workdir = tmp_path / "run"
  tiny = dict(TINY)
  if num_devices == 8:
    tiny.update({"model.num_experts": 8, "batch_size": 8})  # the batch splits over 8 devices
  # INSTALL_FROM stays empty: the notebook uses the package installed from this checkout.
  params = {"NUM_STEPS": 2, "SAMPLE_EVERY": 2, "WORKDIR": str(workdir), "DATA_DIR": data_dir,
            "EXTRA_OVERRIDES": tiny, "ROUTING_PROMPTS": 2}
  nb = read_notebook()
  [cell] = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  for name in params:
    assert f"\n{name} = " in "\n" + cell.source, f"{name} is not a parameter of the notebook"
  # As papermill does: the injected values come after the defaults and win.
  cell.source += "\n# injected by the test\n" + "".join(f"{k} = {v!r}\n" for k, v in params.items())
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": xla_flags(num_devices, os.environ.get("XLA_FLAGS", ""))}
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": LAUNCH}})
  client.execute(env=env)  # raises if a cell fails

  install = cell_text(code_cell(nb, "def requirement("))
  assert "$ pip" not in install and f" in {os.path.join(ROOT, 'ecdit_jax')}\n" in install
  detected = cell_text(code_cell(nb, "device_plan(devices[0]"))
  layout = cell_text(code_cell(nb, "tree_leaves_with_path"))
  if num_devices == 1:
    assert "devices: [CpuDevice(id=0)]" in detected
    assert "found: CPU, 1 device: one device, no mesh\n" in detected
    assert "settings: model.dtype='float32'\n" in detected
    assert "no weight is split by expert" in layout
  else:
    assert "found: CPU, 8 devices: expert parallelism, mesh.expert=8: each device holds 1 of " \
           "the 8 experts of every MoE layer\n" in detected
    assert "settings: model.dtype='float32', mesh.expert=8\n" in detected
    # The expert weights' leading dimension (8) is split, one expert a device.
    assert "split as ('expert', None, None) over 8 devices; each holds (1, 32, 128)" in layout
  train = cell_text(code_cell(nb, "train_and_evaluate(config"))
  assert "step 2/2" in train and "trained to step 2\n" in train

  # The sample grid shown is the one the run wrote at step 2.
  assert sorted(os.listdir(workdir / "samples")) == ["step_0000002.png", "step_0000002.txt"]
  [grid] = pngs(code_cell(nb, '"samples"'))
  shown = base64.b64decode(grid["data"]["image/png"])
  assert shown == (workdir / "samples" / "step_0000002.png").read_bytes()

  # One heatmap row per prompt: sample, map and overlay side by side, 8 pixels per image pixel.
  heatmaps = code_cell(nb, "routing_heatmaps(WORKDIR")
  assert "step 2: experts per token from " in cell_text(heatmaps)
  assert "object/background compute " in cell_text(heatmaps)
  assert [png_size(output) for output in pngs(heatmaps)] == [(3 * 256, 256)] * 2
