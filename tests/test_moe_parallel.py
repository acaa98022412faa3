"""Expert parallelism (`sharding=ep`, `mesh.expert`) on 8 virtual CPU devices: five MoE training
steps under each layout equal one device (tests/moe_parallel_worker.py, one subprocess)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))

LAYOUTS = ['expert8', 'expert4_fsdp2', 'expert2_tensor2_data2', 'expert8_capacity']


@pytest.fixture(scope='module')
def expert_parallel():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8 '
             '--xla_backend_optimization_level=0')  # tiny programs: compiling dominates
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [TESTS, env.get('PYTHONPATH')]))
  proc = subprocess.run([sys.executable, os.path.join(TESTS, 'moe_parallel_worker.py')], env=env,
                        capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('layout', LAYOUTS)
def test_expert_parallel_steps_equal_one_device(expert_parallel, layout):
  """Losses within 1e-5 over 5 steps; routing statistics (reduced over the global batch) equal;
  the experts are split over `expert` and tokens really travel by all-to-all."""
  result, ref = expert_parallel[layout], expert_parallel['ref']
  assert len(result['history']) == 5
  for key in ('loss', 'moe_aux_loss', 'moe_z_loss', 'moe_load_max_l0', 'moe_dropped'):
    np.testing.assert_allclose([h[key] for h in result['history']], [h[key] for h in ref],
                               rtol=1e-5, atol=1e-6, err_msg=key)
  assert result['param_error'] < 1e-4
  assert result['gate_spec'] == ['expert', 'fsdp', 'tensor']
  assert result['all_to_all']
