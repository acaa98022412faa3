"""A killed run resumes exactly; SIGTERM saves and exits 0; partial checkpoints are never used."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lmjax import tasks
from lmjax import workdir as workdir_lib

FAULT_INJECTION = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fault_injection.py')
STEPS = 12
ARGS = ['--config=tiny', f'--config.steps={STEPS}', '--config.checkpoint_every=4',
        '--config.eval_every=100', '--config.log_every=1', '--no_sample']


def _train(workdir, faults=(), wait=True):
  """`lmjax train` in a subprocess; with `faults` (--crash_at=N, --step_delay=S) it runs through
  tests/fault_injection.py, the same command with fault-injection hooks."""
  if faults:
    cmd = [sys.executable, FAULT_INJECTION, *faults, f'--workdir={workdir}', *ARGS]
  else:
    cmd = [sys.executable, '-m', 'lmjax.cli', 'train', f'--workdir={workdir}', *ARGS]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  if wait:
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out
  return proc


def _train_losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    records = [json.loads(line) for line in f]
  return {r['step']: r['loss'] for r in records if r['split'] == 'train'}


def _params(workdir):
  return tasks.load_model(workdir, workdir_lib.config_of(workdir))[1]


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  code, out = _train(workdir)
  assert code == 0, out
  return workdir


# (crash step, seconds per step): killed while checkpoint 8 is still being written, once with
# checkpoint 4 complete (slow steps) and once racing the first async save.
@pytest.mark.parametrize('crash_at,delay', [(9, '0.3'), (8, '0')])
def test_killed_run_resumes_bit_identically(uninterrupted, tmp_path, crash_at, delay):
  workdir = str(tmp_path)
  code, out = _train(workdir, faults=[f'--crash_at={crash_at}', f'--step_delay={delay}'])
  assert code == -signal.SIGKILL, out
  completed = [int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit()]
  assert max(completed, default=0) <= 8
  if delay != '0':
    assert 4 in completed
  code, out = _train(workdir)
  assert code == 0, out
  expected, resumed = _train_losses(uninterrupted), _train_losses(workdir)
  assert resumed.keys() == expected.keys()
  for step in expected:  # bit-identical, including the steps replayed after the crash
    assert resumed[step] == expected[step], step
  jax.tree.map(np.testing.assert_array_equal, _params(workdir), _params(uninterrupted))


def test_sigterm_saves_and_exits_zero(uninterrupted, tmp_path):
  workdir = str(tmp_path)
  proc = _train(workdir, faults=['--step_delay=0.5'], wait=False)
  deadline = time.time() + 240
  while time.time() < deadline and not os.path.exists(os.path.join(workdir, 'metrics.jsonl')):
    time.sleep(0.2)
  time.sleep(1.0)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert 'stopped at step' in out
  saved = [int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit()]
  assert saved and max(saved) < STEPS
  code, out = _train(workdir)
  assert code == 0, out
  assert _train_losses(workdir)[STEPS] == _train_losses(uninterrupted)[STEPS]
  jax.tree.map(np.testing.assert_array_equal, _params(workdir), _params(uninterrupted))


def test_rerunning_a_finished_run_changes_nothing(uninterrupted):
  before = _params(uninterrupted)
  code, out = _train(uninterrupted)
  assert code == 0, out
  jax.tree.map(np.testing.assert_array_equal, _params(uninterrupted), before)
