"""PPO under data and FSDP parallelism on 8 virtual CPU devices equals one device: the sharded
update on a fixed rollout within 1e-5, whole runs (rollout, scoring, updates) within 1e-2."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(TESTS, 'ppo_parallel_worker.py')


def _run(devices, *args):
  env = dict(os.environ, JAX_PLATFORMS='cpu',  # optimisation level 0: compiling dominates
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} '
                       '--xla_backend_optimization_level=0')
  proc = subprocess.run([sys.executable, WORKER, *args], env=env, capture_output=True, text=True,
                        timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sharded_ppo_update_equals_one_device():
  results = _run(8, 'update')
  one = results['one']
  assert one['metrics']['clip_fraction'] >= 0 and np.isfinite(one['metrics']['loss'])
  for layout in ('fsdp8', 'data2_fsdp4'):
    for got, want in zip(results[layout]['params'], one['params']):
      np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=layout)
    for key in ('loss', 'policy_loss', 'value_loss', 'kl', 'score', 'grad_norm'):
      assert results[layout]['metrics'][key] == pytest.approx(one['metrics'][key], abs=1e-5), key
  moved = max(np.max(np.abs(np.subtract(a, b))) for a, b in
              zip(one['params'], _run(1, 'update')['one']['params']))
  assert moved < 1e-5  # a 1-device mesh inside an 8-device process is a real single device


@pytest.fixture(scope='module')
def one_device_run(tmp_path_factory):
  return _run(1, 'train', 'one', str(tmp_path_factory.mktemp('ppo_one')))


@pytest.mark.parametrize('layout', ['fsdp8', 'data2_fsdp4'])
def test_three_ppo_iterations_on_8_devices_match_one_device(tmp_path, layout, one_device_run):
  one = one_device_run
  got = _run(8, 'train', layout, str(tmp_path / layout))
  assert [r['step'] for r in got] == [1, 2, 3] == [r['step'] for r in one]
  for a, b in zip(got, one):
    assert a['loss'] == pytest.approx(b['loss'], abs=1e-2)
    assert a['score'] == pytest.approx(b['score'], abs=1e-2)


def test_workdirs_restore_straight_onto_the_mesh():
  """What `init_from` and PPO's reward model load: restored into the rules' layout (the
  embedding split 8 ways over fsdp), equal to a one-device load."""
  for name, r in _run(8, 'restore').items():
    assert r['max_diff'] == 0.0, name
    assert r['embed_shards'] == 8 and 'fsdp' in r['embed_spec'], (name, r)
