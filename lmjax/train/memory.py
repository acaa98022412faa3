"""An analytic estimate of per-device training memory, to read beside XLA's compiled figure.

Params, gradients and optimizer state come from the exact shapes and the preset's shardings
(`jax.eval_shape`, nothing allocated). Activations come from a per-layer count of what the
backward pass keeps under `model.remat` (approximate: XLA fuses, reuses and rematerialises on its
own). `lmjax compile` prints this next to XLA's memory analysis for the same step.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmjax import config as config_lib
from lmjax.models.transformer import ModelConfig
from lmjax.parallel import sharding as sharding_lib
from lmjax.train import state as state_lib


def _bytes(leaf) -> int:
  return int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize


def _per_device(tree, specs, sizes) -> float:
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  leaves = jax.tree.leaves(tree)
  spec_leaves = jax.tree.leaves(specs, is_leaf=is_spec)
  return float(sum(_bytes(x) / sharding_lib.shards_of(s, sizes)
                   for x, s in zip(leaves, spec_leaves)))


def activation_bytes(config, sizes, rows: int, seq_len: int) -> float:
  """Approximate bytes the backward pass keeps per device for `rows` x `seq_len` global tokens
  per (micro-)step (remat-aware), plus the float32 logits, log-softmax and their gradient."""
  cfg = ModelConfig.from_config(config.model)
  itemsize = jnp.dtype(cfg.dtype).itemsize
  rows = rows // config.grad_accum_steps // (sizes['data'] * sizes['fsdp'])
  stages, micro = sizes['pipeline'], config.pipeline_microbatches
  tokens = rows * seq_len
  t = sizes['tensor']
  d, f, dh = cfg.d_model, cfg.mlp_dim // t, cfg.head_dim
  h, k = cfg.num_heads // t, max(cfg.num_kv_heads // t, 1)
  # per token and layer: norm outputs, q/k/v, attention output, residuals, gate/up/product
  saved_all = 2 * d + (h + 2 * k) * dh + h * dh + 2 * d + 3 * f
  scores = h * seq_len * 4 * 2  # float32 scores and probabilities (xla attention)
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
  logits = tokens * cfg.vocab_size / t * 4 * 3
  return float(kept + logits)


def estimate(config, num_devices: int, task, boxed_state) -> dict:
  """Per-device bytes: params, grads, optimizer, activations, total; and the param count.
  `boxed_state` is `lmjax.train.state.abstract_state(task, tx)`."""
  sizes = config_lib.mesh_shape(config, num_devices)
  specs = state_lib.state_specs(task, boxed_state, *sharding_lib.rules_from_config(config))
  params = jax.tree.map(lambda x: getattr(x, 'value', x), boxed_state.params,
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))
  param_bytes = _per_device(params, specs.params, sizes)
  rows, seq_len = next(iter(task.batch_spec(config).values())).shape
  result = {
      'params': param_bytes,
      # gradients take the params' sharding; accumulation keeps a second (running) copy
      'grads': param_bytes * (2 if config.grad_accum_steps > 1 else 1),
      'optimizer': _per_device(boxed_state.opt_state, specs.opt_state, sizes),
      'activations': activation_bytes(config, sizes, rows, seq_len),
  }
  result['total'] = sum(result.values())
  result['param_count'] = float(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)))
  return result
