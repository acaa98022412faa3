"""Multi-device checks, run by tests/test_parallel.py in a subprocess with virtual CPU devices.

  python tests/parallel_worker.py CHECK [CHECK ...]   (XLA_FLAGS must give 8 host devices)

Prints one JSON object (the results of every check) as its last stdout line. Each check compares
the sharded train step with the same step on one device (devices[:1]) of the same process.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import flax.linen as nn
import jax
import numpy as np

from lmjax import config as config_lib
from lmjax import tasks
from lmjax.parallel import mesh as mesh_lib
from lmjax.train import step as step_lib
from lmjax.train.loop import global_batch
from lmjax.train.state import build_state

PRESET_MESHES = {  # preset -> (data, fsdp, tensor)
    'dp': (8, 1, 1),
    'zero1': (2, 4, 1),
    'fsdp': (1, 8, 1),
    'fsdp_tp': (1, 4, 2),
    'dp_fsdp_tp': (2, 2, 2),
}


def small_config(**overrides):
  config = config_lib.load_config('tiny')
  config.steps = 4
  config.batch_size = 8
  config.seq_len = 16
  config.optimizer.warmup_steps = 1
  config.optimizer.schedule = 'constant'
  for key, value in overrides.items():
    config_lib.apply_overrides(config, [f'{key}={value}'])
  return config


def batches(config, count, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    length = config.seq_len
    tokens = rng.integers(0, config.model.vocab_size, (config.batch_size, length + 1))
    out.append({'inputs': tokens[:, :-1].astype(np.int32),
                'targets': tokens[:, 1:].astype(np.int32),
                'positions': np.tile(np.arange(length, dtype=np.int32), (config.batch_size, 1)),
                'segment_ids': np.ones((config.batch_size, length), np.int32),
                'weights': (rng.random((config.batch_size, length)) > 0.1).astype(np.float32)})
  return out


def run_steps(config, host_batches, devices, grads_only=False, step_seconds=None):
  """Trains on `host_batches` under the config's mesh over `devices`: (losses, final state);
  appends each step's wall time after the first (compiling) one to `step_seconds` if given."""
  mesh_lib.validate(config, len(devices))
  mesh = mesh_lib.make_mesh(config, devices)
  task = tasks.from_config(config)
  tx, schedule = task.optimizer(config)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  to_device = lambda batch: global_batch(batch, batch_sharding, mesh.shape['context'])
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(mesh_lib.rules(config)[0])):
    create, abstract = build_state(task, tx, config.seed, mesh, mesh_lib.rules(config))
    state = create()
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    if grads_only:
      fn = jax.jit(lambda p, b: step_lib.accumulated_grads(task, p, b),
                   in_shardings=(shardings.params, batch_sharding))
      return fn(state.params, to_device(host_batches[0])), state
    fn = jax.jit(lambda s, b: step_lib.train_step(task, tx, schedule, s, b),
                 in_shardings=(shardings, batch_sharding),
                 out_shardings=(shardings, mesh_lib.replicated(mesh)))
    losses = []
    for i, batch in enumerate(host_batches):
      start = time.perf_counter()
      state, metrics = fn(state, to_device(batch))
      losses.append(float(metrics['loss']))
      if step_seconds is not None and i:
        step_seconds.append(time.perf_counter() - start)
  return losses, state


def max_relative_error(tree, reference):
  errors = jax.tree.map(
      lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b))) /
                         (np.max(np.abs(np.asarray(b))) + 1e-30)), tree, reference)
  return max(jax.tree.leaves(errors))


def spec_of(tree, *path):
  """The trimmed PartitionSpec (trailing Nones dropped) of the leaf at a key path."""
  for key in path:
    tree = tree[key]
  spec = list(tree.sharding.spec)
  while spec and spec[-1] is None:
    spec.pop()
  return [list(s) if isinstance(s, tuple) else s for s in spec]


def opt_spec(opt_state, *path):
  """Spec of Adam's first moment `mu` for the parameter at `path`."""
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    names = [getattr(k, 'key', getattr(k, 'name', None)) for k in key_path]
    if 'mu' in names and names[-len(path):] == list(path):
      spec = list(leaf.sharding.spec)
      while spec and spec[-1] is None:
        spec.pop()
      return [list(s) if isinstance(s, tuple) else s for s in spec]
  raise KeyError(path)


