"""Parallelism: sharding presets, pipeline, resharding on restore, multi-host, mesh validation.

The multi-device checks run in subprocesses with 8 virtual CPU devices (tests/parallel_worker.py,
one subprocess for all of them); multi-host runs two local processes joined by jax.distributed
(tests/parallel_multihost.py). This process itself has one device.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lmjax import config as config_lib
from lmjax.parallel import mesh as mesh_lib
from lmjax.parallel import sharding as sharding_lib
from lmjax.parallel.pipeline import bubble_fraction

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)

from parallel_worker import batches, run_steps, small_config, train_losses  # noqa: E402

RTOL = 1e-5  # float32: losses and gradients
PARAM_RTOL = 1e-4  # params after two Adam steps (the update normalises tiny gradient differences)


def _env(devices, **extra):
  env = dict(os.environ, **extra)
  # Optimisation level 0: these programs are tiny; compiling dominates the test time.
  env['XLA_FLAGS'] = (f'--xla_force_host_platform_device_count={devices} '
                      '--xla_backend_optimization_level=0')
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [TESTS, env.get('PYTHONPATH')]))
  return env


def _last_json(stdout):
  return json.loads(stdout.strip().splitlines()[-1])


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def workdir_root(tmp_path_factory):
  return tmp_path_factory.mktemp('parallel')


@pytest.fixture(scope='module')
def multi_device(workdir_root):
  """All 8-device checks in one subprocess (compiles dominate; one process saves start-up)."""
  proc = subprocess.run(
      [sys.executable, os.path.join(TESTS, 'parallel_worker.py'), 'presets', 'pipeline', 'accum',
       'reshard', 'layouts', 'fsdp_memory'], env=_env(8, PARALLEL_WORKDIR=str(workdir_root)), capture_output=True,
      text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return _last_json(proc.stdout)


@pytest.mark.parametrize('layout', ['data8', 'fsdp8', 'fsdp4_tensor2', 'data2_fsdp2_tensor2',
                                    'pipeline2_fsdp4', 'pipeline4_data2_m8'])
def test_layout_five_steps_equal_single_device(multi_device, layout):
  result = multi_device['layouts'][layout]
  np.testing.assert_allclose(result['losses'], result['ref_losses'], rtol=1e-5)
  assert len(result['losses']) == 5 and result['param_error'] < 1e-4, result


def test_fsdp8_holds_an_eighth_of_the_state_per_device(multi_device):
  memory = multi_device['fsdp_memory']
  assert memory['per_device'] <= 1.05 * memory['total'] / 8, memory


def test_cli_runs_a_layout_from_config_alone(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'lmjax.cli', 'train', '--config=tiny',
       f'--workdir={tmp_path}', '--config.mesh.fsdp=4', '--config.mesh.tensor=2',
       '--config.mesh.data=1', '--config.batch_size=8', '--config.steps=2',
       '--config.optimizer.warmup_steps=1', '--config.eval_every=100', '--no_sample'],
      env=_env(8), cwd=os.path.dirname(TESTS), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.load(open(tmp_path / 'summary.json', encoding='utf-8'))['step'] == 2


# `ep` needs MoE layers (mesh.expert > 1 on a dense model is refused): tests/test_moe_parallel.py
@pytest.mark.parametrize('preset', [p for p in sharding_lib.PRESETS if p != 'ep'])
def test_preset_steps_equal_single_device(multi_device, preset):
  result = multi_device['presets'][preset]
  np.testing.assert_allclose(result['losses'], result['ref_losses'], rtol=RTOL)
  assert result['param_error'] < PARAM_RTOL


def test_preset_shardings(multi_device):
  r = multi_device['presets']
  assert r['dp']['q_spec'] == [] and r['dp']['q_mu_spec'] == []
  assert r['zero1']['q_spec'] == [] and r['zero1']['q_mu_spec'] == [['data', 'fsdp']]
  assert r['fsdp']['q_spec'] == ['fsdp'] and r['fsdp']['q_mu_spec'] == ['fsdp']
  assert r['fsdp']['embed_spec'] == [None, 'fsdp']
  for preset in ('fsdp_tp', 'dp_fsdp_tp'):
    assert r[preset]['q_spec'] == ['fsdp', 'tensor']  # (embed, heads, head_dim)
    assert r[preset]['down_spec'] == ['tensor', 'fsdp']  # (mlp, embed): row-parallel
    assert r[preset]['embed_spec'] == ['tensor', 'fsdp']  # (vocab, embed)
    assert r[preset]['q_mu_spec'] == ['fsdp', 'tensor']


@pytest.mark.parametrize('case', ['dp_pp2_m2', 'fsdp_pp4_m4', 'fsdp_tp_pp2_m4'])
def test_pipeline_equals_unpipelined(multi_device, case):
  result = multi_device['pipeline'][case]
  np.testing.assert_allclose(result['losses'], result['ref_losses'], rtol=RTOL)
  assert result['grad_error'] < RTOL
  assert result['param_error'] < PARAM_RTOL
  assert result['layer_q_spec'][0] == 'pipeline'


def test_grad_accumulation_under_sharding_equals_big_batch(multi_device):
  result = multi_device['accum']
  np.testing.assert_allclose(result['losses'], result['ref_losses'], rtol=RTOL)
  assert result['param_error'] < PARAM_RTOL


def test_restore_under_other_meshes_continues_the_run(multi_device, workdir_root):
  """Saved under fsdp=8; resumed under fsdp=4 x tensor=2 (subprocess) and on one device (here)."""
  from lmjax.train.loop import train  # pylint: disable=g-import-not-at-top
  from parallel_worker import loop_config  # pylint: disable=g-import-not-at-top
  full = multi_device['reshard']['full']
  resumed_tp = multi_device['reshard']['resumed_tp']
  one_device = str(workdir_root / 'resumed_one_device')
  shutil.copytree(workdir_root / 'saved', one_device)
  train(loop_config(steps=4), one_device)
  resumed_one = {str(k): v for k, v in train_losses(one_device).items()}
  for step in ('3', '4'):
    np.testing.assert_allclose(resumed_tp[step], full[step], rtol=RTOL)
    np.testing.assert_allclose(resumed_one[step], full[step], rtol=RTOL)


def _two_processes(mode, workdir, faults_per_process=((), ())):
  """Both processes of the job; `faults_per_process`: each one's fault-injection flags
  (--crash_at=N, --step_delay=S, see tests/fault_injection.py; MODE `loop` only)."""
  port = _free_port()
  return [subprocess.Popen(
      [sys.executable, os.path.join(TESTS, 'parallel_multihost.py'), mode, str(i), str(port),
       str(workdir), *faults_per_process[i]], env=_env(4), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]


def test_two_processes_match_one(tmp_path):
  procs = _two_processes('train', tmp_path / 'run')
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  lines = [[json.loads(line) for line in out.splitlines() if line.startswith('{')]
           for out, _ in outputs]
  step_result, summaries = lines[0][0], [lines[i][1] for i in range(2)]
  ref_losses, ref_state = run_steps(small_config(**{'mesh.data': 1, 'sharding': 'dp'}),
                                    batches(small_config(), 2), jax.devices()[:1])
  np.testing.assert_allclose(step_result['losses'], ref_losses, rtol=RTOL)
  ref_checksum = {'/'.join(str(getattr(k, 'key', k)) for k in path):
                  float(np.sum(np.asarray(leaf, np.float64)))
                  for path, leaf in jax.tree_util.tree_flatten_with_path(ref_state.params)[0]}
  for name, value in ref_checksum.items():
    np.testing.assert_allclose(step_result['checksum'][name], value, rtol=1e-4, atol=1e-4)
  assert [s['process_index'] for s in summaries] == [0, 1]
  assert all(s['devices'] == 8 and s['summary']['finished'] for s in summaries)
  assert summaries[0]['summary']['train_loss'] == summaries[1]['summary']['train_loss']
  assert os.path.isdir(tmp_path / 'run' / 'checkpoints' / '3')
  with open(tmp_path / 'run' / 'metrics.jsonl', encoding='utf-8') as f:
    steps = [r['step'] for r in map(json.loads, f) if r['split'] != 'data']  # data: run start
  assert steps == [1, 2, 3]  # one writer: process 0


def test_dead_peer_makes_the_survivor_exit(tmp_path, victim=1):
  """Process `victim` is SIGKILLed at step 3; the other must fail within 60 s, not hang. (With
  victim=0 the coordinator itself dies; that also aborts the survivor in about a second.)"""
  faults = [['--step_delay=0.2'], ['--step_delay=0.2']]
  faults[victim].append('--crash_at=3')
  procs = _two_processes('loop', tmp_path / 'run', faults)
  procs[victim].wait(timeout=300)
  died_at = time.monotonic()
  survivor = procs[1 - victim]
  try:
    survivor.communicate(timeout=60)
  except subprocess.TimeoutExpired:
    survivor.kill()
    pytest.fail('the surviving process still runs 60 s after its peer died')
  assert procs[victim].returncode == -9
  assert survivor.returncode != 0
  assert time.monotonic() - died_at < 60


# Configs, rules and helpers that need no devices.

@pytest.mark.parametrize('overrides, devices, message', [
    (['mesh.data=1', 'mesh.tensor=3'], 3, 'mesh.tensor'),
    (['mesh.data=1', 'mesh.tensor=4'], 4, 'mesh.tensor: 4 does not divide model.num_kv_heads=2'),
    (['mesh.data=1', 'mesh.fsdp=4', 'sharding=fsdp', 'model.d_model=66', 'model.head_dim=16'], 4,
     'mesh.fsdp: 4 does not divide model.d_model=66'),
    (['batch_size=8', 'mesh.data=2', 'mesh.fsdp=4', 'sharding=zero1', 'model.d_model=68',
      'model.head_dim=16'], 8, 'mesh.data x mesh.fsdp: 8 does not divide model.d_model=68'),
    (['mesh.data=2', 'mesh.fsdp=2'], 8, 'mesh: axis sizes multiply to 4'),
    (['mesh.data=-1', 'mesh.fsdp=-1'], 8, 'mesh.fsdp: only one mesh axis may be -1'),
    (['sharding=fsdp'], 4, 'mesh.data: 4 devices on an axis that sharding=fsdp does not use'),
    (['mesh.data=2', 'mesh.pipeline=2'], 4, 'model.scan_layers'),
    (['mesh.data=2', 'mesh.pipeline=2', 'model.scan_layers=True', 'pipeline_microbatches=3'], 4,
     'pipeline_microbatches: 3 does not divide'),
    (['mesh.data=2', 'mesh.pipeline=2', 'model.scan_layers=True', 'pipeline_microbatches=4'], 4,
     'pipeline_microbatches: micro-batches of 1 sequences'),
    (['mesh.data=4', 'mesh.pipeline=2', 'model.scan_layers=True', 'model.num_layers=3'], 8,
     'mesh.pipeline: 2 does not divide model.num_layers=3'),
    (['batch_size=8', 'mesh.data=8', 'mesh.dcn_data=3'], 8, 'mesh.dcn_data'),
    (['sharding_rules=embd=fsdp'], 1, "sharding_rules: rule 'embd' matches no logical axis"),
    (['sharding_rules=embed=fsdq'], 1, "'fsdq' is not a mesh axis"),
])
def test_bad_mesh_config_is_one_line_error_naming_the_key(tiny_config, overrides, devices,
                                                          message):
  config_lib.apply_overrides(tiny_config, overrides)
  with pytest.raises(config_lib.ConfigError) as error:
    mesh_lib.validate(tiny_config, devices)
  assert message in str(error.value) and '\n' not in str(error.value)


def test_good_mesh_configs_validate(tiny_config):
  for overrides, devices in [
      (['batch_size=8', 'mesh.data=2', 'mesh.fsdp=2', 'mesh.tensor=2'], 8),
      (['batch_size=8', 'sharding=fsdp', 'mesh.data=1', 'mesh.fsdp=-1'], 8),
      (['mesh.data=2', 'mesh.pipeline=2', 'model.scan_layers=True', 'pipeline_microbatches=2'], 4),
      (['batch_size=8', 'mesh.data=8', 'mesh.dcn_data=2', 'sharding=dp'], 8)]:
    config = config_lib.load_config('tiny')
    config_lib.apply_overrides(config, overrides)
    mesh_lib.validate(config, devices)


def test_rule_overrides_and_coverage(tiny_config):
  tiny_config.sharding_rules = 'mlp=tensor+fsdp, act_len='
  params_rules, opt_rules = sharding_lib.rules_from_config(tiny_config)
  assert dict(params_rules)['mlp'] == ('tensor', 'fsdp') and dict(opt_rules)['act_len'] is None
  from lmjax.models.transformer import ModelConfig, init_params  # pylint: disable=g-import-not-at-top
  boxed = jax.eval_shape(lambda: init_params(ModelConfig.from_config(tiny_config.model),
                                             jax.random.key(0)))
  sharding_lib.check_rule_coverage(boxed, params_rules)
  without_mlp = tuple((n, a) for n, a in params_rules if n != 'mlp')
  with pytest.raises(config_lib.ConfigError, match=r"no rule covers .*'mlp'"):
    sharding_lib.check_rule_coverage(boxed, without_mlp)
  with pytest.raises(config_lib.ConfigError, match='match no logical axis'):
    sharding_lib.check_rule_coverage(boxed, params_rules + (('no_such_axis', 'fsdp'),))


def test_every_activation_name_has_a_rule(tiny_config, monkeypatch):
  """Records the names the model's activation constraints use; each preset must cover them."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from lmjax.models.transformer import ModelConfig, forward, init_params  # pylint: disable=g-import-not-at-top
  used = set()
  original = nn.with_logical_constraint

  def recording(x, axes, *args, **kwargs):
    used.update(a for a in axes if isinstance(a, str))
    return original(x, axes, *args, **kwargs)

  monkeypatch.setattr(nn, 'with_logical_constraint', recording)
  cfg = ModelConfig.from_config(tiny_config.model)
  params = nn.unbox(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))
  tokens = jax.ShapeDtypeStruct((2, 8), np.int32)
  jax.eval_shape(lambda p, t: forward(cfg, p, t, t, t), params, tokens)
  assert used and used <= set(sharding_lib.ACTIVATION_AXES)
  for preset in sharding_lib.PRESETS:
    covered = {name for name, _ in sharding_lib.preset_rules(preset)[0]}
    assert used <= covered, preset


def test_bubble_fraction():
  assert bubble_fraction(1, 8) == 0.0
  assert bubble_fraction(4, 4) == pytest.approx(3 / 7)
  assert bubble_fraction(2, 16) == pytest.approx(1 / 17)
