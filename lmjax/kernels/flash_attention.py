"""Flash attention (forward + backward) written in Pallas.

Tiling
------
Activations are BLHD (batch, length, heads, head_dim). Lengths are padded in the
wrapper to a multiple of the block sizes and the padding is masked by index.

* Forward, grid (batch, q_heads, q_blocks): a program owns one
  ``block_q x head_dim`` tile of queries and streams over ``block_k`` tiles of
  keys/values of its kv head ``h // group`` (K/V are never repeated for
  GQA/MQA: the BlockSpec index map picks the kv head). The stream is an
  in-kernel ``fori_loop`` whose bounds come from the causal / sliding-window
  structure, so fully masked tiles are never loaded nor multiplied.
* Online softmax (all float32): keep per query row the running max ``m``, the
  running denominator ``l`` and an unnormalised accumulator ``acc``; for a new
  tile of scores ``s``::

      m' = max(m, rowmax(s));  p = exp(s - m');  c = exp(m - m')
      l' = c * l + rowsum(p);  acc' = c * acc + p @ v

  and finally ``o = acc / l``. The per-row logsumexp ``m + log(l)`` is saved
  (O(L) memory) so the backward pass can recompute ``p = exp(s - lse)``.
  A row with no allowed key keeps ``m = -inf, l = 0``: we output 0 and store
  ``lse = +inf`` so every recomputed probability (and gradient) is exactly 0.
* Backward: ``delta = rowsum(o * do)`` is computed in XLA (O(L*D)). The dq
  kernel (grid batch, q_heads, q_blocks) loops over kv tiles:
  ``ds = p * (do @ v^T - delta)``, ``dq += ds @ k``. The dk/dv kernel (grid
  batch, kv_heads, kv_blocks) loops over the query heads of its GQA group and
  over the q tiles that can see its kv tile: ``dv += p^T @ do``,
  ``dk += ds^T @ q``; the GQA reduction therefore happens in-kernel in float32
  (no atomics, no per-q-head dk/dv buffers).

Backends: ``interpret=True`` (CPU, used by tests), Triton on GPU
(``num_warps`` / ``num_stages`` compiler params) and Mosaic on TPU (same
kernels on a BHLD layout with "parallel" grid semantics; untested, and it keeps
the whole per-head K/V (resp. Q/dO) in VMEM, so it is limited to moderate
sequence lengths).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

_NEG_INF = float("-inf")
# Testing hook: force the "BLHD" (GPU / interpret) or "BHLD" (TPU) layout.
_FORCE_LAYOUT: str | None = None
_S = pl.squeezed  # squeezed block dimension


@dataclasses.dataclass(frozen=True)
class _Config:
  causal: bool
  window: int
  q_len: int  # true (unpadded) lengths
  kv_len: int
  q_len_pad: int
  kv_len_pad: int
  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int
  group: int  # q heads per kv head
  scale: float
  has_segments: bool
  backend: str  # "interpret" | "gpu" | "tpu"
  layout: str  # "BLHD" | "BHLD"

  @property
  def q_padded(self) -> bool:
    return self.q_len_pad != self.q_len

  @property
  def kv_padded(self) -> bool:
    return self.kv_len_pad != self.kv_len


# --------------------------------------------------------------------------- #
# Shared kernel helpers
# --------------------------------------------------------------------------- #
def _dot(a, b, contract_a: int, contract_b: int):
  return lax.dot_general(
      a, b, (((contract_a,), (contract_b,)), ((), ())),
      preferred_element_type=jnp.float32)


def _mask(cfg: _Config, q_start, k_start, shape, q_seg, k_seg):
  """Boolean (bq, bk) mask of allowed (query, key) pairs, or None (all ok).

  ``q_seg`` is a (bq, 1) column and ``k_seg`` a (1, bk) row of segment ids.
  """
  conds = []
  if cfg.causal or cfg.window > 0 or cfg.q_padded or cfg.kv_padded:
    qi = q_start + lax.broadcasted_iota(jnp.int32, shape, 0)
    ki = k_start + lax.broadcasted_iota(jnp.int32, shape, 1)
    if cfg.causal:
      conds.append(ki <= qi)
    if cfg.window > 0:
      conds.append(qi - ki < cfg.window)
    if cfg.kv_padded:
      conds.append(ki < cfg.kv_len)
    if cfg.q_padded:
      conds.append(qi < cfg.q_len)
  if q_seg is not None:
    conds.append(q_seg == k_seg)
  if not conds:
    return None
  return functools.reduce(jnp.logical_and, conds)


def _kv_block_range(cfg: _Config, q_start, bq: int, bk: int):
  """[lo, hi) kv-block indices that can hold allowed keys for a q tile."""
  lo, hi = 0, cfg.kv_len_pad // bk
  if cfg.causal:  # the last query of the tile sees keys <= q_start + bq - 1
    hi = jnp.minimum(hi, lax.div(q_start + bq - 1, bk) + 1)
  if cfg.window > 0:  # the first query sees keys >= q_start - window + 1
    lo = lax.div(jnp.maximum(q_start - cfg.window + 1, 0), bk)
  return lo, hi


def _q_block_range(cfg: _Config, k_start, bq: int, bk: int):
  """[lo, hi) q-block indices whose queries can see some key of a kv tile."""
  lo, hi = 0, cfg.q_len_pad // bq
  if cfg.causal:  # queries >= first key of the tile
    lo = lax.div(k_start, bq)
  if cfg.window > 0:  # queries <= last key + window - 1
    hi = jnp.minimum(hi, lax.div(k_start + bk + cfg.window - 2, bq) + 1)
  return lo, hi


def _split_refs(refs, cfg: _Config):
  """Splits kernel refs into (q, k, v), (q_seg, kv_seg), rest."""
  qkv = refs[:3]
  if cfg.has_segments:
    return qkv, refs[3:5], refs[5:]
  return qkv, (None, None), refs[3:]


# --------------------------------------------------------------------------- #
# Kernels
# --------------------------------------------------------------------------- #
def _fwd_kernel(*refs, cfg: _Config):
  (q_ref, k_ref, v_ref), (qseg_ref, kseg_ref), (o_ref, lse_ref) = (
      _split_refs(refs, cfg))
  bq, bk = cfg.block_q, cfg.block_k
  q_start = pl.program_id(2) * bq
  q = q_ref[...]
  q_seg = None if qseg_ref is None else qseg_ref[...]
  head_dim = q.shape[-1]

  def body(j, carry):
    acc, m, l = carry
    k_start = pl.multiple_of(j * bk, bk)
    k = k_ref[pl.ds(k_start, bk), :]
    v = v_ref[pl.ds(k_start, bk), :]
    s = _dot(q, k, 1, 1) * cfg.scale  # (bq, bk) float32
    k_seg = None if kseg_ref is None else kseg_ref[:, pl.ds(k_start, bk)]
    mask = _mask(cfg, q_start, k_start, (bq, bk), q_seg, k_seg)
    if mask is not None:
      s = jnp.where(mask, s, _NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))  # (bq, 1)
    m_safe = jnp.where(m_new == _NEG_INF, 0.0, m_new)  # all-masked so far
    p = jnp.exp(s - m_safe)
    corr = jnp.exp(m - m_safe)
    l = corr * l + jnp.sum(p, axis=1, keepdims=True)
    acc = corr * acc + _dot(p.astype(v.dtype), v, 1, 0)
    return acc, m_new, l

  lo, hi = _kv_block_range(cfg, q_start, bq, bk)
  init = (jnp.zeros((bq, head_dim), jnp.float32),
          jnp.full((bq, 1), _NEG_INF, jnp.float32),
          jnp.zeros((bq, 1), jnp.float32))
  acc, m, l = lax.fori_loop(lo, hi, body, init)
  empty = l == 0.0
  l_safe = jnp.where(empty, 1.0, l)
  o_ref[...] = (acc * (1.0 / l_safe)).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log(l_safe))


def _dq_kernel(*refs, cfg: _Config):
  (q_ref, k_ref, v_ref), (qseg_ref, kseg_ref), rest = _split_refs(refs, cfg)
  do_ref, lse_ref, delta_ref, dq_ref = rest
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  q_start = pl.program_id(2) * bq
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]
  q_seg = None if qseg_ref is None else qseg_ref[...]

  def body(j, dq):
    k_start = pl.multiple_of(j * bk, bk)
    k = k_ref[pl.ds(k_start, bk), :]
    v = v_ref[pl.ds(k_start, bk), :]
    s = _dot(q, k, 1, 1) * cfg.scale
    p = jnp.exp(s - lse)  # lse: (bq, 1)
    k_seg = None if kseg_ref is None else kseg_ref[:, pl.ds(k_start, bk)]
    mask = _mask(cfg, q_start, k_start, (bq, bk), q_seg, k_seg)
    if mask is not None:
      p = jnp.where(mask, p, 0.0)
    dp = _dot(do, v, 1, 1)
    ds = p * (dp - delta)
    return dq + _dot(ds.astype(k.dtype), k, 1, 0)

  lo, hi = _kv_block_range(cfg, q_start, bq, bk)
  dq = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg: _Config):
  (q_ref, k_ref, v_ref), (qseg_ref, kseg_ref), rest = _split_refs(refs, cfg)
  do_ref, lse_ref, delta_ref, dk_ref, dv_ref = rest
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  k_start = pl.program_id(2) * bk
  k = k_ref[...]
  v = v_ref[...]
  k_seg = None if kseg_ref is None else kseg_ref[...]

  if cfg.layout == "BLHD":  # q/do refs are (Lq, group, D)
    load = lambda ref, g, sl: ref[sl, g, :]
  else:  # (group, Lq, D)
    load = lambda ref, g, sl: ref[g, sl, :]

  lo, hi = _q_block_range(cfg, k_start, bq, bk)

  def head_body(g, carry):
    def body(i, carry):
      dk, dv = carry
      q_start = pl.multiple_of(i * bq, bq)
      sl = pl.ds(q_start, bq)
      q = load(q_ref, g, sl)
      do = load(do_ref, g, sl)
      lse = lse_ref[g, sl, :]  # (bq, 1)
      delta = delta_ref[g, sl, :]
      s = _dot(q, k, 1, 1) * cfg.scale  # (bq, bk)
      p = jnp.exp(s - lse)
      q_seg = None if qseg_ref is None else qseg_ref[sl, :]
      mask = _mask(cfg, q_start, k_start, (bq, bk), q_seg, k_seg)
      if mask is not None:
        p = jnp.where(mask, p, 0.0)
      dv = dv + _dot(p.astype(do.dtype), do, 0, 0)  # p^T @ do
      dp = _dot(do, v, 1, 1)
      ds = p * (dp - delta)
      dk = dk + _dot(ds.astype(q.dtype), q, 0, 0)  # ds^T @ q
      return dk, dv
    return lax.fori_loop(lo, hi, body, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, cfg.group, head_body, (zeros, zeros))
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# --------------------------------------------------------------------------- #
# Backend specifics: block specs per layout and compiler params
# --------------------------------------------------------------------------- #
def _specs(cfg: _Config, head_dim: int):
  """Returns a function building 4-D BlockSpecs for the current layout."""

  def spec(block_len, head_block, idx):
    hb = _S if head_block is None else head_block
    if cfg.layout == "BLHD":
      return pl.BlockSpec((_S, block_len, hb, head_dim),
                          lambda *g: (idx(*g)[0], idx(*g)[1], idx(*g)[2], 0))
    return pl.BlockSpec((_S, hb, block_len, head_dim),
                        lambda *g: (idx(*g)[0], idx(*g)[2], idx(*g)[1], 0))
  return spec


def _compiler_params(cfg: _Config, head_dim: int, bq: int, bk: int,
                     num_grid_dims: int = 3):
  if cfg.backend == "gpu":
    from jax.experimental.pallas import triton as plgpu
    big = bq * head_dim >= 128 * 128 or bk * head_dim >= 128 * 128
    return plgpu.CompilerParams(num_warps=8 if big else 4, num_stages=2)
  if cfg.backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.CompilerParams(
        dimension_semantics=("parallel",) * num_grid_dims)
  return None


# --------------------------------------------------------------------------- #
# pallas_call wrappers
# --------------------------------------------------------------------------- #
def _fwd(cfg: _Config, q, k, v, q_seg, kv_seg):
  batch, num_heads, head_dim = q.shape[0], _heads(q, cfg), q.shape[-1]
  bq, bk = cfg.block_q, cfg.block_k
  spec = _specs(cfg, head_dim)
  g = cfg.group
  grid = (batch, num_heads, cfg.q_len_pad // bq)
  in_specs = [
      spec(bq, None, lambda b, h, i: (b, i, h)),
      spec(cfg.kv_len_pad, None, lambda b, h, i: (b, 0, h // g)),
      spec(cfg.kv_len_pad, None, lambda b, h, i: (b, 0, h // g)),
  ]
  args = [q, k, v]
  if cfg.has_segments:
    in_specs += _segment_specs(cfg, bq)
    args += [q_seg, kv_seg]
  out_specs = [spec(bq, None, lambda b, h, i: (b, i, h)),
               pl.BlockSpec((_S, _S, bq, 1), lambda b, h, i: (b, h, i, 0))]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((batch, num_heads, cfg.q_len_pad, 1),
                                    jnp.float32)]
  o, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg),
      grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      interpret=cfg.backend == "interpret",
      compiler_params=_compiler_params(cfg, head_dim, bq, bk),
      name="flash_attention_fwd",
  )(*args)
  return o, lse


def _segment_specs(cfg: _Config, block_q: int):
  """Segment-id BlockSpecs for a (batch, head, query block) grid: this query block's ids and
  every key's."""
  return [pl.BlockSpec((_S, block_q, 1), lambda b, h, i: (b, i, 0)),
          pl.BlockSpec((_S, 1, cfg.kv_len_pad), lambda b, h, i: (b, 0, 0))]


