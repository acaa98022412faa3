"""Peak FLOP/s per device, for MFU, and where the figure came from.

The device is the target's (the mesh's, see `lmjax.parallel.target`), not the host's backend.
Accelerators: the vendor's dense bfloat16 peak for the device kind. CPU: measured (a jitted
float32 matmul chain at the size where XLA reaches its best) and cached per machine under the
lmjax cache dir. A measurement taken while other work runs comes out low, so the cache keeps the
best figure ever measured and a new measurement never lowers it; set LMJAX_REMEASURE_PEAK=1 to
measure again (on an idle machine), or LMJAX_PEAK_FLOPS to override.
"""

from __future__ import annotations

import json
import os
import platform
import time

import jax
import jax.numpy as jnp

from lmjax.parallel import target
from lmjax.paths import cache_dir

# device_kind substring -> dense peak FLOP/s per device (bfloat16)
_ACCELERATOR_PEAKS = (
    ('v6', 918e12), ('v5p', 459e12), ('v5 lite', 197e12), ('v5e', 197e12), ('v4', 275e12),
    ('v3', 123e12), ('h200', 989e12), ('h100', 989e12), ('a100', 312e12), ('l4', 121e12),
    ('b200', 2250e12),
)


def peak_flops(mesh=None) -> tuple[float, str]:
  """(peak FLOP/s of one device of `mesh` (default: the current mesh, else this host), where the
  figure came from)."""
  if os.environ.get('LMJAX_PEAK_FLOPS'):
    return float(os.environ['LMJAX_PEAK_FLOPS']), 'LMJAX_PEAK_FLOPS'
  if target.platform(mesh) != 'cpu':
    kind = target.device_kind(mesh)
    for key, peak in _ACCELERATOR_PEAKS:
      if key in kind.lower():
        return peak, f'{kind}: dense bfloat16 peak (spec sheet)'
    return float('nan'), f'{kind}: unknown peak'
  return _measured_cpu_peak()


def peak_flops_per_device(mesh=None) -> float:
  return peak_flops(mesh)[0]


def _measured_cpu_peak() -> tuple[float, str]:
  key = f'{platform.node()}-{platform.processor() or platform.machine()}-{os.cpu_count()}'
  path = cache_dir('peak_flops.json')
  try:
    with open(path, encoding='utf-8') as f:
      cached = json.load(f)
  except (OSError, ValueError):
    cached = {}
  if key not in cached or os.environ.get('LMJAX_REMEASURE_PEAK'):
    cached[key] = max(measure_matmul_flops(), cached.get(key, 0.0))  # never lowered by load
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump(cached, f)
    os.replace(tmp, path)
  return cached[key], f'CPU float32 matmul, best measured on this machine (cache {path})'


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
