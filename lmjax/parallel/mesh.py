"""The device mesh and the logical-axis rules that map model axis names onto it.

Every parameter and activation names its axes logically ('embed', 'heads', 'act_batch', ...);
`LOGICAL_RULES` decides which mesh axes each name is split over. With every mesh axis but `data`
of size 1 this is plain data parallelism; `fsdp` shards parameters and optimizer state, `tensor`
splits heads and the MLP.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lmjax.config import mesh_shape

MESH_AXES = ('data', 'fsdp', 'tensor', 'pipeline')
BATCH_AXES = ('data', 'fsdp')

# logical axis name -> mesh axes (None = replicated)
LOGICAL_RULES = (
    # activations
    ('act_batch', BATCH_AXES),
    ('act_tokens', BATCH_AXES),
    ('act_len', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_kv_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
    # parameters
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('mlp', 'tensor'),
    ('norm', None),
    ('layers', None),
)


def make_mesh(config, devices=None) -> Mesh:
  """A mesh with the config's axis sizes (`-1` fills the rest), Auto axis types so that GSPMD
  propagates shardings from the constraints we give."""
  devices = jax.devices() if devices is None else devices
  sizes = mesh_shape(config, len(devices))
  shape = tuple(sizes[axis] for axis in MESH_AXES)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_shardings(boxed_tree, mesh: Mesh, rules=LOGICAL_RULES):
  """NamedShardings for a tree of logically partitioned (boxed) values."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches of shape (batch, length) split over the data-like axes."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
