"""The one loop: throughput and MFU on a fake clock, the adaptive KL controller, and a PPO run
stopped by SIGTERM and resumed equals an uninterrupted one exactly."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from lmjax.config import apply_overrides, load_config
from lmjax.perf import peak_flops_per_device
from lmjax.scaling.flops import flops_per_token
from lmjax.tasks.ppo import next_kl_coef
from lmjax.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECONDS_PER_STEP = 2.0


def _config(preset, *overrides):
  config = load_config(preset)
  apply_overrides(config, ['progress_bar=false', 'log_every=1', 'eval_every=1000',
                           'checkpoint_every=1000', *overrides])
  return config


def _train_records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [r for r in map(json.loads, f) if r['split'] == 'train']


class _FakeClock:
  """Time moves only when a step ends: SECONDS_PER_STEP per step."""

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now

  def hook(self, step, state):
    del step, state
    self.now += SECONDS_PER_STEP


@pytest.mark.parametrize('preset,rows_per_sequence,forward_rows', [
    ('tiny', 1, 0),  # pretraining: batch x seq_len tokens, forward and backward
    (f'{ROOT}/configs/dpo_tiny.py', 2, 2),  # DPO: chosen + rejected rows; the reference forward
])
def test_tokens_per_second_and_mfu_on_a_fake_clock(tmp_path, preset, rows_per_sequence,
                                                   forward_rows):
  config = _config(preset, 'steps=3', 'optimizer.warmup_steps=0')
  clock = _FakeClock()
  train(config, str(tmp_path), hooks=[clock.hook], clock=clock)
  records = _train_records(str(tmp_path))
  assert [r['step'] for r in records] == [1, 2, 3]
  trained = config.batch_size * rows_per_sequence * config.seq_len
  forward = trained * forward_rows // rows_per_sequence
  flops = flops_per_token(config.model, config.seq_len)['total']
  peak = peak_flops_per_device() * jax.device_count()
  for record in records:
    assert record['tokens_per_second'] == pytest.approx(trained / SECONDS_PER_STEP, rel=1e-12)
    want_mfu = (trained + forward / 3) * flops / SECONDS_PER_STEP / peak
    assert record['mfu'] == pytest.approx(want_mfu, rel=1e-12)


def test_adaptive_kl_coefficient_follows_the_proportional_controller():
  # error = clip(kl / target - 1, -0.2, 0.2); coef <- coef * (1 + 0.1 * error)
  assert float(next_kl_coef(0.1, 0.5, 0.25)) == pytest.approx(0.1 * 1.02)  # kl above: up, capped
  assert float(next_kl_coef(0.1, 0.275, 0.25)) == pytest.approx(0.1 * 1.01)  # 10% above
  assert float(next_kl_coef(0.1, 0.2375, 0.25)) == pytest.approx(0.1 * 0.995)  # 5% below: down
  assert float(next_kl_coef(0.1, 0.0, 0.25)) == pytest.approx(0.1 * 0.98)  # far below, capped
  assert float(next_kl_coef(0.1, 3.0, 0.0)) == 0.1  # target_kl = 0: fixed


def test_ppo_kl_coefficient_moves_by_the_controller_each_step(tmp_path):
  target = 0.05
  config = _config(f'{ROOT}/configs/ppo_tiny.py', 'steps=4', f'post.target_kl={target}',
                   'post.kl_coef=0.2', 'post.kl_estimator=k3')
  train(config, str(tmp_path))
  records = _train_records(str(tmp_path))
  assert records[0]['kl_coef'] == pytest.approx(0.2)
  for before, after in zip(records, records[1:]):
    error = float(np.clip(before['kl'] / target - 1.0, -0.2, 0.2))
    assert after['kl_coef'] == pytest.approx(before['kl_coef'] * (1 + 0.1 * error), rel=1e-6)
  assert records[-1]['kl_coef'] != records[0]['kl_coef']


PPO_OVERRIDES = ('steps=4', 'checkpoint_every=2', 'post.target_kl=0.05')
COMPARED = ('loss', 'kl', 'score', 'kl_coef', 'grad_norm', 'value_loss')


@pytest.fixture(scope='module')
def ppo_straight(tmp_path_factory):
  """An uninterrupted 4-iteration PPO run (adaptive KL: task state that must resume too)."""
  workdir = str(tmp_path_factory.mktemp('ppo_straight'))
  train(_config(f'{ROOT}/configs/ppo_tiny.py', *PPO_OVERRIDES), workdir)
  return _train_records(workdir)


def _last_per_step(records):
  return [r for _, r in sorted({r['step']: r for r in records}.items())]


def test_ppo_stopped_by_sigterm_resumes_exactly(tmp_path, ppo_straight):
  def sigterm_after_one(step, state):
    del state
    if step == 1:
      os.kill(os.getpid(), signal.SIGTERM)

  resumed = str(tmp_path / 'resumed')
  config = _config(f'{ROOT}/configs/ppo_tiny.py', *PPO_OVERRIDES)
  summary = train(config, resumed, hooks=[sigterm_after_one])
  assert summary['step'] == 1 and summary['stopped_by_signal']  # saved between checkpoints
  train(_config(f'{ROOT}/configs/ppo_tiny.py', *PPO_OVERRIDES), resumed)
  got = _train_records(resumed)
  assert [r['step'] for r in got] == [1, 2, 3, 4]
  for key in COMPARED:
    assert [r[key] for r in got] == [r[key] for r in ppo_straight], key


def test_ppo_killed_mid_run_resumes_exactly(tmp_path, ppo_straight):
  workdir = str(tmp_path / 'killed')
  args = [f'--config={ROOT}/configs/ppo_tiny.py', f'--workdir={workdir}', '--no_sample',
          '--config.progress_bar=false', '--config.log_every=1',
          *(f'--config.{o}' for o in PPO_OVERRIDES)]
  killed = subprocess.run([sys.executable, os.path.join(ROOT, 'tests', 'fault_injection.py'),
                           '--crash_at=3', '--step_delay=0.5', *args], capture_output=True,
                          text=True, timeout=600, check=False)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['2']  # step 3 died unsaved
  resumed = subprocess.run([sys.executable, '-m', 'lmjax.cli', 'train', *args],
                           capture_output=True, text=True, timeout=600, check=False)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  got = _last_per_step(_train_records(workdir))
  assert [r['step'] for r in got] == [1, 2, 3, 4]
  for key in COMPARED:
    assert [r[key] for r in got] == [r[key] for r in ppo_straight], key