def check_presets():
  results = {}
  host_batches = batches(small_config(), 2)
  ref_losses, ref_state = run_steps(small_config(**{'mesh.data': 1, 'sharding': 'dp'}),
                                    host_batches, jax.devices()[:1])
  for preset, (data, fsdp, tensor) in PRESET_MESHES.items():
    config = small_config(**{'sharding': preset, 'mesh.data': data, 'mesh.fsdp': fsdp,
                             'mesh.tensor': tensor})
    losses, state = run_steps(config, host_batches, jax.devices())
    results[preset] = {
        'losses': losses, 'ref_losses': ref_losses,
        'param_error': max_relative_error(state.params, ref_state.params),
        'q_spec': spec_of(state.params, 'layers_0', 'attn', 'q'),
        'down_spec': spec_of(state.params, 'layers_0', 'mlp', 'down'),
        'embed_spec': spec_of(state.params, 'embed'),
        'q_mu_spec': opt_spec(state.opt_state, 'layers_0', 'attn', 'q'),
    }
  return results


def check_pipeline():
  results = {}
  base = {'model.scan_layers': True, 'model.num_layers': 4, 'model.remat': 'full'}
  host_batches = batches(small_config(**base), 2)
  ref_config = small_config(**base, **{'mesh.data': 1, 'sharding': 'dp'})
  ref_losses, ref_state = run_steps(ref_config, host_batches, jax.devices()[:1])
  (ref_grads, _), _ = run_steps(ref_config, host_batches, jax.devices()[:1], grads_only=True)
  cases = {
      'dp_pp2_m2': {'sharding': 'dp', 'mesh.data': 4, 'mesh.pipeline': 2,
                    'pipeline_microbatches': 2},
      'fsdp_pp4_m4': {'sharding': 'fsdp', 'mesh.data': 1, 'mesh.fsdp': 2, 'mesh.pipeline': 4,
                      'pipeline_microbatches': 4},
      'fsdp_tp_pp2_m4': {'sharding': 'fsdp_tp', 'mesh.data': 1, 'mesh.fsdp': 2,
                         'mesh.tensor': 2, 'mesh.pipeline': 2, 'pipeline_microbatches': 4},
  }
  for name, overrides in cases.items():
    config = small_config(**base, **overrides)
    losses, state = run_steps(config, host_batches, jax.devices())
    (grads, _), _ = run_steps(config, host_batches, jax.devices(), grads_only=True)
    results[name] = {
        'losses': losses, 'ref_losses': ref_losses,
        'param_error': max_relative_error(state.params, ref_state.params),
        'grad_error': max_relative_error(grads, ref_grads),
        'layer_q_spec': spec_of(state.params, 'layers', 'attn', 'q'),
    }
  return results


def check_accum():
  host_batches = batches(small_config(), 2)
  ref_losses, ref_state = run_steps(small_config(**{'mesh.data': 1, 'sharding': 'dp'}),
                                    host_batches, jax.devices()[:1])
  config = small_config(**{'sharding': 'fsdp_tp', 'mesh.data': 1, 'mesh.fsdp': 4,
                           'mesh.tensor': 2, 'grad_accum_steps': 2})
  losses, state = run_steps(config, host_batches, jax.devices())
  return {'losses': losses, 'ref_losses': ref_losses,
          'param_error': max_relative_error(state.params, ref_state.params)}


def loop_config(**overrides):
  return small_config(**{'eval_batches': 0, 'log_every': 1, 'checkpoint_every': 2,
                         'optimizer.warmup_steps': 0, 'mesh.data': 1, **overrides})


def train_losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    records = [json.loads(line) for line in f]
  return {r['step']: r['loss'] for r in records if r['split'] == 'train'}


