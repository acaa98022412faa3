"""Worker for tests/test_flash_attention.py: `attention(impl='pallas')` under a 4-device CPU mesh
(fsdp=2 x tensor=2, the logical rules of fsdp_tp) against `impl='xla'`, values and gradients.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=4. Prints one JSON line: the largest
absolute differences per case.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh

from lmjax.models import attention


def main():
  mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ('fsdp', 'tensor'),
              axis_types=(AxisType.Auto,) * 2)
  rules = [('act_batch', 'fsdp'), ('act_heads', 'tensor'), ('act_kv_heads', 'tensor')]
  seg = jnp.asarray([[1] * 40 + [2] * 24, [1] * 64, [1] * 10 + [2] * 50 + [0] * 4,
                     [3] * 64], jnp.int32)
  # Positions restart with each document (what the packer writes).
  starts = np.maximum.accumulate(
      np.where(np.diff(np.asarray(seg), prepend=-1, axis=1) != 0, np.arange(64), 0), axis=1)
  pos = jnp.asarray(np.arange(64) - starts, jnp.int32)
  diffs = {}
  for name, kv_heads in (('gqa', 2), ('mqa_repeated', 1)):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (4, 64, 4, 16))
    k = jax.random.normal(keys[1], (4, 64, kv_heads, 16))
    v = jax.random.normal(keys[2], (4, 64, kv_heads, 16))

    def loss(q, k, v, impl):
      out = attention.attention(q, k, v, segment_ids_BL=seg, positions_BL=pos, causal=True,
                                sliding_window=24, impl=impl)
      return jnp.sum(out * jnp.cos(out)), out

    grads = lambda impl: jax.jit(jax.grad(lambda *a: loss(*a, impl), argnums=(0, 1, 2),
                                          has_aux=True))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      lowered = grads('pallas').lower(q, k, v)
      got = lowered.compile()(q, k, v)
      want = grads('xla')(q, k, v)
    diffs[name] = float(max(jnp.max(jnp.abs(a - b)) for a, b in zip(
        jax.tree.leaves(got), jax.tree.leaves(want))))
    diffs[name + '_manual'] = 'sdy.manual_computation' in lowered.as_text()
  print(json.dumps(diffs))


if __name__ == '__main__':
  main()
