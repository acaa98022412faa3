"""Config errors are one line, name the key, and come before anything compiles."""

import subprocess
import sys

import pytest

from lmjax import config as config_lib
from lmjax.config import ConfigError, apply_overrides, load_config, validate
from lmjax.parallel import mesh as mesh_lib


def _error(config, overrides=(), num_devices=None):
  with pytest.raises(ConfigError) as info:
    apply_overrides(config, list(overrides))
    if num_devices is None:
      validate(config)
    else:
      mesh_lib.validate(config, num_devices)
  message = str(info.value)
  assert '\n' not in message
  return message


@pytest.mark.parametrize('overrides,key', [
    (['model.d_modle=5'], 'model.d_modle'),
    (['modle.d_model=5'], 'modle'),
    (['steps=ten'], 'steps'),
    (['model.tie_embeddings=maybe'], 'model.tie_embeddings'),
    (['optimizer.learning_rate=fast'], 'optimizer.learning_rate'),
    (['model.num_kv_heads=3'], 'model.num_kv_heads'),
    (['seq_len=4096'], 'seq_len'),
    (['model.attention=flash'], 'model.attention'),
    (['grad_accum_steps=3'], 'grad_accum_steps'),
    (['steps=0'], 'steps'),
    (['data.eval_fraction=1.5'], 'data.eval_fraction'),
    (['optimizer.warmup_steps=100'], 'optimizer.warmup_steps'),
])
def test_bad_values_name_the_key(tiny_config, overrides, key):
  assert _error(tiny_config, overrides).startswith(key + ':')


def test_batch_must_divide_over_data_parallel_devices(tiny_config):
  assert _error(tiny_config, ['batch_size=6'], num_devices=4).startswith('batch_size:')
  assert _error(tiny_config, ['mesh.data=3'], num_devices=4).startswith('mesh')


def test_overrides_are_typed_by_the_schema(tiny_config):
  apply_overrides(tiny_config, ['model.d_model=128', 'optimizer.learning_rate=1e-3',
                                'model.tie_embeddings=true', 'data.source=a.jsonl@1,stdlib@5',
                                'optimizer.weight_decay=0'])
  assert tiny_config.model.d_model == 128 and tiny_config.model.tie_embeddings is True
  assert tiny_config.optimizer.learning_rate == 1e-3
  assert isinstance(tiny_config.optimizer.weight_decay, float)
  assert tiny_config.data.source == 'a.jsonl@1,stdlib@5'


def test_config_files_may_not_add_keys(tmp_path):
  path = tmp_path / 'bad.py'
  path.write_text('from lmjax.config import base_config\n'
                  'def get_config():\n  c = base_config()\n  c.model.widht = 3\n  return c\n')
  with pytest.raises(ConfigError, match=r'^model\.widht: unknown config key'):
    load_config(str(path))


@pytest.mark.parametrize('preset', ['tiny', 'default', '125m', '350m', '1b', '7b'])
def test_presets_are_valid_and_round_trip_through_json(preset):
  config = load_config(preset)
  validate(config)
  again = config_lib.from_json(config_lib.to_json(config))
  assert again.to_dict() == config.to_dict()


def test_cli_reports_a_config_error_in_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'lmjax.cli', 'train', '--config=tiny', f'--workdir={tmp_path}',
       '--config.model.num_heads=4', '--config.model.num_kv_heads=3'],
      capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      'lmjax train: config error: model.num_kv_heads: 3 does not divide model.num_heads=4']
  assert not (tmp_path / 'checkpoints').exists()


def test_resuming_under_another_model_shape_names_the_key(tmp_path):
  run = lambda *extra: subprocess.run(
      [sys.executable, '-m', 'lmjax.cli', 'train', '--config=tiny', f'--workdir={tmp_path}',
       '--config.steps=2', '--config.optimizer.warmup_steps=1', '--config.eval_every=100',
       '--no_sample', *extra],
      capture_output=True, text=True, timeout=300)
  assert run().returncode == 0
  result = run('--config.model.d_model=32')
  assert result.returncode == 2
  assert result.stderr.strip().startswith(
      'lmjax train: config error: model.d_model: ') and 'not 32' in result.stderr
