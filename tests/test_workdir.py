"""Workdirs written before the one-trainer restructuring (commit 93631dd, tests/data/workdir_v0)
still load, resume, sample and serve as `init_from`; config.json is written atomically."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import cli
from lmjax import tasks
from lmjax import workdir as workdir_lib
from lmjax.config import apply_overrides
from lmjax.models.transformer import forward
from lmjax.train.loop import train

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'workdir_v0')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _copy(name, tmp_path):
  target = str(tmp_path / name)
  shutil.copytree(os.path.join(FIXTURE, name), target)
  return target


def _expected():
  with open(os.path.join(FIXTURE, 'expected.json'), encoding='utf-8') as f:
    expected = json.load(f)
  return expected, np.load(os.path.join(FIXTURE, 'expected_logits.npz'))


@pytest.mark.parametrize('name', ['pretrain', 'sft_lora'])
def test_old_workdir_loads_to_the_same_logits(name):
  expected, logits = _expected()
  model_cfg, params = tasks.load_model(os.path.join(FIXTURE, name))
  tokens = jnp.asarray(expected['tokens'], jnp.int32)[None]
  got = forward(model_cfg, params, tokens, jnp.arange(tokens.shape[1])[None],
                jnp.ones_like(tokens))[0]
  np.testing.assert_allclose(got, logits[name], rtol=1e-6, atol=1e-6)


def test_old_pretraining_workdir_resumes_to_the_old_next_loss(tmp_path):
  workdir = _copy('pretrain', tmp_path)
  config = workdir_lib.config_of(workdir)
  apply_overrides(config, ['steps=4', 'log_every=1', 'progress_bar=false'])
  train(config, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    step4 = [r for r in map(json.loads, f) if r['split'] == 'train' and r['step'] == 4]
  assert step4 and step4[-1]['loss'] == _expected()[0]['pretrain_resume_step4_loss']


def test_old_workdirs_sample_and_start_a_fine_tuning_run(tmp_path, capsys):
  sft = os.path.join(FIXTURE, 'sft_lora')
  assert cli.main(['sample', f'--workdir={sft}', '--prompt=def ', '--max_new_tokens=4']) == 0
  assert capsys.readouterr().out.startswith('def ')
  base = os.path.join(FIXTURE, 'pretrain')
  workdir = str(tmp_path / 'sft')
  assert cli.main(['train', f'--config={ROOT}/configs/sft_tiny.py', f'--workdir={workdir}',
                   f'--config.init_from={base}', '--config.steps=1', '--config.model.d_model=32',
                   '--config.model.mlp_dim=64', '--no_sample']) == 0
  _, old_base = tasks.load_trained(base)
  task, params = tasks.load_task_params(workdir)
  np.testing.assert_array_equal(params['frozen']['model']['embed'], old_base['embed'])


def test_config_json_is_written_atomically(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  config = workdir_lib.config_of(os.path.join(FIXTURE, 'pretrain'))
  workdir_lib.write_config(workdir, config)
  before = open(os.path.join(workdir, 'config.json'), encoding='utf-8').read()

  def fail(*args, **kwargs):
    raise OSError('disk full')

  monkeypatch.setattr(json, 'dump', fail)
  with pytest.raises(OSError):
    workdir_lib.write_config(workdir, config)
  assert open(os.path.join(workdir, 'config.json'), encoding='utf-8').read() == before
