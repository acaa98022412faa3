"""Pipeline stages run the model's own embedding, layers and head: fine-tuning with a quantised
base, LoRA on the LM head, DoRA, bottleneck adapters, prefix tuning and a tied head gives the same
loss and gradients with 2 stages as without (tests/pipeline_peft_worker.py, 2 CPU devices)."""

import json
import os
import subprocess
import sys

import pytest

from lmjax.config import ConfigError, apply_overrides, load_config
from lmjax.parallel import mesh as mesh_lib

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope='module')
def results():
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2 '
                                                    '--xla_backend_optimization_level=0')
  proc = subprocess.run([sys.executable, os.path.join(TESTS, 'pipeline_peft_worker.py')], env=env,
                        capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('setup', ['qlora_head', 'dora_int8', 'bottleneck', 'prefix', 'full'])
def test_pipelined_fine_tuning_equals_unpipelined(results, setup):
  r = results[setup]
  assert r['loss'] == pytest.approx(r['want_loss'], rel=1e-5)
  assert r['grad_scale'] > 1e-4  # the adapters get a real gradient
  assert r['max_grad_diff'] <= 1e-5 * max(1.0, r['grad_scale'])


def test_virtual_token_prompts_are_refused_under_pipeline_stages():
  config = load_config(os.path.join(os.path.dirname(TESTS), 'configs', 'sft_tiny.py'))
  apply_overrides(config, ['peft.method=prompt', 'model.scan_layers=true', 'mesh.data=1',
                           'mesh.pipeline=2', 'batch_size=4'])
  with pytest.raises(ConfigError, match='peft.method'):
    mesh_lib.validate(config, 2)
