"""The devices a program is compiled for.

Decisions that depend on the hardware (compute dtype, attention kernel, kernel backend, the MFU
peak) read the target from the mesh the step is traced under (`jax.set_mesh`), never from
`jax.default_backend()`: `lmjax compile` traces on a CPU host for TPU devices, and the host's
backend is then "cpu" while the program is for a TPU.
"""

from __future__ import annotations

import jax


def _mesh_device(mesh=None):
  """(platform, device_kind) of `mesh`, else of the mesh set by `jax.set_mesh`, else None."""
  if mesh is not None:
    device = mesh.devices.flat[0]
    return device.platform, device.device_kind
  abstract = jax.sharding.get_abstract_mesh()
  if abstract is not None and not abstract.empty:
    device = getattr(abstract, 'abstract_device', None)
    if device is not None and device.platform is not None:
      return device.platform, device.device_kind or ''
  return None


def platform(mesh=None) -> str:
  """'cpu', 'gpu' or 'tpu' for the target devices (`mesh`, the current mesh, or the host's)."""
  found = _mesh_device(mesh)
  name = found[0] if found else jax.default_backend()
  return 'gpu' if name in ('cuda', 'rocm') else name


def device_kind(mesh=None) -> str:
  """The target devices' kind, e.g. 'TPU v5 lite', 'NVIDIA H100 80GB HBM3', 'cpu'."""
  found = _mesh_device(mesh)
  return found[1] if found else jax.devices()[0].device_kind


def device_count() -> int:
  """Devices of the current mesh (`jax.set_mesh`), else this host's: what a config's `-1` mesh
  axis fills."""
  abstract = jax.sharding.get_abstract_mesh()
  if abstract is not None and not abstract.empty:
    return abstract.size
  return jax.device_count()


def axis_size(name: str) -> int:
  """The size of mesh axis `name` in the current mesh (`jax.set_mesh`); 1 when there is no such
  axis or it is manual already (inside a `shard_map` over it)."""
  abstract = jax.sharding.get_abstract_mesh()
  if abstract is None or abstract.empty or name not in abstract.axis_names:
    return 1
  return 1 if name in abstract.manual_axes else dict(abstract.shape)[name]
