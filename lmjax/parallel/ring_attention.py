"""Context parallelism: exact attention over a sequence split along the `context` mesh axis.

Batches are in zigzag order (`zigzag`): the sequence is cut into 2 x C chunks (C = mesh.context)
and device d holds chunks d and 2C-1-d, so under a causal mask every device has the same number of
visible (query, key) pairs. Every batch array is reordered alike (inputs, targets, positions,
segment ids, weights); RoPE reads the positions the batch carries and losses are sums over tokens,
so nothing else in the model changes.

Two strategies (`model.context_parallel`), each inside `jax.shard_map` manual over every mesh axis:
  ring       K/V blocks with their segment ids and positions circulate with `ppermute` for C-1
             steps; each step attends the local q chunks to the visiting kv chunks and the partial
             results merge by the online-softmax rule in float32 (`flash_blocks.merge`). The
             backward (a custom VJP) runs the ring again, recomputing each block: dq stays, dK/dV
             travel with their kv chunks and take one last step home; only the local q/k/v and
             the merged (o, lse) are saved.
  allgather  K/V, segment ids and positions are all-gathered over `context`, then local attention:
             cheaper for short sequences and few kv heads (GQA/MQA).

A block is one q chunk against one kv chunk, returning (o, lse). With `model.attention=pallas` it
is the flash kernel's block API (`lmjax.kernels.flash_blocks`: Mosaic on TPU, the interpreter on
CPU), masking by global sequence index (the chunk offsets); with `xla` it is a float32 einsum block
masking by the carried segment ids and positions, exactly like `lmjax.models.attention`'s mask.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lmjax.kernels import flash_blocks

AXIS = 'context'
STRATEGIES = ('ring', 'allgather')


def zigzag_order(length: int, context: int) -> np.ndarray:
  """Original sequence indices in zigzag order: chunks 0, 2C-1, 1, 2C-2, ... of length/(2C)."""
  if length % (2 * context):
    raise ValueError(f'zigzag: length {length} is not divisible by 2 x context = {2 * context}')
  chunk = length // (2 * context)
  chunks = [c for d in range(context) for c in (d, 2 * context - 1 - d)]
  return np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in chunks])


def zigzag(batch: dict, context: int) -> dict:
  """Every (rows, length, ...) array of `batch` reordered along the length into zigzag order (the
  identity for context 1); numpy or jax arrays."""
  if context == 1:
    return batch
  return {k: v[:, zigzag_order(v.shape[1], context)] for k, v in batch.items()}


def unzigzag(batch: dict, context: int) -> dict:
  """The inverse of `zigzag`."""
  if context == 1:
    return batch
  return {k: v[:, np.argsort(zigzag_order(v.shape[1], context))] for k, v in batch.items()}


def xla_block(q_BLHD, k_BSKD, v_BSKD, q_seg_BL, kv_seg_BS, q_pos_BL, kv_pos_BS, *, causal,
              sliding_window):
  """(o_BLHD float32, lse_BHL float32) of q against k/v under the segment/position mask; GQA by
  grouping the q heads. Rows with no visible key: o = 0, lse = -inf (no NaN in the gradients)."""
  batch, q_len, num_heads, head_dim = q_BLHD.shape
  num_kv_heads = k_BSKD.shape[2]
  q_BLKGD = q_BLHD.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
  scores_BKGLS = jnp.einsum('blkgd,bskd->bkgls', q_BLKGD, k_BSKD,
                            preferred_element_type=jnp.float32) * head_dim**-0.5
  mask_BLS = q_seg_BL[:, :, None] == kv_seg_BS[:, None, :]
  offset_BLS = q_pos_BL[:, :, None] - kv_pos_BS[:, None, :]
  if causal:
    mask_BLS &= offset_BLS >= 0
  if sliding_window:
    mask_BLS &= offset_BLS < sliding_window
  scores_BKGLS = jnp.where(mask_BLS[:, None, None], scores_BKGLS, -jnp.inf)
  top_BKGL1 = jnp.max(scores_BKGLS, axis=-1, keepdims=True)
  top_BKGL1 = lax.stop_gradient(jnp.where(jnp.isfinite(top_BKGL1), top_BKGL1, 0.0))
  probs_BKGLS = jnp.exp(scores_BKGLS - top_BKGL1)
  total_BKGL1 = jnp.sum(probs_BKGLS, axis=-1, keepdims=True)
  seen_BKGL1 = total_BKGL1 > 0
  total_BKGL1 = jnp.where(seen_BKGL1, total_BKGL1, 1.0)
  o_BKGLD = jnp.einsum('bkgls,bskd->bkgld', probs_BKGLS / total_BKGL1, v_BSKD.astype(jnp.float32))
  lse_BKGL = jnp.where(seen_BKGL1, top_BKGL1 + jnp.log(total_BKGL1), -jnp.inf)[..., 0]
  o_BLHD = o_BKGLD.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, num_heads, head_dim)
  return o_BLHD, lse_BKGL.reshape(batch, num_heads, q_len)


def _block(impl, causal, sliding_window, q, kv, q_offset, kv_offset):
  """(o float32, lse) of one q chunk (q_BLHD, seg, pos) against one kv chunk (k, v, seg, pos)."""
  (q_BLHD, q_seg, q_pos), (k_BSKD, v_BSKD, kv_seg, kv_pos) = q, kv
  if impl == 'pallas':
    o_BLHD, lse_BHL = flash_blocks.attention_block(
        q_BLHD, k_BSKD, v_BSKD, (q_seg, kv_seg), q_offset=q_offset, kv_offset=kv_offset,
        causal=causal, sliding_window=sliding_window)
    return o_BLHD.astype(jnp.float32), lse_BHL
  return xla_block(q_BLHD, k_BSKD, v_BSKD, q_seg, kv_seg, q_pos, kv_pos, causal=causal,
                   sliding_window=sliding_window)


def _halves(x):
  """The two zigzag chunks a device holds, along axis 1."""
  half = x.shape[1] // 2
  return x[:, :half], x[:, half:]


def _chunk_ids(device, context: int):
  return device, 2 * context - 1 - device


def _ring_layout(context, q_BLHD, seg_BL, pos_BL):
  """(my device index, chunk length, my 2 q chunks as (q, seg, pos), their global offsets)."""
  me = lax.axis_index(AXIS)
  chunk = q_BLHD.shape[1] // 2
  queries = list(zip(*map(_halves, (q_BLHD, seg_BL, pos_BL))))
  return me, chunk, queries, [c * chunk for c in _chunk_ids(me, context)]


def _visiting(kv, source, context: int, chunk: int):
  """The two kv chunks (k, v, seg, pos) of device `source` and their global offsets."""
  return list(zip(*map(_halves, kv))), [c * chunk for c in _chunk_ids(source, context)]


def _shift(context: int):
  return [(i, (i + 1) % context) for i in range(context)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ring(block, context, q_BLHD, k_BSKD, v_BSKD, seg_BL, pos_BL):
  """One device's ring: its 2 q chunks against every device's 2 kv chunks, merged in float32."""
  return _ring_fwd(block, context, q_BLHD, k_BSKD, v_BSKD, seg_BL, pos_BL)[0]


def _ring_fwd(block, context, q_BLHD, k_BSKD, v_BSKD, seg_BL, pos_BL):
  me, chunk, queries, q_offsets = _ring_layout(context, q_BLHD, seg_BL, pos_BL)

  def attend(kv, source):
    """Per local q chunk, (o, lse) over the two kv chunks of device `source`."""
    out = []
    for q, q_offset in zip(queries, q_offsets):
      parts = [block(q, part, q_offset, kv_offset)
               for part, kv_offset in zip(*_visiting(kv, source, context, chunk))]
      out.append(flash_blocks.merge(*parts[0], *parts[1]))
    return out

  def step(carry, s):
    acc, kv = carry
    kv = tuple(lax.ppermute(x, AXIS, _shift(context)) for x in kv)
    acc = [flash_blocks.merge(*a, *b) for a, b in zip(acc, attend(kv, (me - s) % context))]
    return (acc, kv), None

  kv = (k_BSKD, v_BSKD, seg_BL, pos_BL)
  (acc, _), _ = lax.scan(step, (attend(kv, me), kv), jnp.arange(1, context))
  out = jnp.concatenate([o for o, _ in acc], axis=1).astype(q_BLHD.dtype)
  return out, (q_BLHD, k_BSKD, v_BSKD, seg_BL, pos_BL, acc)


def _ring_bwd(block, context, residuals, do_BLHD):
  """The ring again, recomputing each block: dq stays, dk/dv travel with their kv chunks and take
  one last step home. A block's share of the merged output o = sum_b exp(lse_b - lse) o_b gets
  the cotangents do_b = w do and dlse_b = w (rowsum(o_b do) - rowsum(o do)), w = exp(lse_b - lse),
  which is the flash backward with the final lse."""
  q_BLHD, k_BSKD, v_BSKD, seg_BL, pos_BL, acc = residuals
  me, chunk, queries, q_offsets = _ring_layout(context, q_BLHD, seg_BL, pos_BL)
  do_halves = _halves(do_BLHD.astype(jnp.float32))
  rows = lambda a_BLHD, b_BLHD: jnp.swapaxes(jnp.sum(a_BLHD * b_BLHD, axis=-1), 1, 2)  # (B,H,L)
  finals = [(lse, rows(o, do)) for (o, lse), do in zip(acc, do_halves)]

  def grads(kv, source):
    """(dq of my 2 q chunks, (dk, dv) of the visiting kv) from the 4 blocks of this step."""
    chunks, kv_offsets = _visiting(kv, source, context, chunk)
    dq = [jnp.zeros(q.shape, jnp.float32) for q, _, _ in queries]
    dkv = [jnp.zeros(kv[0].shape, jnp.float32), jnp.zeros(kv[1].shape, jnp.float32)]
    for i, (q, q_offset) in enumerate(zip(queries, q_offsets)):
      lse, final_rows = finals[i]
      for j, (part, kv_offset) in enumerate(zip(chunks, kv_offsets)):
        fn = lambda q_, k_, v_, q=q, part=part, q_offset=q_offset, kv_offset=kv_offset: block(
            (q_, *q[1:]), (k_, v_, *part[2:]), q_offset, kv_offset)
        (o_b, lse_b), vjp = jax.vjp(fn, q[0], part[0], part[1])
        w_BHL = jnp.where(jnp.isfinite(lse_b), jnp.exp(lse_b - lse), 0.0)
        do_b = jnp.swapaxes(w_BHL, 1, 2)[..., None] * do_halves[i]
        dq_b, dk_b, dv_b = vjp((do_b, w_BHL * (rows(o_b, do_halves[i]) - final_rows)))
        dq[i] += dq_b.astype(jnp.float32)
        half = slice(j * chunk, (j + 1) * chunk)
        dkv = [dkv[0].at[:, half].add(dk_b.astype(jnp.float32)),
               dkv[1].at[:, half].add(dv_b.astype(jnp.float32))]
    return dq, dkv

  def step(carry, s):
    dq, kv, dkv = carry
    kv, dkv = (tuple(lax.ppermute(x, AXIS, _shift(context)) for x in xs) for xs in (kv, dkv))
    dq_s, dkv_s = grads(kv, (me - s) % context)
    return ([a + b for a, b in zip(dq, dq_s)], kv, [a + b for a, b in zip(dkv, dkv_s)]), None

  kv = (k_BSKD, v_BSKD, seg_BL, pos_BL)
  dq, dkv = grads(kv, me)
  (dq, _, dkv), _ = lax.scan(step, (dq, kv, dkv), jnp.arange(1, context))
  dk, dv = (lax.ppermute(x, AXIS, _shift(context)) for x in dkv)
  return (jnp.concatenate(dq, axis=1).astype(q_BLHD.dtype), dk.astype(k_BSKD.dtype),
          dv.astype(v_BSKD.dtype), None, None)


_ring.defvjp(_ring_fwd, _ring_bwd)


def _allgather(block, context, q_BLHD, k_BSKD, v_BSKD, seg_BL, pos_BL):
  """One device's q chunks against the whole sequence's K/V, gathered and put in natural order."""
  me = lax.axis_index(AXIS)
  chunk = q_BLHD.shape[1] // 2
  natural = np.argsort(zigzag_order(2 * chunk * context, context))
  gather = lambda x: lax.all_gather(x, AXIS, axis=1, tiled=True)[:, natural]
  kv = tuple(map(gather, (k_BSKD, v_BSKD, seg_BL, pos_BL)))
  queries = zip(*map(_halves, (q_BLHD, seg_BL, pos_BL)))
  outs = [block(q, kv, c * chunk, 0)[0] for q, c in zip(queries, _chunk_ids(me, context))]
  return jnp.concatenate(outs, axis=1).astype(q_BLHD.dtype)


def context_attention(q_BLHD, k_BSKD, v_BSKD, segment_ids_BL, positions_BL, *, spec, context: int,
                      causal=True, sliding_window=0, strategy='ring', impl='xla'):
  """Attention of a zigzag-ordered sequence split over `context` devices, under the current mesh.

  `spec`: the PartitionSpec of q, k and v (length over `context`; batch and heads as the caller
  splits them); segment ids and positions follow its batch and length split.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f'model.context_parallel: {strategy!r} must be one of {STRATEGIES}')
  block = functools.partial(_block, impl, causal, sliding_window)
  local = functools.partial(_ring if strategy == 'ring' else _allgather, block, context)
  mesh = jax.sharding.get_abstract_mesh()
  free = {axis for axis in mesh.axis_names if axis not in mesh.manual_axes}
  row_spec = jax.sharding.PartitionSpec(spec[0], spec[1])
  return jax.shard_map(local, in_specs=(spec, spec, spec, row_spec, row_spec), out_specs=spec,
                       axis_names=free, check_vma=False)(
                           q_BLHD, k_BSKD, v_BSKD, segment_ids_BL, positions_BL)