def check_reshard():
  """Uninterrupted fsdp=8 run of 4 steps; a 2-step fsdp=8 run resumed under fsdp=4 x tensor=2.
  Leaves `<root>/saved` (the 2-step run) for the one-device resume in the test process."""
  from lmjax.train.loop import train  # pylint: disable=g-import-not-at-top
  root = os.environ['PARALLEL_WORKDIR']
  fsdp8 = {'sharding': 'fsdp', 'mesh.fsdp': 8}
  train(loop_config(steps=4, **fsdp8), os.path.join(root, 'full'))
  train(loop_config(steps=2, **fsdp8), os.path.join(root, 'saved'))
  shutil.copytree(os.path.join(root, 'saved'), os.path.join(root, 'resumed_tp'))
  train(loop_config(steps=4, **{'sharding': 'fsdp_tp', 'mesh.fsdp': 4, 'mesh.tensor': 2}),
        os.path.join(root, 'resumed_tp'))
  return {name: train_losses(os.path.join(root, name)) for name in ('full', 'resumed_tp')}


# The layouts: five steps each against one device.
LAYOUTS = {
    'data8': {'sharding': 'dp', 'mesh.data': 8},
    'fsdp8': {'sharding': 'fsdp', 'mesh.data': 1, 'mesh.fsdp': 8},
    'fsdp4_tensor2': {'sharding': 'fsdp_tp', 'mesh.data': 1, 'mesh.fsdp': 4, 'mesh.tensor': 2},
    'data2_fsdp2_tensor2': {'sharding': 'dp_fsdp_tp', 'mesh.data': 2, 'mesh.fsdp': 2,
                            'mesh.tensor': 2},
    'pipeline2_fsdp4': {'sharding': 'fsdp', 'mesh.data': 1, 'mesh.fsdp': 4, 'mesh.pipeline': 2,
                        'pipeline_microbatches': 2},
    'pipeline4_data2_m8': {'sharding': 'dp', 'mesh.data': 2, 'mesh.pipeline': 4,
                           'pipeline_microbatches': 8},
}


def check_layouts():
  """Losses, parameter error, step time and per-device state bytes of every layout."""
  base = {'model.scan_layers': True, 'model.num_layers': 4, 'batch_size': 16, 'steps': 5}
  host_batches = batches(small_config(**base), 5)
  ref_losses, ref_state = run_steps(small_config(**base, **{'mesh.data': 1, 'sharding': 'dp'}),
                                    host_batches, jax.devices()[:1])
  results = {}
  for name, overrides in LAYOUTS.items():
    config = small_config(**base, **overrides)
    seconds = []
    losses, state = run_steps(config, host_batches, jax.devices(), step_seconds=seconds)
    results[name] = {'losses': losses, 'ref_losses': ref_losses,
                     'param_error': max_relative_error(state.params, ref_state.params),
                     'seconds_per_step': float(np.median(seconds)),
                     'state_bytes_per_device': _bytes_on_device_0(state),
                     'state_bytes_total': _bytes_total(state)}
  return results


def _bytes_on_device_0(state):
  device = jax.devices()[0]
  return sum(shard.data.nbytes for leaf in jax.tree.leaves((state.params, state.opt_state))
             for shard in leaf.addressable_shards if shard.device == device)


def _bytes_total(state):
  return sum(leaf.nbytes for leaf in jax.tree.leaves((state.params, state.opt_state)))


def check_fsdp_memory():
  """Per-device bytes of params + optimizer state under fsdp=8, for a model whose replicated norm
  scales are small next to its matrices (as in any real model)."""
  config = small_config(**{'sharding': 'fsdp', 'mesh.data': 1, 'mesh.fsdp': 8,
                           'model.d_model': 256, 'model.mlp_dim': 704})
  mesh = mesh_lib.make_mesh(config, jax.devices())
  task = tasks.from_config(config)
  tx, _ = task.optimizer(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(mesh_lib.rules(config)[0])):
    create, _ = build_state(task, tx, config.seed, mesh, mesh_lib.rules(config))
    state = create()
  return {'per_device': _bytes_on_device_0(state), 'total': _bytes_total(state)}


def main(argv):
  results = {}
  checks = {'presets': check_presets, 'pipeline': check_pipeline, 'accum': check_accum,
            'reshard': check_reshard, 'layouts': check_layouts, 'fsdp_memory': check_fsdp_memory}
  for name in argv:
    results[name] = checks[name]()
  print(json.dumps(results))


if __name__ == '__main__':
  main(sys.argv[1:])
