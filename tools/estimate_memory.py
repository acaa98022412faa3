"""Per-device memory of a training config on a mesh: an analytic estimate next to XLA's own.

  python tools/estimate_memory.py --config=1b --devices=8 \
      [--config.sharding=fsdp --config.mesh.data=1 --config.mesh.fsdp=-1 ...] \
      [--topology=v5e:2x2] [--no-compile]

Analytic: params, gradients and optimizer state from the exact shapes and the preset's shardings
(`jax.eval_shape`, nothing allocated); activations from a per-layer count of what the backward
pass keeps under `model.remat` (approximate). XLA: the train step is compiled ahead of time for
`--devices` virtual CPU devices (or, with `--topology`, for a TPU topology via
`jax.experimental.topologies`, which needs libtpu) and `memory_analysis()` is printed. On CPU the
compute dtype `auto` means float32; pass `--config.model.dtype=bfloat16` to see accelerator sizes.
"""

from __future__ import annotations

import argparse
import os
import sys


def _parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', required=True, help='config file or preset name')
  parser.add_argument('--devices', type=int, default=8, help='devices in the mesh')
  parser.add_argument('--topology', default='', help='TPU topology to compile for, e.g. v5e:2x2')
  parser.add_argument('--no-compile', action='store_true', help='analytic estimate only')
  args, rest = parser.parse_known_args(argv)
  overrides = []
  for item in rest:
    if not item.startswith('--config.'):
      parser.error(f'unknown argument {item!r}')
    overrides.append(item[len('--config.'):])
  return args, overrides


if __name__ == '__main__':
  _ARGS, _OVERRIDES = _parse(sys.argv[1:])
  if not _ARGS.topology:  # virtual CPU devices: must be set before jax starts
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={_ARGS.devices}')
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# pylint: disable=g-import-not-at-top,wrong-import-position
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmjax import config as config_lib
from lmjax import tasks
from lmjax.models.transformer import ModelConfig
from lmjax.parallel import mesh as mesh_lib
from lmjax.parallel import sharding as sharding_lib
from lmjax.train import state as state_lib
from lmjax.train import step as step_lib

MIB = 2**20


def _bytes(leaf) -> int:
  return int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize


def _per_device(tree, specs, sizes) -> float:
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  leaves = jax.tree.leaves(tree)
  spec_leaves = jax.tree.leaves(specs, is_leaf=is_spec)
  return float(sum(_bytes(x) / sharding_lib.shards_of(s, sizes)
                   for x, s in zip(leaves, spec_leaves)))


def abstract_state(config):
  task = tasks.from_config(config)
  tx, schedule = task.optimizer(config)
  return state_lib.abstract_state(task, tx, config.seed), tx, schedule, task


def activation_bytes(config, sizes) -> float:
  """Approximate bytes the backward pass keeps per device (remat-aware), plus the logits."""
  cfg = ModelConfig.from_config(config.model)
  itemsize = jnp.dtype(cfg.dtype).itemsize
  rows = config.batch_size // config.grad_accum_steps // (sizes['data'] * sizes['fsdp'])
  stages, micro = sizes['pipeline'], config.pipeline_microbatches
  tokens = rows * config.seq_len
  t = sizes['tensor']
  d, f, dh = cfg.d_model, cfg.mlp_dim // t, cfg.head_dim
  h, k = cfg.num_heads // t, max(cfg.num_kv_heads // t, 1)
  # per token and layer: norm outputs, q/k/v, attention output, residuals, gate/up/product
  saved_all = 2 * d + (h + 2 * k) * dh + h * dh + 2 * d + 3 * f
  scores = h * config.seq_len * 4 * 2  # float32 scores and probabilities (xla attention)
  saved_dots = (h + 2 * k) * dh + d + 2 * f + d
  full_layer = tokens * (saved_all * itemsize + (scores if cfg.attention == 'xla' else 0))
  layers_here = cfg.num_layers // stages
  if cfg.remat == 'none':
    kept = layers_here * full_layer
  elif cfg.remat in ('dots', 'dots_saveable'):
    kept = layers_here * tokens * (saved_dots + d) * itemsize + full_layer
  else:  # full: the layer inputs, and one layer recomputed at a time; minimal: + attention out
    saved = d + (h * dh if cfg.remat == 'minimal' else 0)
    kept = layers_here * tokens * saved * itemsize + full_layer
  if stages > 1:  # GPipe keeps every in-flight micro-batch's stage activations
    kept = kept * (micro + stages - 1) / micro
  logits = tokens * cfg.vocab_size / t * 4 * 3  # float32 logits, log-softmax, gradient
  return float(kept + logits)


