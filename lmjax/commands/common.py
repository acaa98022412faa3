"""What several commands share: reading a config from flags or a workdir, loading a trained model."""

from __future__ import annotations

import json
import os

import jax

from lmjax import checkpoint as checkpoint_lib
from lmjax import config as config_lib
from lmjax.models.transformer import ModelConfig, init_params


def add_config_arguments(parser) -> None:
  parser.add_argument('--config', default='default',
                      help='a config file with get_config(), or a preset name in configs/ '
                           '(tiny, default, 125m, 350m, 1b, 7b); override keys with '
                           '--config.KEY=VALUE')


def config_from_args(args):
  """The config file plus overrides, validated (a ConfigError names the bad key)."""
  config = config_lib.load_config(args.config)
  config_lib.apply_overrides(config, args.overrides)
  config_lib.validate(config)
  return config


def workdir_config(workdir: str, overrides=()):
  """The resolved config a workdir was trained (or converted) with, plus overrides."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise config_lib.ConfigError(f'--workdir: {workdir} has no config.json (not an lmjax workdir)')
  with open(path, encoding='utf-8') as f:
    config = config_lib.from_json(f.read())
  config_lib.apply_overrides(config, list(overrides))
  config_lib.validate(config)
  return config


def load_model(workdir: str, config):
  """(ModelConfig, params) from the workdir's latest checkpoint or params export."""
  model_cfg = ModelConfig.from_config(config.model)
  if config.task != 'pretrain':  # a post-training workdir: the base with its adapters merged
    from lmjax.posttrain.params import load_model_params  # pylint: disable=g-import-not-at-top
    return model_cfg, load_model_params(workdir, config)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          jax.eval_shape(lambda: _plain_params(model_cfg)))
  return model_cfg, checkpoint_lib.load_params(workdir, abstract)


def _plain_params(model_cfg):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  return nn.unbox(init_params(model_cfg, jax.random.key(0)))


def print_json(value) -> None:
  print(json.dumps(value, indent=2, sort_keys=True))
