"""The training config: one source of defaults, every shipped config valid, errors that name
the key, and workdirs of older versions upgraded."""

import json

import pytest

from configs import default, ecdit, shapes_gpu, t2i_256
from ecdit_jax import config as config_lib
from ecdit_jax.config import TrainConfig
from ecdit_jax.errors import ConfigError
from tests.tiny import tiny_train_config


def test_the_config_dict_holds_every_key_at_its_default():
  built = TrainConfig.from_mapping(config_lib.config_dict())
  assert built == TrainConfig()
  assert TrainConfig.from_mapping(json.loads(json.dumps(built.to_dict()))) == built


@pytest.mark.parametrize("name, config", [
    ("default", default.get_config()), ("shapes_gpu", shapes_gpu.get_config()),
    ("XL-32E", ecdit.get_config("XL-32E")), ("M-64E,runlocal", ecdit.get_config("M-64E,runlocal")),
])
def test_shipped_configs_are_valid(name, config):
  assert TrainConfig.from_mapping(config).model.hidden_size > 0, name


@pytest.mark.parametrize("variant", ["XL-32E", "M-64E,runlocal"])
def test_t2i_256_needs_its_latents_and_weights_named(variant):
  config = t2i_256.get_config(variant)
  with pytest.raises(ConfigError, match=r"config\.data\.dataset='latents:'"):
    TrainConfig.from_mapping(config)
  config.data.dataset = "latents:/data/latents"
  with pytest.raises(ConfigError, match=r"config\.pretrained\.text_encoder"):
    TrainConfig.from_mapping(config)
  config.pretrained.update(text_encoder="/w/t5", vae="/w/vae")
  assert TrainConfig.from_mapping(config).data.on_latents


@pytest.mark.parametrize("key, value, message", [
    ("model.routr", "x", r"unknown key\(s\) config\.model\.routr"),
    ("data.datset", "x", r"unknown key\(s\) config\.data\.datset"),
    ("learning_rate", 0.0, r"config\.learning_rate=0\.0 must be > 0"),
    ("steps_per_call", 0, r"config\.steps_per_call=0"),
    ("profile.num_steps", -1, r"config\.profile\.num_steps=-1"),
    ("mesh.dcn_expert", 2, r"config\.mesh\.dcn_expert=2: only data, fsdp may span slices"),
    ("sample.prompts", (), r"config\.sample\.prompts=\(\)"),
    ("diffusion.mask_ratio", 1.0, r"config\.diffusion\.mask_ratio=1\.0"),
    ("host_offload", "ema,params", r"config\.host_offload='ema,params' must list parts of"),
    ("mesh.dense_over_expert", "yes", r"config\.mesh\.dense_over_expert='yes' must be True or"),
    ("cast_weights_once", 1, r"config\.cast_weights_once=1 must be True or False"),
])
def test_bad_values_name_the_key(key, value, message):
  mapping = config_lib.config_dict().to_dict()
  *parents, leaf = key.split(".")
  target = mapping
  for parent in parents:
    target = target[parent]
  target[leaf] = value
  with pytest.raises(ConfigError, match=message):
    TrainConfig.from_mapping(mapping)


@pytest.mark.parametrize("key", ["log_every_steps", "checkpoint_every_steps",
                                 "sample_every_steps", "eval_every_steps"])
def test_intervals_that_split_a_call_name_the_key(key):
  intervals = {"log_every_steps": 4, "checkpoint_every_steps": 4, "sample_every_steps": 4,
               "eval_every_steps": 4, key: 6}
  with pytest.raises(ConfigError, match=f"config.{key}=6 must be a multiple of "
                                        "config.steps_per_call=4"):
    TrainConfig.from_mapping(tiny_train_config("", steps_per_call=4, **intervals))


def test_machine_checks_name_processes_and_mesh():
  config = TrainConfig.from_mapping(tiny_train_config("", batch_size=6,
                                                      **{"mesh.data": 2, "mesh.fsdp": -1}))
  with pytest.raises(ConfigError, match="divisible by the 4 processes"):
    config_lib.check_devices(config, 8, 4)
  with pytest.raises(ConfigError, match="batch shards"):
    config_lib.check_devices(config, 8, 1)
  assert config_lib.check_devices(config, 6, 2) == {"data": 2, "fsdp": 3, "expert": 1,
                                                    "tensor": 1}


def test_an_older_workdirs_config_gains_the_keys_added_since():
  saved = TrainConfig.from_mapping(default.get_config()).to_dict()
  for key in ("pretrained", "profile", "steps_per_call", "lr_decay", "momentum_dtype"):
    del saved[key]
  for key in ("text_encoder", "scan_layers", "moe_dispatch"):
    del saved["model"][key]
  del saved["data"]["cache_in_memory"]
  upgraded = config_lib.upgrade(saved)
  assert upgraded["model"]["scan_layers"] is False and upgraded["pretrained"]["vae"] == ""
  assert TrainConfig.from_mapping(upgraded) == TrainConfig.from_mapping(default.get_config())
