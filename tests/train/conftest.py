import pytest


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """One GenEval-Shapes build (and tokenizer cache) shared by all training tests."""
  return str(tmp_path_factory.mktemp("tfds"))
