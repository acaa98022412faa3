"""The device mesh and the logical-axis rules that map model axis names onto it.

Every parameter and activation names its axes logically ('embed', 'heads', 'act_batch', ...);
the rules of the `sharding` preset (see `sharding.py`) decide which mesh axes each name is split
over. Mesh axes: `data` (batch split, params replicated), `fsdp` (batch split, params and optimizer
state sharded), `tensor` (heads and MLP split), `pipeline` (layers split into stages), `expert`
(MoE experts split, tokens exchanged with all-to-all; `lmjax.models.moe`), `context` (the sequence
split, batches in zigzag order; ring or all-gather attention, `lmjax.parallel.ring_attention`).

`mesh.<axis>` is the axis' total size; `mesh.dcn_<axis>` says how many of those are spread over
slower links (several TPU slices, or several hosts of a GPU cluster). The device order comes from
`mesh_utils.create_device_mesh` (one slice / host) or `create_hybrid_device_mesh` (ICI within a
granule, DCN across), so the fast-collective axes land on neighbouring devices.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lmjax import config as config_lib
from lmjax.config import ConfigError, mesh_shape
from lmjax.parallel import sharding as sharding_lib
from lmjax.parallel.sharding import BATCH_AXES, MESH_AXES, validate_parallelism  # noqa: F401


def device_grid(config, devices) -> np.ndarray:
  """Devices arranged as the mesh: MESH_AXES (data, fsdp, tensor, pipeline, expert, context)."""
  sizes = mesh_shape(config, len(devices))
  shape = tuple(sizes[axis] for axis in MESH_AXES)
  dcn = tuple(config.mesh.get(f'dcn_{axis}', 1) for axis in MESH_AXES)
  if any(d != 1 for d in dcn):
    for axis, size, d in zip(MESH_AXES, shape, dcn):
      if d < 1 or size % d:
        raise ConfigError(f'mesh.dcn_{axis}: {d} must be positive and divide mesh.{axis}={size}')
    ici = tuple(size // d for size, d in zip(shape, dcn))
    by_process = not hasattr(devices[0], 'slice_index') or devices[0].platform != 'tpu'
    try:
      return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                                  process_is_granule=by_process)
    except (ValueError, AssertionError) as e:
      raise ConfigError(f'mesh.dcn_*: cannot lay out ICI {ici} x DCN {dcn} over these devices: '
                        f'{e}') from None
  try:
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    return np.asarray(devices).reshape(shape)


def make_mesh(config, devices=None) -> Mesh:
  """A mesh with the config's axis sizes (`-1` fills the rest), Auto axis types so that GSPMD
  propagates shardings from the constraints we give."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(device_grid(config, devices), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))


def rules(config) -> tuple[tuple, tuple]:
  """(params-and-activations rules, optimizer-state rules) of the config's `sharding` preset."""
  return sharding_lib.rules_from_config(config)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches of shape (batch, length) split over the data-like axes, and the (zigzag-ordered)
  length over `context` when that axis is > 1."""
  if dict(mesh.shape).get('context', 1) > 1:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, 'context'))
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def validate(config, num_devices: int) -> None:
  """The config's checks (`config.validate`), then its mesh against `num_devices` devices."""
  config_lib.validate(config)
  sizes = mesh_shape(config, num_devices)
  batch_shards = sizes['data'] * sizes['fsdp']
  key, rows = config_lib.rows_per_step(config)
  micro_batch = rows // config.grad_accum_steps
  if micro_batch % batch_shards:
    raise ConfigError(f'{key}: the micro-batch of {micro_batch} sequences does not divide '
                      f'over mesh.data x mesh.fsdp = {batch_shards} devices')
  m = config.model
  if m.num_kv_heads % sizes['tensor'] and m.num_heads % sizes['tensor']:
    raise ConfigError(f'mesh.tensor: {sizes["tensor"]} divides neither model.num_heads nor '
                      'model.num_kv_heads')
  if m.num_layers % sizes['pipeline']:
    raise ConfigError(f'mesh.pipeline: {sizes["pipeline"]} does not divide '
                      f'model.num_layers={m.num_layers}')
  if config.peft.method in ('prompt', 'p_tuning') and sizes['pipeline'] > 1:
    raise ConfigError(f'peft.method: {config.peft.method} (virtual tokens through every layer) is '
                      f'not supported with pipeline stages (mesh.pipeline={sizes["pipeline"]})')
  if m.moe.num_experts and sizes['pipeline'] > 1:
    raise ConfigError('model.moe.num_experts: MoE layers do not run under pipeline stages yet '
                      f'(mesh.pipeline={sizes["pipeline"]})')
  if sizes['expert'] > 1 and not m.moe.num_experts:
    raise ConfigError(f'mesh.expert: {sizes["expert"]} devices for experts, but the model is dense '
                      '(model.moe.num_experts=0)')
  if m.logits_chunk and sizes['pipeline'] > 1:
    raise ConfigError('model.logits_chunk: not supported with pipeline stages (mesh.pipeline='
                      f'{sizes["pipeline"]}); set it to 0')
  _validate_context(config, sizes)
  validate_parallelism(config, num_devices)  # presets, DCN factors, divisibility, pipeline


def _validate_context(config, sizes) -> None:
  """What context parallelism (mesh.context > 1) supports in this stage."""
  context, m = sizes['context'], config.model
  if context == 1:
    return
  if config.seq_len % (2 * context):
    raise ConfigError(f'seq_len: {config.seq_len} is not divisible by 2 x mesh.context = '
                      f'{2 * context} (the zigzag order cuts the sequence into 2 x context chunks)')
  if m.attention == 'cudnn':
    raise ConfigError(f'model.attention: cudnn does not run under mesh.context={context}; use xla '
                      'or pallas')
  if sizes['pipeline'] > 1:
    raise ConfigError(f'mesh.context: {context} is not supported with pipeline stages '
                      f'(mesh.pipeline={sizes["pipeline"]})')
  if config.task not in ('pretrain', 'sft'):
    raise ConfigError(f'mesh.context: {context} is supported for task=pretrain and sft, not '
                      f'task={config.task}')
  if m.moe.num_experts:
    raise ConfigError(f'mesh.context: {context} is not supported with MoE layers '
                      f'(model.moe.num_experts={m.moe.num_experts})')
  if config.peft.method in config_lib.PEFT_IN_MODEL:
    raise ConfigError(f'peft.method: {config.peft.method} (virtual tokens or prefixes) is not '
                      f'supported with mesh.context={context}')
