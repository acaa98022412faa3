"""Peak FLOP/s per device, for MFU.

Accelerators: the vendor's dense peak for the compute dtype. CPU: measured once (a jitted float32
matmul at the size where XLA reaches its best) and cached per machine under the lmjax cache dir;
measure on an idle machine, or set LMJAX_PEAK_FLOPS to override.
"""

from __future__ import annotations

import json
import os
import platform
import time

import jax
import jax.numpy as jnp

from lmjax.paths import cache_dir

# device_kind substring -> dense peak FLOP/s per device (bfloat16)
_ACCELERATOR_PEAKS = (
    ('v6', 918e12), ('v5p', 459e12), ('v5 lite', 197e12), ('v5e', 197e12), ('v4', 275e12),
    ('v3', 123e12), ('h200', 989e12), ('h100', 989e12), ('a100', 312e12), ('l4', 121e12),
    ('b200', 2250e12),
)


def peak_flops_per_device() -> float:
  if os.environ.get('LMJAX_PEAK_FLOPS'):
    return float(os.environ['LMJAX_PEAK_FLOPS'])
  device = jax.devices()[0]
  if device.platform != 'cpu':
    kind = device.device_kind.lower()
    for key, peak in _ACCELERATOR_PEAKS:
      if key in kind:
        return peak
    return float('nan')
  return _measured_cpu_peak()


def _measured_cpu_peak() -> float:
  key = f'{platform.node()}-{platform.processor() or platform.machine()}-{os.cpu_count()}'
  path = cache_dir('peak_flops.json')
  try:
    with open(path, encoding='utf-8') as f:
      cached = json.load(f)
  except (OSError, ValueError):
    cached = {}
  if key not in cached:
    cached[key] = measure_matmul_flops()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump(cached, f)
    os.replace(tmp, path)
  return cached[key]


def measure_matmul_flops(n: int = 1024, repeats: int = 8) -> float:
  """Best float32 matmul throughput of a chain of `repeats` (n, n) products, in FLOP/s."""
  @jax.jit
  def chain(a, b):
    for _ in range(repeats):
      a = (a @ b) * 0.5
    return a

  a = jnp.ones((n, n), jnp.float32) / n
  b = jnp.ones((n, n), jnp.float32)
  chain(a, b).block_until_ready()
  best = float('inf')
  for _ in range(5):
    start = time.perf_counter()
    chain(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 * repeats / best
