"""The torch-free checkpoint reader: values, dtypes and strides round-trip; unsafe files refused."""

import collections
import io
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest

from ecdit_jax.encoders.torch_checkpoint import load_torch_state_dict

torch = pytest.importorskip("torch")


def _state_dict():
  generator = torch.Generator().manual_seed(0)
  shared = torch.randn(40, generator=generator)
  return collections.OrderedDict(
      weight=torch.randn(3, 5, generator=generator),
      half=torch.randn(4, 2, generator=generator).half(),
      bf16=torch.randn(2, 3, generator=generator).to(torch.bfloat16),
      steps=torch.tensor([3, -7, 2**40], dtype=torch.int64),
      mask=torch.tensor([[True, False], [False, True]]),
      scalar=torch.tensor(1.5),
      # Strides (1, 4): the saved storage is in the original (4, 6) order.
      transposed=torch.randn(4, 6, generator=generator).t(),
      # Two views of one storage, the second at an offset and with a step of 2.
      shared_head=shared[:10].view(2, 5),
      shared_tail=shared[12:36:2].view(3, 4),
      parameter=torch.nn.Parameter(torch.randn(7, generator=generator)),
  )


def _assert_matches(loaded, expected):
  assert list(loaded) == list(expected)
  for key, tensor in expected.items():
    value = loaded[key]
    assert value.shape == tuple(tensor.shape), key
    if tensor.dtype == torch.bfloat16:
      assert value.dtype == ml_dtypes.bfloat16, key
      reference = tensor.float().numpy()
      np.testing.assert_array_equal(value.astype(np.float32), reference, err_msg=key)
    else:
      reference = tensor.detach().numpy()
      assert value.dtype == reference.dtype, key
      np.testing.assert_array_equal(value, reference, err_msg=key)
    assert value.flags.c_contiguous and value.flags.writeable, key


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_state_dict_round_trip(tmp_path, zip_format):
  expected = _state_dict()
  path = tmp_path / "weights.pth"
  torch.save(expected, path, _use_new_zipfile_serialization=zip_format)
  assert zipfile.is_zipfile(path) == zip_format
  _assert_matches(load_torch_state_dict(path), expected)
  _assert_matches(load_torch_state_dict(str(path)), expected)


def test_wrapped_state_dict(tmp_path):
  expected = _state_dict()
  path = tmp_path / "checkpoint.pt"
  torch.save({"state_dict": expected, "epoch": 3}, path)
  _assert_matches(load_torch_state_dict(path), expected)


def _zip_checkpoint(path, payload: bytes):
  """A zip laid out like torch.save's, with an arbitrary data.pkl."""
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", payload)
    archive.writestr("archive/byteorder", "little")


class _RunsCommand:
  def __reduce__(self):
    return (os.system, ("echo this must never run",))


def test_refuses_globals_outside_state_dicts(tmp_path):
  path = tmp_path / "malicious.pth"
  _zip_checkpoint(path, pickle.dumps({"weight": _RunsCommand()}, protocol=2))
  with pytest.raises(pickle.UnpicklingError, match=r"(posix|os|nt)\.system"):
    load_torch_state_dict(path)
  # The same refusal in the legacy layout, whose first pickle is read before any check.
  legacy = tmp_path / "malicious_legacy.pth"
  legacy.write_bytes(pickle.dumps(_RunsCommand(), protocol=2))
  with pytest.raises(ValueError, match=r"system"):
    load_torch_state_dict(legacy)


def test_refuses_tensor_reaching_outside_its_storage(tmp_path):
  path = tmp_path / "weights.pth"
  torch.save({"weight": torch.zeros(2, 3)}, path)
  with zipfile.ZipFile(path) as archive:
    entries = {name: archive.read(name) for name in archive.namelist()}
  # Truncate the storage to 4 of its 6 floats, keeping the pickle that claims 6.
  storage_name = next(n for n in entries if n.endswith("/data/0"))
  entries[storage_name] = entries[storage_name][:16]
  pkl_name = next(n for n in entries if n.endswith("/data.pkl"))
  entries[pkl_name] = entries[pkl_name].replace(b"K\x06t", b"K\x04t")  # numel 6 -> 4
  with zipfile.ZipFile(path, "w") as archive:
    for name, data in entries.items():
      archive.writestr(name, data)
  with pytest.raises(ValueError, match="reaches element 5 of a storage of 4"):
    load_torch_state_dict(path)


def test_missing_and_unrecognised_files(tmp_path):
  missing = tmp_path / "absent.pth"
  with pytest.raises(FileNotFoundError, match="absent.pth"):
    load_torch_state_dict(missing)
  garbage = tmp_path / "garbage.pth"
  garbage.write_bytes(b"not a checkpoint at all")
  with pytest.raises(ValueError, match="garbage.pth"):
    load_torch_state_dict(garbage)
  buffer = io.BytesIO()
  torch.save(torch.zeros(3), buffer)  # a bare tensor, not a dict
  bare = tmp_path / "bare.pth"
  bare.write_bytes(buffer.getvalue())
  with pytest.raises(ValueError, match="not a state dict"):
    load_torch_state_dict(bare)


def test_truncated_legacy_file(tmp_path):
  path = tmp_path / "weights.pth"
  torch.save({"weight": torch.zeros(4, 4)}, path, _use_new_zipfile_serialization=False)
  path.write_bytes(path.read_bytes()[:-10])
  with pytest.raises(ValueError, match="expected 64"):
    load_torch_state_dict(path)
