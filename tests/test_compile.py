"""`lmjax compile`: topology names, the fit verdict, target-aware decisions, and real TPU compiles
through libtpu on this CPU host (the `[tpu]` extra), checked against independent figures."""

import os
import pickle
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import perf
from lmjax.config import ConfigError, apply_overrides, load_config
from lmjax.models.transformer import ModelConfig
from lmjax.parallel import topology as topology_lib
from lmjax.train import aot

POST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
GIB = 2**30


@pytest.mark.parametrize('name, jax_name, chips', [
    ('v4-8', 'v4:2x2x1', 4), ('v4-32', 'v4:2x2x4', 16), ('v5p-128', 'v5p:4x4x4', 64),
    ('v5p-2048', 'v5p:8x8x16', 1024), ('v5e-8', 'v5e:2x4', 8), ('v5e-256', 'v5e:16x16', 256),
    ('v5litepod-256', 'v5e:16x16', 256), ('v6e-64', 'v6e:8x8', 64), ('v5p:4x4x4', 'v5p:4x4x4', 64),
    ('V5E:2x2', 'v5e:2x2', 4)])
def test_topology_names_as_users_type_them(name, jax_name, chips):
  topology = topology_lib.parse(name)
  assert (topology.jax_name, topology.chips) == (jax_name, chips)
  assert topology_lib.parse(name, num_slices=2).chips == 2 * chips


@pytest.mark.parametrize('name, message', [
    ('v9-8', "unknown TPU topology 'v9-8'; expected a name such as v4-8"),
    ('v5e-3', 'no v5e slice has 3 chips (a slice is whole hosts; chip counts: 4, 8, 16,'),
    ('v5p-6', 'no v5p slice has 3 chips'),
    ('v5p-7', 'suffix counts TensorCores, two per chip'),
    ('v5p:2x2', 'a v5p slice has 3 dimensions, e.g. v5p:2x2x2'),
])
def test_bad_topology_is_a_one_line_error_naming_the_flag(name, message):
  with pytest.raises(ConfigError, match='^--topology: ') as error:
    topology_lib.parse(name)
  assert message in str(error.value) and '\n' not in str(error.value)