def _heads(x, cfg: _Config) -> int:
  return x.shape[2] if cfg.layout == "BLHD" else x.shape[1]


def _bwd_dq(cfg: _Config, q, k, v, q_seg, kv_seg, do, lse, delta):
  batch, num_heads, head_dim = q.shape[0], _heads(q, cfg), q.shape[-1]
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  spec = _specs(cfg, head_dim)
  g = cfg.group
  q_spec = spec(bq, None, lambda b, h, i: (b, i, h))
  kv_spec = spec(cfg.kv_len_pad, None, lambda b, h, i: (b, 0, h // g))
  row_spec = pl.BlockSpec((_S, _S, bq, 1), lambda b, h, i: (b, h, i, 0))
  in_specs = [q_spec, kv_spec, kv_spec]
  args = [q, k, v]
  if cfg.has_segments:
    in_specs += _segment_specs(cfg, bq)
    args += [q_seg, kv_seg]
  in_specs += [q_spec, row_spec, row_spec]
  args += [do, lse, delta]
  return pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg),
      grid=(batch, num_heads, cfg.q_len_pad // bq),
      in_specs=in_specs, out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      interpret=cfg.backend == "interpret",
      compiler_params=_compiler_params(cfg, head_dim, bq, bk),
      name="flash_attention_bwd_dq",
  )(*args)


def _bwd_dkv(cfg: _Config, q, k, v, q_seg, kv_seg, do, lse, delta):
  batch, num_kv_heads, head_dim = k.shape[0], _heads(k, cfg), k.shape[-1]
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  spec = _specs(cfg, head_dim)
  g = cfg.group
  # All query heads of the kv head's group, whole (padded) query length.
  qg_spec = spec(cfg.q_len_pad, g, lambda b, h, j: (b, 0, h))
  kv_spec = spec(bk, None, lambda b, h, j: (b, j, h))
  row_spec = pl.BlockSpec((_S, g, cfg.q_len_pad, 1),
                          lambda b, h, j: (b, h, 0, 0))
  in_specs = [qg_spec, kv_spec, kv_spec]
  args = [q, k, v]
  if cfg.has_segments:
    in_specs += [pl.BlockSpec((_S, cfg.q_len_pad, 1),
                              lambda b, h, j: (b, 0, 0)),
                 pl.BlockSpec((_S, 1, bk), lambda b, h, j: (b, 0, j))]
    args += [q_seg, kv_seg]
  in_specs += [qg_spec, row_spec, row_spec]
  args += [do, lse, delta]
  return pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg),
      grid=(batch, num_kv_heads, cfg.kv_len_pad // bk),
      in_specs=in_specs, out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      interpret=cfg.backend == "interpret",
      compiler_params=_compiler_params(cfg, head_dim, bq, bk),
      name="flash_attention_bwd_dkv",
  )(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Config, q, k, v, q_seg, kv_seg):
  return _fwd(cfg, q, k, v, q_seg, kv_seg)[0]


