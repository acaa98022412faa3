"""Sharding as data: named presets of logical-axis rules, their validation, and state shardings.

A preset (config key `sharding`) gives two rule lists over the same logical names:
  params rules: parameters and activations (the `nn.logical_axis_rules` context of the step);
  opt rules:    the optimizer state (differs from the params rules only for `zero1`).

  preset      mesh axes it may use     params                      optimizer state
  dp          data                     replicated                  replicated
  zero1       data, fsdp               replicated                  'embed' over data x fsdp
  fsdp        fsdp                     'embed' over fsdp (ZeRO-3)  as params
  fsdp_tp     fsdp, tensor             fsdp + heads/kv_heads/mlp/vocab over tensor (Megatron)
  dp_fsdp_tp  data, fsdp, tensor       as fsdp_tp, replicated over data
  ep          data, fsdp, tensor,      as dp_fsdp_tp; MoE experts over `expert`, and the batch over
              expert                   data x fsdp x expert (expert parallelism, docs/moe.md)

Every preset splits the batch over data x fsdp and stacked layers over `pipeline` (every preset
may use `pipeline`). With `mesh.context` > 1 (every preset may use it) the sequence is split too:
'act_len' over `context`, and the merged (batch x length) tokens 'act_tokens' over the batch axes
then `context` (`lmjax.parallel.ring_attention`, docs/parallelism.md). `sharding_rules` overrides
single names: 'embed=fsdp,mlp=tensor,act_len=' (`+` joins mesh axes, an empty value replicates).
Everything is checked before compiling: a parameter axis name no rule covers, a rule naming no
known axis, a mesh axis >1 the preset does not use, or a mesh axis that does not divide the
dimension it splits is a one-line ConfigError.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec

from lmjax.config import MESH_AXES, ConfigError, mesh_shape, rows_per_step

BATCH_AXES = ('data', 'fsdp')
EP_BATCH_AXES = ('data', 'fsdp', 'expert')
PARAM_AXES = ('vocab', 'embed', 'heads', 'kv_heads', 'head_dim', 'mlp', 'norm', 'layers',
              'experts', 'expert_mlp')
ACTIVATION_AXES = ('act_batch', 'act_tokens', 'act_len', 'act_embed', 'act_heads', 'act_kv_heads',
                   'act_mlp', 'act_vocab')
PRESETS = ('dp', 'zero1', 'fsdp', 'fsdp_tp', 'dp_fsdp_tp', 'ep')
DEFAULT_PRESET = 'dp_fsdp_tp'

_PRESET_AXES = {
    'dp': ('data', 'pipeline', 'context'),
    'zero1': ('data', 'fsdp', 'pipeline', 'context'),
    'fsdp': ('fsdp', 'pipeline', 'context'),
    'fsdp_tp': ('fsdp', 'tensor', 'pipeline', 'context'),
    'dp_fsdp_tp': ('data', 'fsdp', 'tensor', 'pipeline', 'context'),
    'ep': ('data', 'fsdp', 'tensor', 'pipeline', 'expert', 'context'),
}

_SHARED = {'act_batch': BATCH_AXES, 'act_tokens': BATCH_AXES, 'act_len': None, 'act_embed': None,
           'head_dim': None, 'norm': None, 'layers': 'pipeline', 'experts': None}
_NO_TENSOR = {'act_heads': None, 'act_kv_heads': None, 'act_mlp': None, 'act_vocab': None,
              'vocab': None, 'heads': None, 'kv_heads': None, 'mlp': None, 'expert_mlp': None}
_TENSOR = {'act_heads': 'tensor', 'act_kv_heads': 'tensor', 'act_mlp': 'tensor',
           'act_vocab': 'tensor', 'vocab': 'tensor', 'heads': 'tensor', 'kv_heads': 'tensor',
           'mlp': 'tensor', 'expert_mlp': 'tensor'}

# logical name -> (config key, function of the config giving the dimension's size)
_PARAM_SIZES = {
    'vocab': ('model.vocab_size', lambda c: c.model.vocab_size),
    'embed': ('model.d_model', lambda c: c.model.d_model),
    'heads': ('model.num_heads', lambda c: c.model.num_heads),
    'kv_heads': ('model.num_kv_heads', lambda c: c.model.num_kv_heads),
    'head_dim': ('model.head_dim',
                 lambda c: c.model.head_dim or c.model.d_model // c.model.num_heads),
    'mlp': ('model.mlp_dim', lambda c: c.model.mlp_dim),
    'norm': ('model.d_model', lambda c: c.model.d_model),
    'layers': ('model.num_layers', lambda c: c.model.num_layers),
    'experts': ('model.moe.num_experts', lambda c: c.model.moe.num_experts),
    'expert_mlp': ('model.moe.expert_mlp_dim',
                   lambda c: c.model.moe.expert_mlp_dim or c.model.mlp_dim),
    'act_len': ('seq_len', lambda c: c.seq_len),
    'act_embed': ('model.d_model', lambda c: c.model.d_model),
    'act_heads': ('model.num_heads', lambda c: c.model.num_heads),
    'act_kv_heads': ('model.num_kv_heads', lambda c: c.model.num_kv_heads),
    'act_mlp': ('model.mlp_dim', lambda c: c.model.mlp_dim),
    'act_vocab': ('model.vocab_size', lambda c: c.model.vocab_size),
}


def preset_rules(preset: str) -> tuple[tuple, tuple]:
  """(params rules, optimizer-state rules) of a preset, as tuples of (logical name, mesh axes)."""
  if preset not in PRESETS:
    raise ConfigError(f'sharding: must be one of {", ".join(PRESETS)}; got {preset!r}')
  params = dict(_SHARED,
                **(_TENSOR if preset in ('fsdp_tp', 'dp_fsdp_tp', 'ep') else _NO_TENSOR))
  params['embed'] = 'fsdp' if preset in ('fsdp', 'fsdp_tp', 'dp_fsdp_tp', 'ep') else None
  if preset == 'ep':
    params.update(experts='expert', act_batch=EP_BATCH_AXES, act_tokens=EP_BATCH_AXES)
  opt = dict(params)
  if preset == 'zero1':
    opt['embed'] = BATCH_AXES
  return tuple(params.items()), tuple(opt.items())


def parse_rule_overrides(text: str) -> dict:
  """'embed=fsdp,mlp=tensor+fsdp,act_len=' -> {'embed': 'fsdp', 'mlp': ('tensor', 'fsdp'),
  'act_len': None}."""
  overrides = {}
  for item in filter(None, (part.strip() for part in text.split(','))):
    if '=' not in item:
      raise ConfigError(f'sharding_rules: {item!r} must look like NAME=AXIS[+AXIS...]')
    name, value = (s.strip() for s in item.split('=', 1))
    if name not in PARAM_AXES + ACTIVATION_AXES:
      raise ConfigError(f'sharding_rules: rule {name!r} matches no logical axis (known: '
                        f'{", ".join(PARAM_AXES + ACTIVATION_AXES)})')
    axes = tuple(filter(None, value.split('+')))
    for axis in axes:
      if axis not in MESH_AXES:
        raise ConfigError(f'sharding_rules: {name}={value}: {axis!r} is not a mesh axis '
                          f'({", ".join(MESH_AXES)})')
    overrides[name] = None if not axes else axes[0] if len(axes) == 1 else axes
  return overrides


def rules_from_config(config) -> tuple[tuple, tuple]:
  """The preset's rules with `sharding_rules` applied to both lists."""
  params, opt = preset_rules(config.sharding)
  if config.mesh.get('context', 1) != 1:  # the sequence split over `context` (ring attention)
    params, opt = (tuple((name, _with_context(name, axes)) for name, axes in rules)
                   for rules in (params, opt))
  overrides = parse_rule_overrides(config.sharding_rules)
  apply = lambda rules: tuple((name, overrides.get(name, axes)) for name, axes in rules)
  return apply(params), apply(opt)


