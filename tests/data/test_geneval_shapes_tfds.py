"""The GenEval-Shapes TFDS builder: built without TensorFlow, cached, random access, reproducible."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from tensorflow_datasets.proto import tf_example_pb2

from ecdit_jax.data import geneval_shapes as gs
from ecdit_jax.data import geneval_shapes_tfds as gst

NUM_TRAIN, NUM_TEST = 120, 30

# Runs in a fresh interpreter in which every `import tensorflow...` fails, whether eager or lazy.
_BUILD_WITHOUT_TF = textwrap.dedent(
  """
    import importlib.abc, importlib.machinery, json, sys

    class _FailingLoader(importlib.abc.Loader):
        def create_module(self, spec):
            raise ImportError("TensorFlow must not be imported: " + spec.name)
        def exec_module(self, module):
            pass

    class _BlockTensorFlow(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "tensorflow" or name.startswith("tensorflow."):
                return importlib.machinery.ModuleSpec(name, _FailingLoader())
            return None

    sys.meta_path.insert(0, _BlockTensorFlow())
    from ecdit_jax.data import geneval_shapes_tfds as gst
    builder = gst.prepare(sys.argv[1], num_train=int(sys.argv[2]), num_test=int(sys.argv[3]), seed=0)
    source = builder.as_data_source("train")
    record = source[len(source) - 1]
    print(json.dumps({
        "len": len(source),
        "caption": record["caption"].decode(),
        "tf_loaded": any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules),
    }))
    """
)


def _canonical_records(builder):
  """Every stored record, re-serialized with sorted feature keys.

  The stored tf.train.Example protos hold their features in a protobuf map, whose wire order
  varies between processes; everything else (PNG bytes, captions, labels, record order) must
  be identical, and sorting the keys makes that comparable byte for byte.
  """
  records = {}
  for name, _ in _array_record_files(builder).items():
    reader = array_record_module.ArrayRecordReader(os.path.join(builder.data_dir, name))
    protos = [tf_example_pb2.Example.FromString(raw) for raw in reader.read_all()]
    reader.close()
    records[name] = [p.SerializeToString(deterministic=True) for p in protos]
  return records


def _array_record_files(builder):
  directory = builder.data_dir
  return {
    name: open(os.path.join(directory, name), "rb").read()
    for name in sorted(os.listdir(directory))
    if ".array_record" in name
  }


@pytest.fixture(scope="module")
def built_without_tf(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds_no_tf")
  result = subprocess.run(
    [sys.executable, "-c", _BUILD_WITHOUT_TF, str(data_dir), str(NUM_TRAIN), str(NUM_TEST)],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return data_dir, json.loads(result.stdout.strip().splitlines()[-1])


def test_builds_and_reads_where_tensorflow_cannot_be_imported(built_without_tf):
  _, report = built_without_tf
  assert report["len"] == NUM_TRAIN
  assert report["caption"] == gs.generate_example_at(0, NUM_TRAIN - 1).caption
  assert report["tf_loaded"] is False


def test_records_match_the_generator(built_without_tf):
  data_dir, _ = built_without_tf
  builder = gst.prepare(data_dir, num_train=NUM_TRAIN, num_test=NUM_TEST, seed=0)
  info = builder.info
  assert info.splits["train"].num_examples == NUM_TRAIN
  assert info.splits["test"].num_examples == NUM_TEST
  labels = info.features["category"]
  for split, stream in (("train", 0), ("test", 1)):
    source = builder.as_data_source(split)
    for index in (0, 1, 17, len(source) - 1):
      record = source[index]
      expected = gs.generate_example_at(0, index, 32, stream)
      assert record["index"] == index
      assert record["image"].dtype == np.uint8
      assert np.array_equal(record["image"], expected.image)
      assert record["caption"].decode() == expected.caption
      assert labels.int2str(record["category"]) == expected.category
  train, test = builder.as_data_source("train"), builder.as_data_source("test")
  assert not np.array_equal(train[0]["image"], test[0]["image"])


def test_cache_is_reused_and_readable_by_name(built_without_tf):
  data_dir, _ = built_without_tf
  builder = gst.make_builder(data_dir, num_train=NUM_TRAIN, num_test=NUM_TEST, seed=0)
  before = {
    name: os.stat(os.path.join(builder.data_dir, name)).st_mtime_ns
    for name in _array_record_files(builder)
  }
  builder = gst.prepare(data_dir, num_train=NUM_TRAIN, num_test=NUM_TEST, seed=0)
  after = {
    name: os.stat(os.path.join(builder.data_dir, name)).st_mtime_ns
    for name in _array_record_files(builder)
  }
  assert before == after and len(before) == 2
  by_name = tfds.data_source(
    f"geneval_shapes/{builder.builder_config.name}", data_dir=str(data_dir), split="test"
  )
  assert len(by_name) == NUM_TEST
  assert np.array_equal(by_name[3]["image"], gs.generate_example_at(0, 3, 32, 1).image)


def test_same_settings_give_identical_records_other_settings_do_not_collide(
  tmp_path, built_without_tf
):
  data_dir, _ = built_without_tf  # built in another process
  original = gst.make_builder(data_dir, num_train=NUM_TRAIN, num_test=NUM_TEST, seed=0)
  rebuilt = gst.prepare(tmp_path / "again", num_train=NUM_TRAIN, num_test=NUM_TEST, seed=0)
  original_records = _canonical_records(original)
  assert [len(r) for r in original_records.values()] == [NUM_TEST, NUM_TRAIN]  # sorted names
  assert _canonical_records(rebuilt) == original_records

  # Another seed and another image size in the same data_dir: separate caches, other data.
  other_seed = gst.prepare(data_dir, num_train=NUM_TRAIN, num_test=NUM_TEST, seed=1)
  big = gst.prepare(data_dir, image_size=64, num_train=8, num_test=2, seed=0)
  assert len({original.data_dir, other_seed.data_dir, big.data_dir}) == 3
  assert _canonical_records(other_seed) != original_records
  assert big.as_data_source("train")[0]["image"].shape == (64, 64, 3)
  assert np.array_equal(
    big.as_data_source("train")[5]["image"], gs.generate_example_at(0, 5, 64).image
  )


def test_preparing_leaves_nothing_in_the_temporary_directory(tmp_path, monkeypatch):
  temp = tmp_path / "temp"
  temp.mkdir()
  monkeypatch.setattr("tempfile.tempdir", str(temp))
  builder = gst.prepare(tmp_path / "data", image_size=16, num_train=8, num_test=2, seed=5)
  assert len(builder.as_data_source("train")) == 8
  assert list(temp.iterdir()) == []
