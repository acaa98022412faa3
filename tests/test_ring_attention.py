"""Context parallelism (mesh.context): zigzag order, ring / all-gather attention, training.

The multi-device checks run in one subprocess with 8 virtual CPU devices
(tests/ring_attention_worker.py); this process has one device.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lmjax import config as config_lib
from lmjax.parallel import mesh as mesh_lib
from lmjax.parallel import ring_attention

TESTS = os.path.dirname(os.path.abspath(__file__))
ATOL = 1e-5  # float32 values and gradients


@pytest.fixture(scope='module')
def worker(tmp_path_factory):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [TESTS, os.environ.get(
      'PYTHONPATH')])), RING_WORKDIR=str(tmp_path_factory.mktemp('ring')))
  env['XLA_FLAGS'] = ('--xla_force_host_platform_device_count=8 '
                      '--xla_backend_optimization_level=0')
  proc = subprocess.run([sys.executable, os.path.join(TESTS, 'ring_attention_worker.py'),
                         'attention', 'train', 'loop'], env=env, capture_output=True, text=True,
                        timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_zigzag_then_inverse_is_the_identity():
  rng = np.random.default_rng(0)
  batch = {'inputs': rng.integers(0, 9, (3, 24)), 'weights': rng.random((3, 24)),
           'x': rng.random((3, 24, 2))}
  for context in (1, 2, 3, 6):
    back = ring_attention.unzigzag(ring_attention.zigzag(batch, context), context)
    for key, value in batch.items():
      np.testing.assert_array_equal(back[key], value)
  zig = ring_attention.zigzag({'p': np.arange(8)[None]}, 2)['p'][0]
  np.testing.assert_array_equal(zig, [0, 1, 6, 7, 2, 3, 4, 5])  # chunks 0, 3 | 1, 2


def _causal_pairs_per_device(order, context):
  """Visible (query, key) pairs of a causal mask on each device's share of `order`."""
  per_device = len(order) // context
  return [int(np.sum(order[d * per_device:(d + 1) * per_device] + 1)) for d in range(context)]


@pytest.mark.parametrize('context', [2, 4, 8])
def test_zigzag_balances_causal_work(context):
  length = 64
  pairs = _causal_pairs_per_device(ring_attention.zigzag_order(length, context), context)
  assert len(set(pairs)) == 1 and sum(pairs) == length * (length + 1) // 2, pairs
  contiguous = _causal_pairs_per_device(np.arange(length), context)
  assert len(set(contiguous)) == context  # the measure can fail: a plain split is unbalanced


@pytest.mark.parametrize('case', ['ring4_causal_gqa_window', 'ring4_noncausal_gqa',
                                  'ring8_causal_mqa', 'ring8_noncausal_window',
                                  'allgather4_causal_gqa_window',
                                  'ring4_pallas_causal_gqa_window'])
def test_context_attention_equals_one_device(worker, case):
  """Packed segments (and padding) in every case; values and dq/dk/dv within f32 1e-5."""
  result = worker['attention'][case]
  for key in ('out', 'dq', 'dk', 'dv'):
    assert result[key] < ATOL, (key, result)
  assert result['out_scale'] > 0.1
  ring = case.startswith('ring')
  assert result['ppermute'] == ring and result['all_gather'] == (not ring), result


@pytest.mark.parametrize('layout', ['context4', 'context2_fsdp2_tensor2'])
def test_five_training_steps_equal_one_device(worker, layout):
  losses, reference = worker['train'][layout], worker['train']['reference']
  assert len(losses) == 5
  np.testing.assert_allclose(losses, reference, rtol=1e-5)


def test_train_loop_zigzags_train_and_eval_batches(worker):
  """`lmjax.train.loop.train` on stdlib text at mesh.context=2 x data=4 equals data=8."""
  context, plain = worker['loop']['context2_data4'], worker['loop']['data8']
  assert len(context['train']) == 3
  np.testing.assert_allclose(context['train'], plain['train'], rtol=1e-5)
  np.testing.assert_allclose(context['eval'], plain['eval'], rtol=1e-5)


def _config(**overrides):
  config = config_lib.load_config('tiny')
  config.batch_size, config.seq_len = 8, 32
  config_lib.apply_overrides(config, [f'{k}={v}' for k, v in overrides.items()])
  return config


def test_context_rules_split_the_sequence():
  params, _ = mesh_lib.rules(_config(**{'mesh.data': 2, 'mesh.context': 4}))
  rules = dict(params)
  assert rules['act_len'] == 'context' and rules['act_tokens'] == ('data', 'fsdp', 'context')
  assert dict(mesh_lib.rules(_config())[0])['act_len'] is None  # context 1: unchanged


@pytest.mark.parametrize('overrides, key', [
    ({'seq_len': 36}, 'seq_len'),
    ({'model.attention': 'cudnn'}, 'model.attention'),
    ({'mesh.pipeline': 2, 'mesh.data': 1, 'model.scan_layers': True}, 'mesh.context'),
    ({'task': 'dpo', 'post.train_file': 'x.jsonl'}, 'mesh.context'),
    ({'model.context_parallel': 'stripes'}, 'model.context_parallel'),
])
def test_bad_context_configs_name_the_key(overrides, key):
  config = _config(**{'mesh.data': 2, 'mesh.context': 4, **overrides})
  with pytest.raises(config_lib.ConfigError) as error:
    mesh_lib.validate(config, 8)
  message = str(error.value)
  assert message.startswith(f'{key}:') and '\n' not in message, message
