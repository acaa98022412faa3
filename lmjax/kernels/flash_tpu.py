"""Flash attention on the TPU tiling (Mosaic), also run by the Pallas interpreter on CPU.

Layout BHLD: q (B, H, Lq, D), k/v (B, K, Lk, D), H = K * group. Every operand streams through the
grid block by block, so the VMEM a program uses does not depend on the sequence length:

  forward   grid (B, H, nq, nk)        q block i stays, kv blocks j stream; scratch m, l
                                       (bq, 128) lane-replicated and acc (bq, D) in float32
                                       (online softmax), written at the last j as o and
                                       lse = m + log(l).
  dq        grid (B, H, nq, nk)        as the forward; scratch dq (bq, D).
  dk, dv    grid (B, K, nk, group, nq) kv block j stays, the group's q heads and q blocks stream;
                                       scratch dk, dv (bk, D): the GQA sum stays in-kernel.

Row-shaped operands a kernel needs as columns (lse, delta, q segment ids in the forward and dq, kv
segment ids in dk/dv) are transposed once per resident block into lane-replicated (block, 128)
scratch. dk/dv works on transposed scores s^T = k q^T (bk, bq), so lse and delta of the streaming
q blocks broadcast as rows without a transpose.

The last grid dimensions are "arbitrary" (sequential, accumulating); the others "parallel".
Blocks obey the TPU (8, 128) tiling for f32 and bf16: values (block, head_dim) with head_dim the
whole dimension; segment ids as (1, block) rows of (B, 1, L) and lse, delta as (1, block_q) rows
of (B, H, 1, Lq), blocks multiples of 128. Rows keep these arrays lane-dense in HBM (a trailing
dimension of 1 would be padded to 128 lanes); a kernel needing a column transposes in VMEM.

Skipping: a (q block, kv block) pair with no visible pair of positions (causal, sliding window,
disjoint segment-id ranges) runs no arithmetic (`pl.when`), and for causal/window the index map
repeats a block that is already resident, so the pipeline copies nothing. A pair whose every
(query, key) is visible (below the diagonal, inside the window, unpadded, one segment id) runs
without building a mask. Block offsets are runtime
scalars (scalar prefetch), together with the per-block segment-id ranges.

Online softmax: m' = max(m, rowmax(s)); p = exp(s - m'); l' = exp(m - m') l + rowsum(p);
acc' = exp(m - m') acc + p v; o = acc / l. A row with no visible key keeps l = 0: o = 0 and
lse = +inf, so recomputed probabilities (and gradients) are exactly 0. Backward: p = exp(s - lse),
ds = p (do v^T - delta), delta = rowsum(o do) - dlse (the cotangent of lse, used by the block API).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lmjax.kernels.flash_common import (NEG_INF, Tiling, block_mask, clamp_index, dot,
                                        kv_block_range, q_block_range, segment_block_ranges)

_S = pl.squeezed
F32 = jnp.float32


def _scalar_args(t: Tiling, offsets, q_seg, kv_seg, bq: int, bk: int):
  """Scalar-prefetch operands: the (2,) offsets, then per-block segment-id ranges."""
  if not t.has_segments:
    return [offsets]
  return [offsets, *segment_block_ranges(q_seg[:, 0, :], bq),
          *segment_block_ranges(kv_seg[:, 0, :], bk)]


def _pair_visible(t: Tiling, scalars, b, i, j, bq: int, bk: int):
  """Whether q block i and kv block j of batch row b may hold a visible pair."""
  nq, nk = t.q_len_pad // bq, t.kv_len_pad // bk
  offsets = scalars[0]
  lo, hi = kv_block_range(t, offsets[0] + i * bq - offsets[1], bq, bk, nk)
  ok = (lo <= j) & (j < hi)
  if t.has_segments:
    q_lo, q_hi, k_lo, k_hi = scalars[1:]
    qi, kj = b * nq + i, b * nk + j
    ok = ok & (q_lo[qi] <= k_hi[kj]) & (k_lo[kj] <= q_hi[qi])
  return ok


def _when_visible(t: Tiling, scalars, b, i, j, bq: int, bk: int, step):
  """Runs `step(masked)` for a visible block pair: `masked=False` when every pair of the block is
  visible (interior blocks: no iota, compare or select), else `masked=True`."""
  visible = _pair_visible(t, scalars, b, i, j, bq, bk)
  if not (t.causal or t.window > 0 or t.kv_padded or t.has_segments):
    pl.when(visible)(lambda: step(False))
    return
  offsets = scalars[0]
  q_first, k_first = offsets[0] + i * bq, offsets[1] + j * bk
  whole = jnp.bool_(True)
  if t.causal:  # the block's last key is at or before its first query
    whole = whole & (k_first + bk - 1 <= q_first)
  if t.window > 0:  # its last query is within the window of its first key
    whole = whole & (q_first + bq - 1 - k_first < t.window)
  if t.kv_padded:
    whole = whole & ((j + 1) * bk <= t.kv_len)
  if t.has_segments:  # one segment id on both sides
    q_lo, q_hi, k_lo, k_hi = scalars[1:]
    qi, kj = b * (t.q_len_pad // bq) + i, b * (t.kv_len_pad // bk) + j
    whole = whole & (q_lo[qi] == q_hi[qi]) & (k_lo[kj] == k_hi[kj]) & (q_lo[qi] == k_lo[kj])
  pl.when(visible & whole)(lambda: step(False))
  pl.when(visible & jnp.logical_not(whole))(lambda: step(True))


def _kv_index(t: Tiling, scalars, i, j, bq: int, bk: int):
  """The kv block program (i, j) reads: j, or a resident neighbour when j is out of range."""
  nk = t.kv_len_pad // bk
  offsets = scalars[0]
  lo, hi = kv_block_range(t, offsets[0] + i * bq - offsets[1], bq, bk, nk)
  return clamp_index(j, lo, hi, nk)


def _q_index(t: Tiling, scalars, i, j, bq: int, bk: int):
  """The q block program (j, i) of the dk/dv kernel reads."""
  nq = t.q_len_pad // bq
  offsets = scalars[0]
  lo, hi = q_block_range(t, offsets[1] + j * bk - offsets[0], bq, bk, nq)
  return clamp_index(i, lo, hi, nq)


def _lanes(row):
  """(1, n) row -> (n, 128) with every lane equal: an aligned transpose in VMEM. Kernels do it
  once per resident block (into scratch) and read column [:, :1] at every step."""
  return jnp.broadcast_to(row, (128, row.shape[1])).T


def _unpack(t: Tiling, refs, num_scalars: int, num_rest_inputs: int):
  """(scalars, (q, k, v), (q_seg, kv_seg), other inputs, outputs and scratch)."""
  scalars, refs = refs[:num_scalars], refs[num_scalars:]
  qkv, refs = refs[:3], refs[3:]
  segs = (None, None)
  if t.has_segments:
    segs, refs = refs[:2], refs[2:]
  return scalars, qkv, segs, refs[:num_rest_inputs], refs[num_rest_inputs:]


# --------------------------------------------------------------------------- kernels
def _fwd_kernel(*refs, t: Tiling, num_scalars: int):
  scalars, (q_ref, k_ref, v_ref), (qseg_ref, kseg_ref), _, rest = _unpack(t, refs, num_scalars,
                                                                          0)
  o_ref, lse_ref, m_scr, l_scr, acc_scr, *qcol_scr = rest
  bq, bk = t.block_q, t.block_k
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, NEG_INF, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)
    if qcol_scr:
      qcol_scr[0][...] = _lanes(qseg_ref[...])

  def _step(masked):
    v = v_ref[...]
    s = dot(q_ref[...], k_ref[...], 1, 1) * t.scale  # (bq, bk) float32
    if masked:
      offsets = scalars[0]
      segs = (None, None) if qseg_ref is None else (qcol_scr[0][...][:, :1], kseg_ref[...])
      mask = block_mask(t, offsets[0] + i * bq, offsets[1] + j * bk, j * bk, (bq, bk), *segs)
      s = jnp.where(mask, s, NEG_INF)
    m = m_scr[...][:, :1]
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)  # nothing visible yet
    p = jnp.exp(s - m_safe)
    corr = jnp.exp(m - m_safe)
    l_new = corr * l_scr[...][:, :1] + jnp.sum(p, axis=1, keepdims=True)
    acc_scr[...] = corr * acc_scr[...] + dot(p.astype(v.dtype), v, 1, 0)
    m_scr[...] = jnp.broadcast_to(m_new, m_scr.shape)
    l_scr[...] = jnp.broadcast_to(l_new, l_scr.shape)

  _when_visible(t, scalars, b, i, j, bq, bk, _step)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    l = l_scr[...]
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc_scr[...] * (1.0 / l_safe[:, :1])).astype(o_ref.dtype)
    lse = jnp.where(empty, jnp.inf, m_scr[...] + jnp.log(l_safe))  # (bq, 128), lanes equal
    lse_ref[...] = lse.T[:1, :]


def _dq_kernel(*refs, t: Tiling, num_scalars: int):
  """Scores s = q k^T (bq, bk): lse, delta and the q segment ids of the resident q block are
  turned into columns once (at j = 0)."""
  scalars, (q_ref, k_ref, v_ref), (qseg_ref, kseg_ref), rest_in, rest = _unpack(
      t, refs, num_scalars, 3)
  do_ref, lse_ref, delta_ref = rest_in
  dq_ref, dq_scr, lse_scr, delta_scr, *qcol_scr = rest
  bq, bk = t.block_q_bwd, t.block_k_bwd
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)
    lse_scr[...] = _lanes(lse_ref[...])
    delta_scr[...] = _lanes(delta_ref[...])
    if qcol_scr:
      qcol_scr[0][...] = _lanes(qseg_ref[...])

  def _step(masked):
    k = k_ref[...]
    p = jnp.exp(dot(q_ref[...], k, 1, 1) * t.scale - lse_scr[...][:, :1])
    if masked:
      offsets = scalars[0]
      segs = (None, None) if qseg_ref is None else (qcol_scr[0][...][:, :1], kseg_ref[...])
      mask = block_mask(t, offsets[0] + i * bq, offsets[1] + j * bk, j * bk, (bq, bk), *segs)
      p = jnp.where(mask, p, 0.0)
    ds = p * (dot(do_ref[...], v_ref[...], 1, 1) - delta_scr[...][:, :1])
    dq_scr[...] += dot(ds.astype(k.dtype), k, 1, 0)  # ds k

  _when_visible(t, scalars, b, i, j, bq, bk, _step)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (dq_scr[...] * t.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, t: Tiling, num_scalars: int):
  """Transposed scores s^T = k q^T (bk, bq): lse, delta and q segment ids broadcast as rows; the
  resident kv block's segment ids are turned into a column once."""
  scalars, (q_ref, k_ref, v_ref), (qseg_ref, kseg_ref), rest_in, rest = _unpack(
      t, refs, num_scalars, 3)
  do_ref, lse_ref, delta_ref = rest_in
  dk_ref, dv_ref, dk_scr, dv_scr, *kcol_scr = rest
  bq, bk = t.block_q_bwd, t.block_k_bwd
  b, j, g, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

  @pl.when((g == 0) & (i == 0))
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)
    if kcol_scr:
      kcol_scr[0][...] = _lanes(kseg_ref[...])

  def _step(masked):
    q, do = q_ref[...], do_ref[...]
    p = jnp.exp(dot(k_ref[...], q, 1, 1) * t.scale - lse_ref[...])  # (bk, bq)
    if masked:
      offsets = scalars[0]
      segs = (None, None) if qseg_ref is None else (qseg_ref[...], kcol_scr[0][...][:, :1])
      mask = block_mask(t, offsets[0] + i * bq, offsets[1] + j * bk, j * bk, (bk, bq), *segs,
                        transposed=True)
      p = jnp.where(mask, p, 0.0)
    ds = p * (dot(v_ref[...], do, 1, 1) - delta_ref[...])
    dv_scr[...] += dot(p.astype(do.dtype), do, 1, 0)  # p^T do
    dk_scr[...] += dot(ds.astype(q.dtype), q, 1, 0)  # ds^T q

  _when_visible(t, scalars, b, i, j, bq, bk, _step)

  @pl.when((g == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
  def _finish():
    dk_ref[...] = (dk_scr[...] * t.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


# --------------------------------------------------------------------------- pallas calls
def _call(t: Tiling, kernel, *, grid, in_specs, out_specs, out_shape, scratch, scalars, args,
          semantics, name):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=len(scalars), grid=grid, in_specs=in_specs, out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM(shape, dtype) for shape, dtype in scratch])
  params = None
  if t.backend == 'tpu':
    params = pltpu.CompilerParams(dimension_semantics=semantics)
  return pl.pallas_call(
      functools.partial(kernel, t=t, num_scalars=len(scalars)), grid_spec=grid_spec,
      out_shape=out_shape, interpret=t.backend == 'interpret', compiler_params=params,
      name=name)(*scalars, *args)


def _seg_specs(q_index, kv_index, bq: int, bk: int):
  """Segment ids: (1, bq) and (1, bk) rows of (B, 1, Lq) and (B, 1, Lk)."""
  return [pl.BlockSpec((_S, 1, bq), lambda *a: (a[0], 0, q_index(*a))),
          pl.BlockSpec((_S, 1, bk), lambda *a: (a[0], 0, kv_index(*a)))]


def forward(t: Tiling, q, k, v, q_seg, kv_seg, offsets):
  """(o (B, H, Lq, D), lse (B, H, 1, Lq) float32) on padded BHLD inputs."""
  batch, num_heads, _, head_dim = q.shape
  bq, bk, g = t.block_q, t.block_k, t.group
  scalars = _scalar_args(t, offsets, q_seg, kv_seg, bq, bk)
  kv_idx = lambda b, h, i, j, *s: _kv_index(t, s, i, j, bq, bk)
  q_idx = lambda b, h, i, j, *s: i
  q_spec = pl.BlockSpec((_S, _S, bq, head_dim), lambda b, h, i, j, *s: (b, h, i, 0))
  kv_spec = pl.BlockSpec((_S, _S, bk, head_dim),
                         lambda b, h, i, j, *s: (b, h // g, kv_idx(b, h, i, j, *s), 0))
  in_specs, args = [q_spec, kv_spec, kv_spec], [q, k, v]
  if t.has_segments:
    in_specs += _seg_specs(q_idx, kv_idx, bq, bk)
    args += [q_seg, kv_seg]
  row_spec = pl.BlockSpec((_S, _S, 1, bq), lambda b, h, i, j, *s: (b, h, 0, i))
  seg_col = [((bq, 128), jnp.int32)] if t.has_segments else []
  return _call(
      t, _fwd_kernel, grid=(batch, num_heads, t.q_len_pad // bq, t.kv_len_pad // bk),
      in_specs=in_specs, out_specs=[q_spec, row_spec],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, num_heads, 1, q.shape[2]), jnp.float32)],
      scratch=[((bq, 128), F32), ((bq, 128), F32), ((bq, head_dim), F32)] + seg_col,
      scalars=scalars, args=args,
      semantics=('parallel', 'parallel', 'parallel', 'arbitrary'), name='flash_attention_fwd')


def backward(t: Tiling, q, k, v, q_seg, kv_seg, offsets, do, lse, delta):
  """(dq, dk, dv) on padded BHLD inputs; `delta` = rowsum(o * do) - dlse, (B, H, 1, Lq)."""
  batch, num_heads, _, head_dim = q.shape
  num_kv_heads = k.shape[1]
  bq, bk, g = t.block_q_bwd, t.block_k_bwd, t.group
  nq, nk = t.q_len_pad // bq, t.kv_len_pad // bk
  scalars = _scalar_args(t, offsets, q_seg, kv_seg, bq, bk)

  # dq: grid (B, H, nq, nk).
  kv_idx = lambda b, h, i, j, *s: _kv_index(t, s, i, j, bq, bk)
  q_spec = pl.BlockSpec((_S, _S, bq, head_dim), lambda b, h, i, j, *s: (b, h, i, 0))
  kv_spec = pl.BlockSpec((_S, _S, bk, head_dim),
                         lambda b, h, i, j, *s: (b, h // g, kv_idx(b, h, i, j, *s), 0))
  row_spec = pl.BlockSpec((_S, _S, 1, bq), lambda b, h, i, j, *s: (b, h, 0, i))
  in_specs, args = [q_spec, kv_spec, kv_spec], [q, k, v]
  if t.has_segments:
    in_specs += _seg_specs(lambda b, h, i, j, *s: i, kv_idx, bq, bk)
    args += [q_seg, kv_seg]
  dq = _call(
      t, _dq_kernel, grid=(batch, num_heads, nq, nk),
      in_specs=in_specs + [q_spec, row_spec, row_spec], out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      scratch=[((bq, head_dim), F32), ((bq, 128), F32), ((bq, 128), F32)] + (
          [((bq, 128), jnp.int32)] if t.has_segments else []),
      scalars=scalars, args=args + [do, lse, delta],
      semantics=('parallel', 'parallel', 'parallel', 'arbitrary'),
      name='flash_attention_bwd_dq')

  # dk, dv: grid (B, K, nk, group, nq).
  q_idx = lambda b, h, j, gi, i, *s: _q_index(t, s, i, j, bq, bk)
  qh_spec = pl.BlockSpec((_S, _S, bq, head_dim),
                         lambda b, h, j, gi, i, *s: (b, h * g + gi, q_idx(b, h, j, gi, i, *s), 0))
  rowh_spec = pl.BlockSpec((_S, _S, 1, bq),
                           lambda b, h, j, gi, i, *s: (b, h * g + gi, 0,
                                                       q_idx(b, h, j, gi, i, *s)))
  kvj_spec = pl.BlockSpec((_S, _S, bk, head_dim), lambda b, h, j, gi, i, *s: (b, h, j, 0))
  in_specs, args = [qh_spec, kvj_spec, kvj_spec], [q, k, v]
  if t.has_segments:
    in_specs += _seg_specs(q_idx, lambda b, h, j, gi, i, *s: j, bq, bk)
    args += [q_seg, kv_seg]
  dk, dv = _call(
      t, _dkv_kernel, grid=(batch, num_kv_heads, nk, g, nq),
      in_specs=in_specs + [qh_spec, rowh_spec, rowh_spec], out_specs=[kvj_spec, kvj_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      scratch=[((bk, head_dim), F32), ((bk, head_dim), F32)] + (
          [((bk, 128), jnp.int32)] if t.has_segments else []),
      scalars=scalars, args=args + [do, lse, delta],
      semantics=('parallel', 'parallel', 'parallel', 'arbitrary', 'arbitrary'),
      name='flash_attention_bwd_dkv')
  return dq, dk, dv


# --------------------------------------------------------------------------- differentiable core
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def attend(t: Tiling, q, k, v, q_seg, kv_seg, offsets):
  """(o, lse) of padded BHLD inputs; differentiable in q, k, v through both outputs."""
  return forward(t, q, k, v, q_seg, kv_seg, offsets)


def _attend_fwd(t, q, k, v, q_seg, kv_seg, offsets):
  o, lse = forward(t, q, k, v, q_seg, kv_seg, offsets)
  return (o, lse), (q, k, v, q_seg, kv_seg, offsets, o, lse)


def _attend_bwd(t, res, cotangents):
  q, k, v, q_seg, kv_seg, offsets, o, lse = res
  do, dlse = cotangents
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)[:, :, None, :]
  delta = delta - jnp.where(jnp.isfinite(lse), dlse, 0.0)
  dq, dk, dv = backward(t, q, k, v, q_seg, kv_seg, offsets, do.astype(q.dtype), lse, delta)
  return dq, dk, dv, None, None, None


attend.defvjp(_attend_fwd, _attend_bwd)


def vmem_bytes_per_program(t: Tiling, head_dim: int, itemsize: int) -> dict:
  """VMEM of one program from the block shapes: double-buffered input/output blocks plus the
  float32 scratch, tiles padded to (8, 128). Independent of the sequence length."""
  tile = lambda rows, cols: max(rows, 8) * max(cols, 128)
  blocks = lambda *shapes: sum(2 * tile(rows, cols) * size for rows, cols, size in shapes)
  d = head_dim
  bq, bk = t.block_q, t.block_k
  seg = [(1, bq, 4), (1, bk, 4)] if t.has_segments else []
  seg_col = tile(bq, 128) if t.has_segments else 0
  fwd = blocks((bq, d, itemsize), (bk, d, itemsize), (bk, d, itemsize), (bq, d, itemsize),
               (1, bq, 4), *seg) + 4 * (2 * tile(bq, 128) + tile(bq, d) + seg_col)
  bq, bk = t.block_q_bwd, t.block_k_bwd
  seg = [(1, bq, 4), (1, bk, 4)] if t.has_segments else []
  inputs = [(bq, d, itemsize), (bk, d, itemsize), (bk, d, itemsize), (bq, d, itemsize),
            (1, bq, 4), (1, bq, 4), *seg]
  dq = blocks(*inputs, (bq, d, itemsize)) + 4 * (tile(bq, d) + 2 * tile(bq, 128) + (
      tile(bq, 128) if t.has_segments else 0))
  dkv = blocks(*inputs, (bk, d, itemsize), (bk, d, itemsize)) + 4 * (2 * tile(bk, d) + (
      tile(bk, 128) if t.has_segments else 0))
  return {'forward': fwd, 'backward_dq': dq, 'backward_dkv': dkv}
