"""Attention dispatch: one entry point for every implementation.

Masking is defined by segment ids and positions, never by padding tricks:
a query attends a key when both carry the same segment id, the key's position is not after the
query's (causal), and, with a sliding window, the key is less than `sliding_window` positions back.
Segment id 0 marks padding (and empty KV-cache slots). A query with no visible key outputs zeros.

`pallas` runs lmjax's flash kernels (`lmjax.kernels.flash_attention`) on the target's backend
(Mosaic on TPU, Triton on GPU, the interpreter on CPU). Under a mesh the kernel runs inside
`jax.shard_map`, manual over every mesh axis that is not manual already (pipeline stages run Blocks
under their own `shard_map`): batch and heads are split as the logical-axis rules split
'act_batch' and 'act_heads', everything else is whole on each device.

When the current mesh splits the sequence (`context` axis > 1), self-attention runs as ring or
all-gather attention (`model.context_parallel`, `lmjax.parallel.ring_attention`) over that axis.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from lmjax.parallel import ring_attention, target

IMPLEMENTATIONS = ('xla', 'pallas', 'cudnn')


def attention_mask(q_segment_ids_BL, kv_segment_ids_BS, q_positions_BL, kv_positions_BS, *,
                   causal=True, sliding_window=0):
  """Boolean (B, L, S) mask of the keys each query may attend."""
  mask_BLS = q_segment_ids_BL[:, :, None] == kv_segment_ids_BS[:, None, :]
  offset_BLS = q_positions_BL[:, :, None] - kv_positions_BS[:, None, :]
  if causal:
    mask_BLS &= offset_BLS >= 0
  if sliding_window:
    mask_BLS &= offset_BLS < sliding_window
  return mask_BLS


def xla_attention(q_BLHD, k_BSKD, v_BSKD, mask_BLS):
  """Reference attention: einsum + float32 softmax; GQA without repeating K/V.

  Heads move in front once, so both einsums are plain batched matmuls over (batch, kv head) with
  the query group folded into the rows (M = G * L): the backward pass then needs no transposes of
  the (L, S) score matrices.
  """
  batch, q_len, num_heads, head_dim = q_BLHD.shape
  kv_len, num_kv_heads = k_BSKD.shape[1], k_BSKD.shape[2]
  group = num_heads // num_kv_heads
  q_BKMD = q_BLHD.reshape(batch, q_len, num_kv_heads, group, head_dim).transpose(
      0, 2, 3, 1, 4).reshape(batch, num_kv_heads, group * q_len, head_dim)
  k_BKSD = k_BSKD.transpose(0, 2, 1, 3)
  v_BKSD = v_BSKD.transpose(0, 2, 1, 3)
  scores_BKMS = jnp.einsum('bkmd,bksd->bkms', q_BKMD, k_BKSD,
                           preferred_element_type=jnp.float32) * head_dim**-0.5
  scores_BKGLS = scores_BKMS.reshape(batch, num_kv_heads, group, q_len, kv_len)
  mask_B11LS = mask_BLS[:, None, None, :, :]
  scores_BKGLS = jnp.where(mask_B11LS, scores_BKGLS, jnp.finfo(jnp.float32).min)
  probs_BKGLS = jax.nn.softmax(scores_BKGLS, axis=-1)
  probs_BKGLS = jnp.where(mask_B11LS, probs_BKGLS, 0.0).astype(v_BSKD.dtype)
  probs_BKMS = probs_BKGLS.reshape(batch, num_kv_heads, group * q_len, kv_len)
  out_BKMD = jnp.einsum('bkms,bksd->bkmd', probs_BKMS, v_BKSD)
  out_BKGLD = out_BKMD.reshape(batch, num_kv_heads, group, q_len, head_dim)
  return out_BKGLD.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, num_heads, head_dim)


def attention(q_BLHD, k_BSKD, v_BSKD, *, segment_ids_BL, positions_BL, kv_segment_ids_BS=None,
              kv_positions_BS=None, causal=True, sliding_window=0, impl='xla', prefix_k_BPKD=None,
              prefix_v_BPKD=None, context_parallel='ring'):
  """Dispatches to `impl`.

  Without `kv_segment_ids_BS`/`kv_positions_BS` the keys are the queries' own tokens (training,
  scoring): fused kernels may run. Against a KV cache (decoding) the `xla` path always runs: one
  query per step is memory-bound and gains nothing from tiling.

  `prefix_k_BPKD`/`prefix_v_BPKD` (PEFT prefixes, see `lmjax.peft.hooks`) are extra keys in front
  of the others, visible to every query that is not padding (segment id > 0) whatever its segment
  or position, so each packed document sees the whole prefix; the `xla` path runs.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f'model.attention: unknown implementation {impl!r}')
  if kv_segment_ids_BS is None:
    if prefix_k_BPKD is None and target.axis_size(ring_attention.AXIS) > 1:
      return _context_attention(q_BLHD, k_BSKD, v_BSKD, segment_ids_BL, positions_BL, causal,
                                sliding_window, impl, context_parallel)
    if impl == 'pallas' and prefix_k_BPKD is None:
      return _pallas_attention(q_BLHD, k_BSKD, v_BSKD, segment_ids_BL, causal, sliding_window)
    if impl == 'cudnn' and prefix_k_BPKD is None:
      return _cudnn_attention(q_BLHD, k_BSKD, v_BSKD, segment_ids_BL, causal, sliding_window)
    kv_segment_ids_BS, kv_positions_BS = segment_ids_BL, positions_BL
  mask_BLS = attention_mask(segment_ids_BL, kv_segment_ids_BS, positions_BL, kv_positions_BS,
                            causal=causal, sliding_window=sliding_window)
  if prefix_k_BPKD is not None:
    batch, q_len = segment_ids_BL.shape
    num_prefix = prefix_k_BPKD.shape[1]
    prefix_BLP = jnp.broadcast_to((segment_ids_BL > 0)[:, :, None], (batch, q_len, num_prefix))
    mask_BLS = jnp.concatenate([prefix_BLP, mask_BLS], axis=-1)
    k_BSKD = jnp.concatenate([prefix_k_BPKD.astype(k_BSKD.dtype), k_BSKD], axis=1)
    v_BSKD = jnp.concatenate([prefix_v_BPKD.astype(v_BSKD.dtype), v_BSKD], axis=1)
  return xla_attention(q_BLHD, k_BSKD, v_BSKD, mask_BLS)