def _flash_fwd(cfg: _Config, q, k, v, q_seg, kv_seg):
  o, lse = _fwd(cfg, q, k, v, q_seg, kv_seg)
  return o, (q, k, v, q_seg, kv_seg, o, lse)


def _flash_bwd(cfg: _Config, res, do):
  q, k, v, q_seg, kv_seg, o, lse = res
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1,
                  keepdims=True)
  if cfg.layout == "BLHD":
    delta = jnp.swapaxes(delta, 1, 2)  # (B, L, H, 1) -> (B, H, L, 1)
  args = (q, k, v, q_seg, kv_seg, do, lse, delta)
  dq = _bwd_dq(cfg, *args)
  dk, dv = _bwd_dkv(cfg, *args)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #
def _is_pow2(x: int) -> bool:
  return x > 0 and (x & (x - 1)) == 0


def _pick_block(block: int, length: int, name: str) -> int:
  if not _is_pow2(block) or block < 16:
    raise ValueError(f"{name}={block} must be a power of two >= 16")
  return min(block, max(16, pl.next_power_of_2(length)))


def _round_up(x: int, m: int) -> int:
  return (x + m - 1) // m * m


def flash_attention(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL=None, *,
                    causal: bool = True, sliding_window: int = 0,
                    block_q: int = 128, block_k: int = 128,
                    interpret: bool | None = None,
                    block_q_bwd: int | None = None,
                    block_k_bwd: int | None = None):
  """Memory-efficient attention ``softmax(q k^T / sqrt(D) + mask) v``.

  Args:
    q_BLHD: queries (batch, q_len, num_heads, head_dim), f32 or bf16.
    k_BLKD, v_BLKD: keys / values (batch, kv_len, num_kv_heads, head_dim);
      ``num_heads % num_kv_heads == 0`` (MHA / GQA / MQA).
    segment_ids_BL: optional int32 (batch, len) packed-document ids shared by
      queries and keys (requires q_len == kv_len), or a tuple
      ``(q_segment_ids, kv_segment_ids)``. A query only attends to keys with
      the same id.
    causal: key j is visible to query i only if j <= i (q_len == kv_len).
    sliding_window: if > 0, additionally require ``i - j < sliding_window``
      (one-sided; with ``causal=False`` keys to the right stay visible).
    block_q, block_k: forward tile sizes (powers of two >= 16); clipped to the
      padded sequence length.
    interpret: run the kernels in the Pallas interpreter; None means
      ``jax.default_backend() == "cpu"``.
    block_q_bwd, block_k_bwd: backward tile sizes (default ``min(block, 64)``).

  Returns:
    (batch, q_len, num_heads, head_dim) in the dtype of ``q``. Query rows with
    no visible key are 0 (and get zero gradient).
  """
  q, k, v = q_BLHD, k_BLKD, v_BLKD
  if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
    raise ValueError(f"bad shapes q={q.shape} k={k.shape} v={v.shape}")
  batch, q_len, num_heads, head_dim = q.shape
  kb, kv_len, num_kv_heads, kd = k.shape
  if kb != batch or kd != head_dim:
    raise ValueError(f"q {q.shape} and k {k.shape} disagree")
  if num_heads % num_kv_heads:
    raise ValueError(f"num_heads={num_heads} not a multiple of "
                     f"num_kv_heads={num_kv_heads}")
  if (causal or sliding_window > 0) and q_len != kv_len:
    raise ValueError("causal / sliding_window attention needs q_len == kv_len"
                     f", got {q_len} and {kv_len}")
  if sliding_window < 0:
    raise ValueError(f"sliding_window={sliding_window} must be >= 0")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"dtypes differ: {q.dtype} {k.dtype} {v.dtype}")

  q_seg = kv_seg = None
  if segment_ids_BL is not None:
    if isinstance(segment_ids_BL, (tuple, list)):
      q_seg, kv_seg = segment_ids_BL
    else:
      if q_len != kv_len:
        raise ValueError("a single segment_ids array needs q_len == kv_len; "
                         "pass (q_segment_ids, kv_segment_ids)")
      q_seg = kv_seg = segment_ids_BL
    if q_seg.shape != (batch, q_len) or kv_seg.shape != (batch, kv_len):
      raise ValueError(f"segment ids {q_seg.shape}/{kv_seg.shape} do not "
                       f"match (batch, len) = ({batch}, {q_len}/{kv_len})")
    q_seg = q_seg.astype(jnp.int32)
    kv_seg = kv_seg.astype(jnp.int32)

  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  if interpret:
    backend = "interpret"
  else:
    backend = "tpu" if jax.default_backend() == "tpu" else "gpu"
  layout = "BHLD" if backend == "tpu" else "BLHD"
  if _FORCE_LAYOUT is not None:  # tests: exercise the TPU layout on CPU
    layout = _FORCE_LAYOUT

  bq = _pick_block(block_q, q_len, "block_q")
  bk = _pick_block(block_k, kv_len, "block_k")
  bq_bwd = min(bq, 64) if block_q_bwd is None else block_q_bwd
  bk_bwd = min(bk, 64) if block_k_bwd is None else block_k_bwd
  for name, b, f in (("block_q_bwd", bq_bwd, bq), ("block_k_bwd", bk_bwd, bk)):
    if not _is_pow2(b) or b < 16 or b > f:
      raise ValueError(f"{name}={b} must be a power of two in [16, {f}]")

  q_len_pad, kv_len_pad = _round_up(q_len, bq), _round_up(kv_len, bk)
  # Triton wants power-of-two tiles: pad head_dim with zeros (exact).
  d_pad = max(16, pl.next_power_of_2(head_dim))

  def pad(x, length):
    widths = [(0, 0), (0, length - x.shape[1]), (0, 0), (0, d_pad - head_dim)]
    return jnp.pad(x, widths) if any(w[1] for w in widths) else x

  q, k, v = pad(q, q_len_pad), pad(k, kv_len_pad), pad(v, kv_len_pad)
  if q_seg is not None:
    # (B, L, 1) column / (B, 1, L) row: no in-kernel reshapes needed.
    q_seg = jnp.pad(q_seg, ((0, 0), (0, q_len_pad - q_len)))[:, :, None]
    kv_seg = jnp.pad(kv_seg, ((0, 0), (0, kv_len_pad - kv_len)))[:, None, :]
  if layout == "BHLD":
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))

  cfg = _Config(
      causal=bool(causal), window=int(sliding_window),
      q_len=q_len, kv_len=kv_len, q_len_pad=q_len_pad, kv_len_pad=kv_len_pad,
      block_q=bq, block_k=bk, block_q_bwd=bq_bwd, block_k_bwd=bk_bwd,
      group=num_heads // num_kv_heads, scale=1.0 / math.sqrt(head_dim),
      has_segments=q_seg is not None, backend=backend, layout=layout)
  out = _flash(cfg, q, k, v, q_seg, kv_seg)
  if layout == "BHLD":
    out = jnp.swapaxes(out, 1, 2)
  return out[:, :q_len, :, :head_dim]
