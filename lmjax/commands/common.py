"""What several commands share: the --config flag and reading a config from flags."""

from __future__ import annotations

import json

from lmjax import config as config_lib


def add_config_arguments(parser) -> None:
  parser.add_argument('--config', default='default',
                      help='a preset name (tiny, default, 125m, 350m, 1b, 7b), a config file with '
                           'get_config(), or a workdir\'s config.json; override keys with '
                           '--config.KEY=VALUE')


def config_from_args(args):
  """The config file plus overrides, validated (a ConfigError names the bad key)."""
  config = config_lib.load_config(args.config)
  config_lib.apply_overrides(config, args.overrides)
  config_lib.validate(config)
  return config


def print_json(value) -> None:
  print(json.dumps(value, indent=2, sort_keys=True))