def _with_context(name: str, axes):
  """A rule with the sequence split over `context`: 'act_len' alone, 'act_tokens' after the batch
  axes (a (batch x length) row index splits batch-major, then over the sequence)."""
  if name == 'act_len':
    return 'context'
  return (*_axes_of(axes), 'context') if name == 'act_tokens' else axes


def _axes_of(axes) -> tuple:
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def _check_divides(name, axes, size, key, sizes, what):
  split = [axis for axis in _axes_of(axes) if sizes[axis] > 1]
  shards = 1
  for axis in split:
    shards *= sizes[axis]
  if shards > 1 and size % shards:
    where = ' x '.join(f'mesh.{axis}' for axis in split)
    raise ConfigError(f'{where}: {shards} does not divide {key}={size} ({what} axis {name!r} is '
                      f'split over {where})')


def validate_parallelism(config, num_devices: int) -> dict[str, int]:
  """All mesh/sharding/pipeline checks that need no tracing; returns the mesh sizes."""
  sizes = mesh_shape(config, num_devices)
  for axis in MESH_AXES:
    dcn = config.mesh[f'dcn_{axis}']
    if dcn < 1 or sizes[axis] % dcn:
      raise ConfigError(f'mesh.dcn_{axis}: {dcn} must be positive and divide mesh.{axis}='
                        f'{sizes[axis]}')
  params_rules, opt_rules = rules_from_config(config)
  allowed = _PRESET_AXES[config.sharding]
  for axis in MESH_AXES:
    if sizes[axis] > 1 and axis not in allowed:
      raise ConfigError(f'mesh.{axis}: {sizes[axis]} devices on an axis that sharding='
                        f'{config.sharding} does not use (its axes: {", ".join(allowed)})')
  rows_key, step_rows = rows_per_step(config)
  accum_rows = step_rows // config.grad_accum_steps
  stages, micro = sizes['pipeline'], config.pipeline_microbatches
  if micro < 1:
    raise ConfigError(f'pipeline_microbatches: must be positive; got {micro}')
  if stages > 1 and not config.model.scan_layers:
    raise ConfigError(f'model.scan_layers: mesh.pipeline={stages} needs scan-stacked layers '
                      '(set model.scan_layers=True)')
  if stages > 1 and accum_rows % micro:
    raise ConfigError(f'pipeline_microbatches: {micro} does not divide the micro-batch of '
                      f'{accum_rows} sequences ({rows_key} / grad_accum_steps)')
  rows = accum_rows // micro if stages > 1 else accum_rows
  for rules, what in ((params_rules, 'parameter/activation'), (opt_rules, 'optimizer-state')):
    for name, axes in rules:
      if name in ('act_batch', 'act_tokens'):
        shards = 1
        for axis in _axes_of(axes):
          shards *= 1 if axis == 'context' else sizes[axis]  # context splits the length
        if rows % shards:
          key = 'pipeline_microbatches' if stages > 1 else rows_key
          raise ConfigError(f'{key}: micro-batches of {rows} sequences do not divide over the '
                            f'{shards} devices of {" x ".join(_axes_of(axes))} ({name!r})')
      elif name == 'layers' and not config.model.scan_layers:
        continue
      else:
        key, size_of = _PARAM_SIZES[name]
        _check_divides(name, axes, size_of(config), key, sizes, what)
  return sizes


def check_rule_coverage(boxed_params, rules) -> None:
  """Every logical name a parameter uses has a rule; every rule names a known logical axis."""
  specs = nn.get_partition_spec(boxed_params)
  used = set()
  for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec)):
    used.update(name for name in spec if isinstance(name, str))
  ruled = {name for name, _ in rules}
  missing = sorted(used - ruled)
  if missing:
    raise ConfigError(f'sharding: no rule covers the parameter axis name(s) {missing}')
  unknown = sorted(ruled - set(PARAM_AXES) - set(ACTIVATION_AXES))
  if unknown:
    raise ConfigError(f'sharding_rules: rule(s) {unknown} match no logical axis')


def shards_of(spec: PartitionSpec, sizes: dict) -> int:
  """How many pieces a PartitionSpec cuts an array into on a mesh of `sizes`."""
  count = 1
  for entry in spec:
    for axis in _axes_of(entry):
      count *= sizes[axis]
  return count
