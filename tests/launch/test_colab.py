"""The Colab notebook: clean (no outputs, one parameters cell) and executed on CPU."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(ROOT, "launch")
NOTEBOOK = os.path.join(LAUNCH, "colab_tpu.ipynb")


def test_notebook_is_clean():
  nbformat = pytest.importorskip("nbformat")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  assert all(not cell.outputs and cell.execution_count is None for cell in code)
  assert [cell for cell in code if "parameters" in cell.metadata.get("tags", [])] == [code[0]]


@pytest.mark.slow
def test_notebook_trains_on_cpu(data_dir, tmp_path):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  workdir = tmp_path / "run"
  # The CPU-sized model of tests/train/train_testing.py, two steps, a grid at the second.
  tiny = {"model.hidden_size": 32, "model.num_layers": 2, "model.num_heads": 2,
          "model.num_kv_heads": 1, "model.num_experts": 4, "model.text_hidden_size": 16,
          "model.text_num_layers": 1, "model.text_num_heads": 2, "model.text_max_len": 12,
          "data.num_train": 96, "data.num_test": 16, "batch_size": 4, "warmup_steps": 1,
          "log_every_steps": 1, "checkpoint_every_steps": 2, "sample.num_steps": 2}
  params = {"NUM_STEPS": 2, "SAMPLE_EVERY": 2, "WORKDIR": str(workdir), "DATA_DIR": data_dir,
            "INSTALL": False, "EXTRA_OVERRIDES": tiny}
  nb = nbformat.read(NOTEBOOK, as_version=4)
  [cell] = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  for name in params:
    assert f"\n{name} = " in "\n" + cell.source, f"{name} is not a parameter of the notebook"
  # As papermill does: the injected values come after the defaults and win.
  cell.source += "\n# injected by the test\n" + "".join(f"{k} = {v!r}\n" for k, v in params.items())
  # One CPU device, as on a CPU-only Colab, not the 8 simulated ones of the test session.
  xla_flags = " ".join(flag for flag in os.environ.get("XLA_FLAGS", "").split()
                       if "xla_force_host_platform_device_count" not in flag)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags}
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": LAUNCH}})
  client.execute(env=env)

  outputs = [output for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs]
  text = "".join(output.get("text", "") for output in outputs)
  assert f"repository: {ROOT}" in text
  assert "cpu [CpuDevice(id=0)]" in text
  assert "step 2/2" in text and "trained to step 2" in text
  assert any("image/png" in output.get("data", {}) for output in outputs)
  assert sorted(os.listdir(workdir / "samples")) == ["step_0000002.png", "step_0000002.txt"]