def analytic(config, num_devices):
  sizes = config_lib.mesh_shape(config, num_devices)
  boxed, _, _, task = abstract_state(config)
  specs = state_lib.state_specs(task, boxed, *sharding_lib.rules_from_config(config))
  params = jax.tree.map(lambda x: getattr(x, 'value', x), boxed.params,
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))
  param_bytes = _per_device(params, specs.params, sizes)
  # gradients take the params' sharding (zero1: all-reduced, i.e. replicated)
  estimate = {
      'params': param_bytes,
      'grads': param_bytes * (config.grad_accum_steps > 1 and 2 or 1),
      'optimizer': _per_device(boxed.opt_state, specs.opt_state, sizes),
      'activations': activation_bytes(config, sizes),
  }
  estimate['total'] = sum(estimate.values())
  estimate['param_count'] = float(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)))
  return sizes, estimate


def compiled_memory(config, devices):
  """XLA's memory analysis of the sharded train step, compiled for `devices` (no allocation)."""
  mesh = mesh_lib.make_mesh(config, devices)
  boxed, tx, schedule, task = abstract_state(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(mesh_lib.rules(config)[0])):
    shardings = state_lib.state_shardings(task, boxed, mesh, *mesh_lib.rules(config))
    state = jax.tree.map(lambda x: getattr(x, 'value', x), boxed,
                         is_leaf=lambda x: isinstance(x, nn.Partitioned))
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         state, shardings)
    batch_sharding = mesh_lib.batch_sharding(mesh)
    shape = (config.batch_size, config.seq_len)
    batch = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding) for name, dtype in
             [('inputs', jnp.int32), ('targets', jnp.int32), ('positions', jnp.int32),
              ('segment_ids', jnp.int32), ('weights', jnp.float32)]}
    step = jax.jit(lambda s, b: step_lib.train_step(task, tx, schedule, s, b),
                   out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=0)
    analysis = step.lower(state, batch).compile().memory_analysis()
  fields = ('argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes',
            'temp_size_in_bytes', 'generated_code_size_in_bytes')
  result = {name: float(getattr(analysis, name, 0) or 0) for name in fields}
  result['peak_estimate'] = (result['argument_size_in_bytes'] + result['output_size_in_bytes'] -
                             result['alias_size_in_bytes'] + result['temp_size_in_bytes'])
  return result


def topology_devices(name: str):
  """Devices of a TPU topology for ahead-of-time compilation, e.g. 'v5e:2x2'."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    return topologies.get_topology_desc(name, platform='tpu').devices
  except Exception as e:  # pylint: disable=broad-except
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise SystemExit(f'--topology={name}: cannot describe this TPU topology here ({reason}); it '
                     'needs libtpu '
                     '(pip install jax[tpu]) and a valid name such as v5e:2x2') from None


def main(args, overrides):
  try:
    config = config_lib.load_config(args.config)
    config_lib.apply_overrides(config, overrides)
    devices = topology_devices(args.topology) if args.topology else None
    num_devices = len(devices) if devices is not None else args.devices
    mesh_lib.validate(config, num_devices)
  except config_lib.ConfigError as e:
    raise SystemExit(f'error: {e}') from None
  sizes, estimate = analytic(config, num_devices)
  mesh_text = ' x '.join(f'{axis}={size}' for axis, size in sizes.items())
  print(f'{args.config}: {estimate["param_count"] / 1e6:.1f}M params, sharding={config.sharding}, '
        f'mesh {mesh_text}, batch {config.batch_size} x {config.seq_len}, '
        f'remat={config.model.remat}')
  print('analytic, per device:')
  for name in ('params', 'grads', 'optimizer', 'activations', 'total'):
    print(f'  {name:<12} {estimate[name] / MIB:10.1f} MiB')
  if args.no_compile:
    return estimate, None
  if devices is None:
    devices = jax.devices()[:num_devices]
    if len(devices) < num_devices:
      raise SystemExit(f'--devices={num_devices}: only {len(devices)} devices available')
  xla = compiled_memory(config, devices)
  print(f'XLA memory_analysis, per device ({devices[0].platform}):')
  for name, value in xla.items():
    print(f'  {name:<30} {value / MIB:10.1f} MiB')
  return estimate, xla


if __name__ == '__main__':
  main(_ARGS, _OVERRIDES)
