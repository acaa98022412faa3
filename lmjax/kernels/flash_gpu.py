"""Flash attention for GPUs (Pallas Triton), on the BLHD layout.

  forward  grid (B, H, nq): a program owns a q block and loops (`fori_loop`) over the kv blocks of
           its kv head `h // group` that can hold visible keys (causal / window bounds), with the
           online softmax of `flash_tpu`; writes o and lse (B, H, Lq, 1).
  dq       grid (B, H, nq): loops over kv blocks, dq += ds k.
  dk, dv   grid (B, K, nk): loops over the group's q heads and the q blocks that can see its kv
           block; the GQA sum stays in-kernel in float32 (no atomics).

Triton wants power-of-two tiles, so head_dim is zero-padded to one (exact). K/V (resp. Q/dO) of a
head are whole blocks of the program: a GPU program reads them from HBM tile by tile. Exported
for CUDA with `jax.export`, only the safety check of the Triton custom call is disabled
(`EXPORT_DISABLED_CHECKS`): that call is not on JAX's list of stable custom calls.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lmjax.kernels.flash_common import (NEG_INF, Tiling, block_mask, dot, kv_block_range,
                                        pad_len, q_block_range)

_S = pl.squeezed
TRITON_CUSTOM_CALL = '__gpu$xla.gpu.triton'


def export_disabled_checks():
  """The one safety check `jax.export` must skip for these kernels."""
  return [jax.export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)]


def _split(refs, t: Tiling):
  """(q, k, v), (q_seg, kv_seg), rest."""
  if t.has_segments:
    return refs[:3], refs[3:5], refs[5:]
  return refs[:3], (None, None), refs[3:]


def _fwd_kernel(*refs, t: Tiling):
  (q_ref, k_ref, v_ref), (qseg_ref, kseg_ref), (o_ref, lse_ref) = _split(refs, t)
  bq, bk = t.block_q, t.block_k
  q_start = pl.program_id(2) * bq
  q = q_ref[...]
  q_seg = None if qseg_ref is None else qseg_ref[...]

  def body(j, carry):
    acc, m, l = carry
    k_start = pl.multiple_of(j * bk, bk)
    k = k_ref[pl.ds(k_start, bk), :]
    v = v_ref[pl.ds(k_start, bk), :]
    s = dot(q, k, 1, 1) * t.scale
    k_seg = None if kseg_ref is None else kseg_ref[:, pl.ds(k_start, bk)]
    mask = block_mask(t, q_start, k_start, k_start, (bq, bk), q_seg, k_seg)
    if mask is not None:
      s = jnp.where(mask, s, NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
    p = jnp.exp(s - m_safe)
    corr = jnp.exp(m - m_safe)
    l = corr * l + jnp.sum(p, axis=1, keepdims=True)
    acc = corr * acc + dot(p.astype(v.dtype), v, 1, 0)
    return acc, m_new, l

  lo, hi = kv_block_range(t, q_start, bq, bk, t.kv_len_pad // bk)
  init = (jnp.zeros((bq, q.shape[-1]), jnp.float32), jnp.full((bq, 1), NEG_INF, jnp.float32),
          jnp.zeros((bq, 1), jnp.float32))
  acc, m, l = lax.fori_loop(lo, hi, body, init)
  empty = l == 0.0
  l_safe = jnp.where(empty, 1.0, l)
  o_ref[...] = (acc * (1.0 / l_safe)).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log(l_safe))


def _dscores(t, q, k, v, do, lse, delta, mask):
  p = jnp.exp(dot(q, k, 1, 1) * t.scale - lse)
  if mask is not None:
    p = jnp.where(mask, p, 0.0)
  return p, p * (dot(do, v, 1, 1) - delta)


def _dq_kernel(*refs, t: Tiling):
  (q_ref, k_ref, v_ref), (qseg_ref, kseg_ref), rest = _split(refs, t)
  do_ref, lse_ref, delta_ref, dq_ref = rest
  bq, bk = t.block_q_bwd, t.block_k_bwd
  q_start = pl.program_id(2) * bq
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  q_seg = None if qseg_ref is None else qseg_ref[...]

  def body(j, dq):
    k_start = pl.multiple_of(j * bk, bk)
    k = k_ref[pl.ds(k_start, bk), :]
    v = v_ref[pl.ds(k_start, bk), :]
    k_seg = None if kseg_ref is None else kseg_ref[:, pl.ds(k_start, bk)]
    mask = block_mask(t, q_start, k_start, k_start, (bq, bk), q_seg, k_seg)
    _, ds = _dscores(t, q, k, v, do, lse, delta, mask)
    return dq + dot(ds.astype(k.dtype), k, 1, 0)

  lo, hi = kv_block_range(t, q_start, bq, bk, t.kv_len_pad // bk)
  dq = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * t.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, t: Tiling):
  (q_ref, k_ref, v_ref), (qseg_ref, kseg_ref), rest = _split(refs, t)
  do_ref, lse_ref, delta_ref, dk_ref, dv_ref = rest
  bq, bk = t.block_q_bwd, t.block_k_bwd
  k_start = pl.program_id(2) * bk
  k, v = k_ref[...], v_ref[...]
  k_seg = None if kseg_ref is None else kseg_ref[...]
  lo, hi = q_block_range(t, k_start, bq, bk, t.q_len_pad // bq)

  def head_body(g, carry):
    def body(i, carry):
      dk, dv = carry
      q_start = pl.multiple_of(i * bq, bq)
      rows = pl.ds(q_start, bq)
      q, do = q_ref[rows, g, :], do_ref[rows, g, :]
      q_seg = None if qseg_ref is None else qseg_ref[rows, :]
      mask = block_mask(t, q_start, k_start, k_start, (bq, bk), q_seg, k_seg)
      p, ds = _dscores(t, q, k, v, do, lse_ref[g, rows, :], delta_ref[g, rows, :], mask)
      return dk + dot(ds.astype(q.dtype), q, 0, 0), dv + dot(p.astype(do.dtype), do, 0, 0)
    return lax.fori_loop(lo, hi, body, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, t.group, head_body, (zeros, zeros))
  dk_ref[...] = (dk * t.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _params(head_dim: int, bq: int, bk: int):
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  big = max(bq, bk) * head_dim >= 128 * 128
  return plgpu.CompilerParams(num_warps=8 if big else 4, num_stages=2)


def _call(t, kernel, grid, in_specs, out_specs, out_shape, args, head_dim, bq, bk, name):
  return pl.pallas_call(
      functools.partial(kernel, t=t), grid=grid, in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, interpret=t.backend == 'interpret',
      compiler_params=None if t.backend == 'interpret' else _params(head_dim, bq, bk),
      name=name)(*args)


def _spec(block_len, heads, head_dim, index):
  """A BLHD block of `block_len` rows and `heads` heads (None: one, squeezed)."""
  return pl.BlockSpec((_S, block_len, _S if heads is None else heads, head_dim),
                      lambda *g: (index(*g)[0], index(*g)[1], index(*g)[2], 0))


def _seg_specs(t: Tiling, q_block, q_index, kv_block, kv_index):
  return [pl.BlockSpec((_S, q_block, 1), lambda *g: (g[0], q_index(*g), 0)),
          pl.BlockSpec((_S, 1, kv_block), lambda *g: (g[0], 0, kv_index(*g)))]


def _forward(t: Tiling, q, k, v, q_seg, kv_seg):
  batch, _, num_heads, head_dim = q.shape
  bq, g = t.block_q, t.group
  q_spec = _spec(bq, None, head_dim, lambda b, h, i: (b, i, h))
  kv_spec = _spec(t.kv_len_pad, None, head_dim, lambda b, h, i: (b, 0, h // g))
  in_specs, args = [q_spec, kv_spec, kv_spec], [q, k, v]
  if t.has_segments:
    in_specs += _seg_specs(t, bq, lambda b, h, i: i, t.kv_len_pad, lambda b, h, i: 0)
    args += [q_seg, kv_seg]
  row_spec = pl.BlockSpec((_S, _S, bq, 1), lambda b, h, i: (b, h, i, 0))
  return _call(t, _fwd_kernel, (batch, num_heads, t.q_len_pad // bq), in_specs,
               [q_spec, row_spec],
               [jax.ShapeDtypeStruct(q.shape, q.dtype),
                jax.ShapeDtypeStruct((batch, num_heads, t.q_len_pad, 1), jnp.float32)],
               args, head_dim, bq, t.block_k, 'flash_attention_fwd')


def _backward(t: Tiling, q, k, v, q_seg, kv_seg, do, lse, delta):
  batch, _, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  bq, bk, g = t.block_q_bwd, t.block_k_bwd, t.group
  q_spec = _spec(bq, None, head_dim, lambda b, h, i: (b, i, h))
  kv_spec = _spec(t.kv_len_pad, None, head_dim, lambda b, h, i: (b, 0, h // g))
  row_spec = pl.BlockSpec((_S, _S, bq, 1), lambda b, h, i: (b, h, i, 0))
  in_specs, args = [q_spec, kv_spec, kv_spec], [q, k, v]
  if t.has_segments:
    in_specs += _seg_specs(t, bq, lambda b, h, i: i, t.kv_len_pad, lambda b, h, i: 0)
    args += [q_seg, kv_seg]
  dq = _call(t, _dq_kernel, (batch, num_heads, t.q_len_pad // bq),
             in_specs + [q_spec, row_spec, row_spec], q_spec,
             jax.ShapeDtypeStruct(q.shape, q.dtype), args + [do, lse, delta], head_dim, bq, bk,
             'flash_attention_bwd_dq')

  qg_spec = _spec(t.q_len_pad, g, head_dim, lambda b, h, j: (b, 0, h))
  kvj_spec = _spec(bk, None, head_dim, lambda b, h, j: (b, j, h))
  rowg_spec = pl.BlockSpec((_S, g, t.q_len_pad, 1), lambda b, h, j: (b, h, 0, 0))
  in_specs, args = [qg_spec, kvj_spec, kvj_spec], [q, k, v]
  if t.has_segments:
    in_specs += _seg_specs(t, t.q_len_pad, lambda b, h, j: 0, bk, lambda b, h, j: j)
    args += [q_seg, kv_seg]
  dk, dv = _call(t, _dkv_kernel, (batch, num_kv_heads, t.kv_len_pad // bk),
                 in_specs + [qg_spec, rowg_spec, rowg_spec], [kvj_spec, kvj_spec],
                 [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
                 args + [do, lse, delta], head_dim, bq, bk, 'flash_attention_bwd_dkv')
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(t: Tiling, q, k, v, q_seg, kv_seg):
  return _forward(t, q, k, v, q_seg, kv_seg)[0]


def _attend_fwd(t, q, k, v, q_seg, kv_seg):
  o, lse = _forward(t, q, k, v, q_seg, kv_seg)
  return o, (q, k, v, q_seg, kv_seg, o, lse)


def _attend_bwd(t, res, do):
  q, k, v, q_seg, kv_seg, o, lse = res
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
  delta = jnp.swapaxes(delta, 1, 2)  # (B, L, H, 1) -> (B, H, L, 1)
  return (*_backward(t, q, k, v, q_seg, kv_seg, do, lse, delta), None, None)


_attend.defvjp(_attend_fwd, _attend_bwd)


def flash_attention_gpu(t: Tiling, q_BLHD, k_BSKD, v_BSKD, q_seg_BL, kv_seg_BS):
  """Attention of unpadded BLHD inputs on the Triton tiling `t` (backend 'gpu', or 'interpret'
  to run these kernels in the interpreter)."""
  head_dim = q_BLHD.shape[-1]
  d_pad = max(16, 1 << (head_dim - 1).bit_length())
  pad = lambda x, length: jnp.pad(pad_len(x, length), ((0, 0),) * 3 + ((0, d_pad - head_dim),))
  q, k, v = pad(q_BLHD, t.q_len_pad), pad(k_BSKD, t.kv_len_pad), pad(v_BSKD, t.kv_len_pad)
  if q_seg_BL is not None:
    q_seg_BL = pad_len(q_seg_BL, t.q_len_pad, mode='edge')[:, :, None]
    kv_seg_BS = pad_len(kv_seg_BS, t.kv_len_pad, mode='edge')[:, None, :]
  out = _attend(t, q, k, v, q_seg_BL, kv_seg_BS)
  return out[:, :t.q_len, :, :head_dim]
