import pytest


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A GenEval-Shapes build (and tokenizer cache) shared by the tests of this directory."""
  return str(tmp_path_factory.mktemp("tfds"))
