"""TPU slices by the names users type, as devices to compile for on any host (libtpu needed).

Accepted names:
  v4-8, v5p-128       Cloud TPU type names: the suffix counts TensorCores, two per chip
                      (v5p-128 is 64 chips); one JAX device per chip (megacore)
  v5e-256, v6e-64     the suffix counts chips; `v5litepod-256` is `v5e-256`
  v5p:4x4x4, v5e:16x16  JAX's own topology form (chips per dimension)
A slice is whole hosts: the smallest v4/v5p slice is 2x2x1 (4 chips), the smallest v5e/v6e one
2x2. `num_slices` > 1 describes a multi-slice run joined over DCN (`mesh.dcn_*`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import itertools
import math
import os
import re
import sys
import tempfile

from lmjax.config import ConfigError

GIB = 2**30

# generation -> (dimensions, TensorCores counted per chip in type names, jax device kind)
_GENERATIONS = {
    'v4': (3, 2, 'TPU v4'),
    'v5p': (3, 2, 'TPU v5'),
    'v5e': (2, 1, 'TPU v5 lite'),
    'v6e': (2, 1, 'TPU v6 lite'),
}
_ALIASES = {'v5litepod': 'v5e', 'v5lite': 'v5e', 'v6lite': 'v6e', 'v5': 'v5p'}

# Usable HBM per chip as XLA:TPU reports it ("exceeds available HBM (X)"), measured with libtpu
# 0.0.42.1 by compiling an oversized program for each generation (../shared/tpu-aot.md).
USABLE_HBM_GIB = {'TPU v4': 30.75, 'TPU v5': 95.74, 'TPU v5 lite': 15.75, 'TPU v6 lite': 31.25}

EXAMPLES = 'v4-8, v5e-256, v5litepod-16, v5p-128, v6e-64 or v5p:4x4x4'


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # as the user typed it
  generation: str  # 'v4', 'v5p', 'v5e', 'v6e'
  shape: tuple[int, ...]  # chips per dimension
  num_slices: int = 1

  @property
  def jax_name(self) -> str:
    return f'{self.generation}:{"x".join(map(str, self.shape))}'

  @property
  def chips(self) -> int:
    return math.prod(self.shape) * self.num_slices

  @property
  def device_kind(self) -> str:
    return _GENERATIONS[self.generation][2]

  @property
  def usable_hbm_bytes(self) -> float:
    return USABLE_HBM_GIB[self.device_kind] * GIB

  def describe(self) -> str:
    slices = f' x {self.num_slices} slices' if self.num_slices > 1 else ''
    return f'{self.name} ({self.jax_name}{slices}, {self.chips} chips)'


def _shapes(generation: str):
  """Slice shapes in order of size: from the one-host slice, the smallest dimension doubles (the
  last of equals first): 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...; 2x2, 2x4, 4x4, 4x8, 8x8, ..."""
  shape = [2, 2, 1] if _GENERATIONS[generation][0] == 3 else [2, 2]
  while True:
    yield tuple(shape)
    smallest = min(shape)
    shape[max(i for i, size in enumerate(shape) if size == smallest)] *= 2


def slice_shape(generation: str, chips: int) -> tuple[int, ...]:
  """The shape of the `generation` slice with `chips` chips."""
  for shape in _shapes(generation):
    if math.prod(shape) >= chips:
      break
  if math.prod(shape) != chips:
    sizes = ', '.join(str(math.prod(s)) for s in itertools.islice(_shapes(generation), 7))
    raise ConfigError(f'--topology: no {generation} slice has {chips} chips (a slice is whole '
                      f'hosts; chip counts: {sizes}, ...)')
  return shape


def parse(name: str, num_slices: int = 1) -> Topology:
  """The slice a user's topology name stands for (see the module docstring)."""
  if num_slices < 1:
    raise ConfigError(f'--num_slices: must be at least 1; got {num_slices}')
  text = name.strip().lower()
  match = re.fullmatch(r'([a-z0-9]+?)(?:pod)?[-:]([0-9x]+)', text)
  generation = match and _ALIASES.get(match.group(1), match.group(1))
  if not match or generation not in _GENERATIONS:
    raise ConfigError(f'--topology: unknown TPU topology {name!r}; expected a name such as '
                      f'{EXAMPLES}')
  size = match.group(2)
  dims, cores_per_chip, _ = _GENERATIONS[generation]
  if ':' in text:
    shape = tuple(int(s) for s in size.split('x') if s)
    if len(shape) != dims or not all(shape):
      raise ConfigError(f'--topology: {name!r}: a {generation} slice has {dims} dimensions, '
                        f'e.g. {generation}:{"x".join(["2"] * dims)}')
  else:
    if 'x' in size:
      raise ConfigError(f'--topology: unknown TPU topology {name!r}; expected a name such as '
                        f'{EXAMPLES}')
    count = int(size)
    if count % cores_per_chip:
      raise ConfigError(f'--topology: {name!r}: the {generation} suffix counts TensorCores, two '
                        'per chip; it must be even')
    shape = slice_shape(generation, count // cores_per_chip)
  return Topology(name=name, generation=generation, shape=shape, num_slices=num_slices)


@contextlib.contextmanager
def _libtpu_start_up_logs_dropped():
  """libtpu, loaded on a host without TPUs, logs (to file descriptor 2, from C++) that it cannot
  find TPU hosts or an accelerator type. Nothing is wrong for compiling ahead of time, so these
  lines are dropped; errors still raise."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as sink:
    os.dup2(sink.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def devices(topology: Topology) -> list:
  """The slice's devices (one per chip), for ahead-of-time compilation on any host."""
  if importlib.util.find_spec('libtpu') is None:
    raise ConfigError(f'--topology={topology.name}: compiling for TPU needs libtpu, which is not '
                      'installed: pip install -e ".[tpu]"')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  options = {'chip_config_name': 'megacore'} if topology.generation == 'v4' else {}
  if topology.num_slices > 1:
    options['num_slices'] = topology.num_slices
  try:
    with _libtpu_start_up_logs_dropped():
      description = topologies.get_topology_desc(topology.jax_name, platform='tpu', **options)
  except Exception as e:  # pylint: disable=broad-except
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError(f'--topology={topology.name}: libtpu cannot describe {topology.jax_name}: '
                      f'{reason}') from None
  found = list(description.devices)
  if len(found) != topology.chips:
    raise ConfigError(f'--topology={topology.name}: libtpu describes {len(found)} devices for '
                      f'{topology.jax_name}, expected {topology.chips} (one per chip)')
  return found