def test_missing_libtpu_names_the_extra(monkeypatch):
  monkeypatch.setattr(topology_lib.importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(ConfigError, match=r'needs libtpu.*pip install -e "\.\[tpu\]"'):
    topology_lib.devices(topology_lib.parse('v5e-8'))


def test_collectives_are_counted_and_sized_from_hlo_text():
  hlo = '\n'.join([
      '  %all-gather.1 = bf16[64,32]{1,0:T(8,128)(2,1)} all-gather(%p), dimensions={0}',
      '  %ar = (f32[128]{0}, f32[16,4]{1,0}) all-reduce(%a, %b), to_apply=%add',
      '  %ags = (bf16[16,384]{1,0}, bf16[64,384]{1,0}) all-gather-start(%x), dimensions={0}',
      '  %agd = bf16[64,384]{1,0} all-gather-done(%ags)',
      '  %cp = s32[2,8]{1,0} collective-permute(%y), source_target_pairs={{0,1}}',
      '  %fusion = f32[8]{0} fusion(%all-gather.1), kind=kLoop',
  ])
  assert aot.collectives(hlo) == {
      'all-gather': (2, 64 * 32 * 2 + 64 * 384 * 2),  # a start counts its result, done nothing
      'all-reduce': (1, (128 + 64) * 4),  # a combined all-reduce moves all its operands
      'collective-permute': (1, 16 * 4)}


def test_out_of_memory_message_gives_the_verdict():
  message = ('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO '
             'temporaries (20.02G) exceeds available HBM (15.75G).')
  needed, available = aot.parse_out_of_memory(message)
  assert (needed, available) == (20.02 * GIB, 15.75 * GIB)
  report = aot.Report('v5e-8', 'TPU v5 lite', {'fsdp': 8}, available, [], needed, {}, 0.0,
                      (0, 0), {}, 0.0)
  assert not report.fits
  assert report.verdict() == ('does not fit: needs 20.02 GiB of 15.75 per chip (try: mesh.fsdp, '
                              'model.remat=full, batch_size)')


def test_cpu_peak_is_never_lowered_by_a_measurement_under_load(monkeypatch, tmp_path):
  monkeypatch.delenv('LMJAX_PEAK_FLOPS', raising=False)
  monkeypatch.setenv('LMJAX_CACHE_DIR', str(tmp_path))
  measured = iter([200e9, 120e9, 280e9])
  monkeypatch.setattr(perf, 'measure_matmul_flops', lambda: next(measured))
  assert perf.peak_flops()[0] == 200e9
  assert perf.peak_flops()[0] == 200e9  # cached: not measured again
  monkeypatch.setenv('LMJAX_REMEASURE_PEAK', '1')
  assert perf.peak_flops()[0] == 200e9  # measured 120e9 under load: the best is kept
  peak, source = perf.peak_flops()
  assert peak == 280e9 and source.startswith('CPU float32 matmul, best measured')


# --- compiled for TPU through libtpu ---------------------------------------------------------


@pytest.fixture(scope='module')
def v5e_mesh():
  devices = topology_lib.devices(topology_lib.parse('v5e:2x2'))
  return jax.sharding.Mesh(np.array(devices), ('fsdp',))


def test_target_decides_dtype_and_mfu_peak(v5e_mesh, monkeypatch):
  monkeypatch.delenv('LMJAX_PEAK_FLOPS', raising=False)
  model = load_config('tiny').model
  assert ModelConfig.from_config(model).dtype == jnp.float32  # this host: CPU
  with jax.set_mesh(v5e_mesh):
    assert ModelConfig.from_config(model).dtype == jnp.bfloat16
    assert perf.peak_flops() == (197e12, 'TPU v5 lite: dense bfloat16 peak (spec sheet)')
  assert perf.peak_flops(v5e_mesh)[0] == 197e12


def _tiny(preset='tiny', *overrides):
  config = load_config(preset)
  apply_overrides(config, ['batch_size=8', 'seq_len=128', *overrides])
  return config


def _state_and_batch_bytes(report):
  """Per-chip bytes of the step's arguments, computed from the analytic estimate's shardings."""
  return report.estimate['params'] + report.estimate['optimizer']


def _assert_state_sharded(report, step):
  """The state per chip is at least the analytic estimate (XLA:TPU pads tiny arrays to its
  (8, 128) tiles, so not exactly it; the 7b and 1b tests below compare exactly) and well under
  the whole unsharded state (params and two Adam moments in float32)."""
  whole = 12 * report.estimate['param_count']
  assert _state_and_batch_bytes(report) <= step.aliased < 0.7 * whole, (step, report.estimate)


LAYOUTS = {
    'fsdp': ['sharding=fsdp', 'mesh.data=1', 'mesh.fsdp=-1'],
    'fsdp_x_tensor': ['sharding=fsdp_tp', 'mesh.data=1', 'mesh.fsdp=-1', 'mesh.tensor=2'],
    'pipeline_x_fsdp': ['sharding=fsdp', 'mesh.data=1', 'mesh.fsdp=-1', 'mesh.pipeline=2',
                        'model.scan_layers=true', 'pipeline_microbatches=2'],
    'dp_x_fsdp_x_tensor': ['sharding=dp_fsdp_tp', 'mesh.data=2', 'mesh.fsdp=-1', 'mesh.tensor=2'],
}
# the collectives each layout must put in the train step
EXPECTED = {'fsdp': {'all-gather'}, 'fsdp_x_tensor': {'all-gather', 'all-reduce'},
            'pipeline_x_fsdp': {'all-gather', 'collective-permute'},
            'dp_x_fsdp_x_tensor': {'all-gather', 'all-reduce'}}


@pytest.mark.parametrize('topology, layout', [
    ('v5e:2x2', 'fsdp'), ('v5e:2x2', 'fsdp_x_tensor'), ('v5e:2x2', 'pipeline_x_fsdp'),
    ('v5p:2x2x1', 'fsdp'), ('v5p:2x2x1', 'fsdp_x_tensor'), ('v5p:2x2x1', 'pipeline_x_fsdp'),
    ('v5e:2x4', 'dp_x_fsdp_x_tensor'), ('v5p:2x2x2', 'dp_x_fsdp_x_tensor')])
def test_tiny_compiles_for_tpu_in_every_layout(topology, layout):
  target = topology_lib.parse(topology)
  config = _tiny('tiny', *LAYOUTS[layout])
  report = aot.compile_run(config, topology_lib.devices(target), target=target.describe(),
                           usable=target.usable_hbm_bytes)
  step = report.programs[-1]
  assert step.name == 'train_step' and report.fits
  # XLA's arguments are the state (donated: aliased to the outputs) and the batch shards: five
  # (8, 128) arrays of 4 bytes over the data x fsdp chips (128 columns: no TPU tile padding).
  batch_shards = report.mesh.get('data', 1) * report.mesh.get('fsdp', 1)
  assert step.arguments - step.aliased == 5 * 8 * 128 * 4 / batch_shards
  _assert_state_sharded(report, step)
  assert EXPECTED[layout] <= set(report.collectives), report.collectives
  # compiled in the target's compute dtype: bf16 matmuls (auto dtype on TPU)
  assert 'bf16[' in report.executables['train_step'].as_text()


# batch arrays each task's step reads (jit drops unused inputs): SFT the five token-row arrays,
# DPO both halves of each pair, the reward model no targets or weights (it scores the last token)
@pytest.mark.parametrize('preset, arrays', [('sft_tiny', 5), ('dpo_tiny', 10), ('reward_tiny', 6)])
def test_post_training_tasks_compile_for_tpu(preset, arrays, tmp_path):
  target = topology_lib.parse('v5e:2x2')
  config = _tiny(os.path.join(POST, f'{preset}.py'), *LAYOUTS['fsdp'])
  report = aot.compile_run(config, topology_lib.devices(target), usable=target.usable_hbm_bytes)
  step = report.programs[-1]
  pairs = 2 if preset != 'sft_tiny' else 1  # chosen and rejected rows
  assert step.arguments - step.aliased == arrays * 8 * 128 * 4 / 4
  _assert_state_sharded(report, step)
  assert report.tokens_per_step[0] == pairs * 8 * 128
  path = tmp_path / 'step.bin'
  aot.save_executables(report, str(path))
  with open(path, 'rb') as f:
    saved = pickle.load(f)
  assert list(saved) == ['train_step'] and len(saved['train_step'][0]) > 10_000


def test_ppo_compiles_its_rollout_and_scoring_programs():
  target = topology_lib.parse('v5e:2x2')
  config = _tiny(os.path.join(POST, 'ppo_tiny.py'), *LAYOUTS['fsdp'])
  report = aot.compile_run(config, topology_lib.devices(target), usable=target.usable_hbm_bytes)
  assert [p.name for p in report.programs] == ['rollout', 'score', 'train_step'] and report.fits
  # rollouts of seq_len tokens (prompt + new): updated ppo_epochs times; the rollout itself, the
  # policy, reference and value scoring passes run forward only (no reward model in this config)
  post = config.post
  rows = post.rollout_batch * config.seq_len
  assert report.tokens_per_step == (post.ppo_epochs * rows, 3 * rows)


def test_multi_slice_compiles_with_data_over_dcn():
  target = topology_lib.parse('v5e:2x2', num_slices=2)
  devices = topology_lib.devices(target)
  assert sorted({d.slice_index for d in devices}) == [0, 1]
  config = _tiny('tiny', 'sharding=dp_fsdp_tp', 'mesh.data=2', 'mesh.dcn_data=2', 'mesh.fsdp=-1')
  report = aot.compile_run(config, devices, target=target.describe(),
                           usable=target.usable_hbm_bytes)
  assert report.mesh == {'data': 2, 'fsdp': 4} and report.fits
  assert target.describe() == 'v5e:2x2 (v5e:2x2 x 2 slices, 8 chips)'


def test_cpu_devices_compile_with_exact_argument_bytes():
  config = _tiny('tiny')
  report = aot.compile_run(config, jax.devices()[:1])
  step = report.programs[-1]
  assert step.arguments - step.aliased == 5 * 8 * 128 * 4
  assert 0 <= step.aliased - _state_and_batch_bytes(report) < 1024
  assert report.estimate['params'] == 4 * report.estimate['param_count']  # float32, one device
  assert step.temporaries > report.estimate['params']  # the gradients at least
  assert report.collectives == {} and report.usable is None


def test_analytic_estimate_shards_over_fsdp():
  one = _tiny('tiny')
  eight = _tiny('tiny', *LAYOUTS['fsdp'])
  from lmjax import tasks  # pylint: disable=g-import-not-at-top
  from lmjax.train import memory, state  # pylint: disable=g-import-not-at-top
  estimates = []
  for config, devices in ((one, 1), (eight, 8)):
    task = tasks.from_config(config)
    boxed = state.abstract_state(task, task.optimizer(config)[0])
    estimates.append(memory.estimate(config, devices, task, boxed))
  assert estimates[1]['params'] == pytest.approx(estimates[0]['params'] / 8, rel=0.05)
  assert estimates[1]['optimizer'] == pytest.approx(2 * estimates[1]['params'], rel=0.01)


# --- the CLI on real presets (each compile takes about a minute here) ---------------------------


def _compile(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', ALLOW_MULTIPLE_LIBTPU_LOAD='1')
  return subprocess.run([sys.executable, '-m', 'lmjax.cli', 'compile', *args], env=env,
                        capture_output=True, text=True, timeout=900, check=False)


FSDP_ALL = ['--config.sharding=fsdp', '--config.mesh.data=1', '--config.mesh.fsdp=-1',
            '--config.batch_size=256', '--config.seq_len=2048', '--config.model.remat=full']


def _verdict(result) -> str:
  return result.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize('preset, topology, usable', [('7b', 'v5p-128', 95.74),
                                                      ('1b', 'v5e-256', 15.75)])
def test_presets_fit_their_pods(preset, topology, usable):
  result = _compile(f'--config={preset}', f'--topology={topology}', *FSDP_ALL)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  verdict = _verdict(result)
  assert verdict.startswith('fits: ') and verdict.endswith(f'of {usable:.2f} GiB per chip')
  used = float(verdict.split()[1])
  assert 0 < used < usable
  # XLA's arguments per chip (the state, one sequence's batch aside) equal the analytic params +
  # optimizer state per chip, computed from the sharding rules
  step = next(line for line in result.stdout.splitlines() if 'train_step' in line).split()
  analytic = next(line for line in result.stdout.splitlines() if line.startswith('analytic'))
  unit = analytic.split('(')[1].split(')')[0]
  figures = dict(re.findall(r'(\w+) ([\d.]+)', analytic.split(':', 1)[1]))
  value, arguments_unit = step[step.index('arguments') + 1:step.index('arguments') + 3]
  to_gib = lambda x, u: float(x) / (1024 if u == 'MiB' else 1)
  assert to_gib(value, arguments_unit) == pytest.approx(
      to_gib(figures['params'], unit) + to_gib(figures['optimizer'], unit), abs=0.02)
  assert 'all-reduce' in result.stdout  # gradients (fsdp: reduce-scattered or all-reduced)


def test_7b_on_eight_v5e_chips_does_not_fit():
  result = _compile('--config=7b', '--topology=v5e-8', *FSDP_ALL)
  assert result.returncode == 3, result.stdout[-2000:] + result.stderr[-3000:]
  verdict = _verdict(result)
  assert verdict.startswith('does not fit: needs ') and 'of 15.75 per chip (try: ' in verdict
  assert float(verdict.split()[4]) > 15.75


@pytest.mark.parametrize('args, message', [
    (['--topology=v5e-3'], 'lmjax compile: config error: --topology: no v5e slice has 3 chips'),
    (['--topology=v5e-8', '--config.mesh.fsdp=3', '--config.mesh.data=1'],
     'lmjax compile: config error: mesh: axis sizes multiply to 3, but there are 8 devices'),
])
def test_compile_bad_input_is_one_line(args, message):
  result = _compile('--config=tiny', *args)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(message), result.stderr[-2000:]
