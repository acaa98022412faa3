"""An MoE run (`moe_tiny` through `lmjax train`) killed mid-run resumes bit-identically, routing
metrics included."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np

from lmjax import tasks
from lmjax import workdir as workdir_lib

FAULT_INJECTION = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fault_injection.py')
ARGS = ['--config=moe_tiny', '--config.steps=6', '--config.checkpoint_every=3',
        '--config.eval_every=100', '--config.log_every=1', '--no_sample',
        '--config.model.moe.dispatch=capacity', '--config.model.moe.capacity_factor=1.0']


def _train(workdir, faults=()):
  cmd = ([sys.executable, FAULT_INJECTION, *faults] if faults
         else [sys.executable, '-m', 'lmjax.cli', 'train'])
  proc = subprocess.run([*cmd, f'--workdir={workdir}', *ARGS], capture_output=True, text=True,
                        timeout=600, check=False)
  return proc.returncode, proc.stdout + proc.stderr


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return {r['step']: r for r in map(json.loads, f) if r['split'] == 'train'}


def test_killed_moe_run_resumes_bit_identically(tmp_path):
  reference, resumed = str(tmp_path / 'reference'), str(tmp_path / 'resumed')
  code, out = _train(reference)
  assert code == 0, out
  code, out = _train(resumed, faults=['--crash_at=5', '--step_delay=0.3'])
  assert code == -signal.SIGKILL, out
  code, out = _train(resumed)
  assert code == 0, out
  expected, got = _records(reference), _records(resumed)
  assert expected.keys() == got.keys() == set(range(1, 7))
  keys = ('loss', 'moe_aux_loss', 'moe_z_loss', 'moe_dropped', 'moe_load_max_l0',
          'moe_dropped_l1')
  for step in expected:
    assert [got[step][k] for k in keys] == [expected[step][k] for k in keys], step
  # capacity factor 1.0 on real text drops some assignments; the balancing loss is >= 1
  assert expected[1]['moe_dropped'] > 0 and expected[1]['moe_aux_loss'] >= 1.0 - 1e-6
  load = lambda w: tasks.load_model(w, workdir_lib.config_of(w))[1]
  jax.tree.map(np.testing.assert_array_equal, load(resumed), load(reference))