def check_available(impl: str, mesh=None) -> None:
  """Raises a clear one-line error when `impl` cannot run on the target devices (`mesh`, else the
  mesh set by `jax.set_mesh`, else the host's backend)."""
  platform = target.platform(mesh)
  if impl == 'cudnn' and platform != 'gpu':
    raise ValueError(f'model.attention: cudnn needs a GPU target; the target is {platform}')


def _axes(entry) -> tuple:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _kernel_spec(logical, mesh, sizes: dict, dims: tuple) -> PartitionSpec:
  """The rules' PartitionSpec of `logical`, keeping per dimension only the axes that are not
  manual already, have more than one device and (together) divide the dimension."""
  entries = []
  for entry, dim in zip(nn.logical_to_mesh_axes(logical), dims):
    axes, shards = [], 1
    for axis in _axes(entry):
      if axis in mesh.manual_axes or sizes.get(axis, 1) == 1 or dim % (shards * sizes[axis]):
        continue
      axes.append(axis)
      shards *= sizes[axis]
    entries.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return PartitionSpec(*entries)


def _head_specs(q_BLHD, k_BSKD, v_BSKD, mesh, sizes, length_axis):
  """(spec, k, v) for a shard_map: batch and heads split as the rules say, the length over
  `length_axis` (or whole), one spec for q, k and v; k/v repeated to one per q head when they do
  not split like the q heads."""
  num_heads = q_BLHD.shape[2]
  q_spec = _kernel_spec(('act_batch', None, 'act_heads', None), mesh, sizes, q_BLHD.shape)
  heads_split = math.prod(sizes[axis] for axis in _axes(q_spec[2]))
  if k_BSKD.shape[2] % heads_split:  # kv heads do not split like the q heads: one per q head
    group = num_heads // k_BSKD.shape[2]
    k_BSKD, v_BSKD = (jnp.repeat(x, group, axis=2) for x in (k_BSKD, v_BSKD))
  return PartitionSpec(q_spec[0], length_axis, q_spec[2], None), k_BSKD, v_BSKD


def _context_attention(q_BLHD, k_BSKD, v_BSKD, segment_ids_BL, positions_BL, causal,
                       sliding_window, impl, strategy):
  """Ring / all-gather attention over the sequence split on the mesh's `context` axis."""
  mesh = jax.sharding.get_abstract_mesh()
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  spec, k_BSKD, v_BSKD = _head_specs(q_BLHD, k_BSKD, v_BSKD, mesh, sizes, ring_attention.AXIS)
  return ring_attention.context_attention(
      q_BLHD, k_BSKD, v_BSKD, segment_ids_BL, positions_BL, spec=spec,
      context=sizes[ring_attention.AXIS], causal=causal, sliding_window=sliding_window,
      strategy=strategy, impl=impl)


def _pallas_attention(q_BLHD, k_BSKD, v_BSKD, segment_ids_BL, causal, sliding_window):
  """Flash attention on the target's backend, inside `shard_map` under a multi-device mesh."""
  from lmjax.kernels import flash_attention as flash  # pylint: disable=g-import-not-at-top
  backend = 'interpret' if target.platform() not in ('tpu', 'gpu') else target.platform()
  kernel = lambda q, k, v, seg: flash.flash_attention(
      q, k, v, seg, causal=causal, sliding_window=sliding_window, backend=backend)
  mesh = jax.sharding.get_abstract_mesh()
  sizes = {} if mesh.empty else dict(zip(mesh.axis_names, mesh.axis_sizes))
  free = [axis for axis in sizes if axis not in mesh.manual_axes]
  if not any(sizes[axis] > 1 for axis in free):
    return kernel(q_BLHD, k_BSKD, v_BSKD, segment_ids_BL)
  q_spec, k_BSKD, v_BSKD = _head_specs(q_BLHD, k_BSKD, v_BSKD, mesh, sizes, None)
  seg_spec = PartitionSpec(q_spec[0], None)
  return jax.shard_map(kernel, in_specs=(q_spec, q_spec, q_spec, seg_spec), out_specs=q_spec,
                       axis_names=set(free), check_vma=False)(q_BLHD, k_BSKD, v_BSKD,
                                                             segment_ids_BL)


def _cudnn_attention(q_BLHD, k_BSKD, v_BSKD, segment_ids_BL, causal, sliding_window):
  mask_BLS = attention_mask(segment_ids_BL, segment_ids_BL, jnp.zeros_like(segment_ids_BL),
                            jnp.zeros_like(segment_ids_BL), causal=False)
  window = (sliding_window - 1, 0) if sliding_window else None
  return jax.nn.dot_product_attention(q_BLHD, k_BSKD, v_BSKD, mask=mask_BLS[:, None],
                                      is_causal=causal, local_window_size=window,
                                      implementation='cudnn')
