"""What every flash-attention backend shares: argument checks, the static tiling, masks by global
position, and the ranges of blocks that can hold a visible (query, key) pair.

Positions are global: a q block of a call starts at `q_offset + i * block_q` and a kv block at
`kv_offset + j * block_k`, where the offsets are runtime int32 scalars (zero for a whole-sequence
call, a device's shard start for ring attention). A query at position `qp` may see a key at `kp`
when `kp <= qp` (causal), `qp - kp < window` (sliding window), both carry the same segment id, and
the key is not padding (local index below `kv_len`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
from jax import lax

NEG_INF = float('-inf')
BACKENDS = ('tpu', 'gpu', 'interpret')
TPU_LANES = 128  # TPU tiles are (8, 128): the kv block is a segment-id row's lane dimension


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Static description of one call: lengths (true and padded), blocks and masks."""
  causal: bool
  window: int
  q_len: int
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
  backend: str

  @property
  def kv_padded(self) -> bool:
    return self.kv_len_pad != self.kv_len


def dot(a, b, contract_a: int, contract_b: int):
  """2-D matmul contracting the given dims, accumulated in float32."""
  return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                         preferred_element_type=jnp.float32)


def block_mask(t: Tiling, q_first, k_first, k_start, shape, q_seg, k_seg, *,
               transposed: bool = False):
  """Boolean mask of visible pairs, or None when every pair is visible.

  (bq, bk) with queries on rows, or (bk, bq) with keys on rows when `transposed`. `q_first`,
  `k_first`: global positions of the block's first query / key; `k_start`: the kv block's local
  start (for padding); `q_seg`, `k_seg`: ids shaped to broadcast against the mask.
  """
  q_axis, k_axis = (1, 0) if transposed else (0, 1)
  conds = []
  if t.causal or t.window > 0:
    qp = q_first + lax.broadcasted_iota(jnp.int32, shape, q_axis)
    kp = k_first + lax.broadcasted_iota(jnp.int32, shape, k_axis)
    if t.causal:
      conds.append(kp <= qp)
    if t.window > 0:
      conds.append(qp - kp < t.window)
  if t.kv_padded:
    conds.append(k_start + lax.broadcasted_iota(jnp.int32, shape, k_axis) < t.kv_len)
  if q_seg is not None:
    conds.append(q_seg == k_seg)
  if not conds:
    return None
  return functools.reduce(jnp.logical_and, conds)


def kv_block_range(t: Tiling, rel, bq: int, bk: int, num_kv_blocks: int):
  """[lo, hi) kv blocks that may hold keys visible to a q block whose first query sits at `rel`
  in the kv call's local coordinates (`q_offset + q_start - kv_offset`)."""
  lo, hi = jnp.int32(0), jnp.int32(num_kv_blocks)
  if t.causal:  # the block's last query sees keys <= rel + bq - 1
    last = rel + bq - 1
    hi = jnp.minimum(hi, jnp.where(last < 0, 0, lax.div(jnp.maximum(last, 0), bk) + 1))
  if t.window > 0:  # its first query sees keys >= rel - window + 1
    lo = lax.div(jnp.maximum(rel - t.window + 1, 0), bk)
  return lo, hi


def q_block_range(t: Tiling, rel, bq: int, bk: int, num_q_blocks: int):
  """[lo, hi) q blocks whose queries may see a key of a kv block whose first key sits at `rel`
  in the q call's local coordinates (`kv_offset + k_start - q_offset`)."""
  lo, hi = jnp.int32(0), jnp.int32(num_q_blocks)
  if t.causal:  # queries at or after the block's first key
    lo = lax.div(jnp.maximum(rel, 0), bq)
  if t.window > 0:  # queries at most window - 1 after its last key
    last = rel + bk + t.window - 2
    hi = jnp.minimum(hi, jnp.where(last < 0, 0, lax.div(jnp.maximum(last, 0), bq) + 1))
  return lo, hi


def clamp_index(j, lo, hi, num_blocks: int):
  """`j` moved into [lo, hi) (any valid block when the range is empty): a skipped program asks
  for a block its neighbour already holds, so the pipeline issues no copy for it."""
  j = jnp.minimum(jnp.maximum(j, lo), jnp.maximum(hi - 1, lo))
  return jnp.minimum(j, num_blocks - 1)


def segment_block_ranges(seg_BL, block: int):
  """Per-block (min, max) of segment ids, flattened to (B * num_blocks,) int32: a q block and a
  kv block whose ranges do not intersect share no id, so the pair is skipped."""
  batch, length = seg_BL.shape
  blocks = seg_BL.reshape(batch, length // block, block)
  return blocks.min(-1).reshape(-1), blocks.max(-1).reshape(-1)


def _is_pow2(x: int) -> bool:
  return x > 0 and (x & (x - 1)) == 0


def round_up(x: int, m: int) -> int:
  return (x + m - 1) // m * m


def pick_block(block: int, length: int, name: str, backend: str) -> int:
  """The block for `length`: `block` clipped to the length (rounded up to a power of two, and on
  TPU to at least the 128 lanes of a tile)."""
  smallest = {'tpu': TPU_LANES, 'gpu': 16}.get(backend, 8)
  if not _is_pow2(block) or block < smallest:
    raise ValueError(f'{name}={block} must be a power of two >= {smallest} on backend {backend}')
  return min(block, max(smallest, 1 << max(0, length - 1).bit_length()))


def check_args(q, k, v, sliding_window: int):
  """Shapes and options; raises a one-line ValueError."""
  if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
    raise ValueError(f'flash attention: bad shapes q={q.shape} k={k.shape} v={v.shape}; want '
                     '(batch, len, heads, head_dim) with k and v alike')
  batch, _, num_heads, head_dim = q.shape
  kb, _, num_kv_heads, kd = k.shape
  if kb != batch or kd != head_dim:
    raise ValueError(f'flash attention: q {q.shape} and k {k.shape} disagree on batch/head_dim')
  if num_heads % num_kv_heads:
    raise ValueError(f'flash attention: num_heads={num_heads} not a multiple of '
                     f'num_kv_heads={num_kv_heads}')
  if sliding_window < 0:
    raise ValueError(f'flash attention: sliding_window={sliding_window} must be >= 0')
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f'flash attention: dtypes differ: {q.dtype} {k.dtype} {v.dtype}')


def split_segments(segment_ids, batch: int, q_len: int, kv_len: int):
  """(q_seg_BL, kv_seg_BS) int32 from one shared array or a (q, kv) pair (or (None, None))."""
  if segment_ids is None:
    return None, None
  if isinstance(segment_ids, (tuple, list)):
    q_seg, kv_seg = segment_ids
  else:
    if q_len != kv_len:
      raise ValueError('flash attention: one segment_ids array needs q_len == kv_len; pass '
                       '(q_segment_ids, kv_segment_ids)')
    q_seg = kv_seg = segment_ids
  if q_seg.shape != (batch, q_len) or kv_seg.shape != (batch, kv_len):
    raise ValueError(f'flash attention: segment ids {q_seg.shape}/{kv_seg.shape} do not match '
                     f'(batch, len) = ({batch}, {q_len}/{kv_len})')
  return q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)


def default_blocks(backend: str) -> tuple[int, int, int, int]:
  """(block_q, block_k, block_q_bwd, block_k_bwd) defaults of a backend."""
  if backend == 'gpu':
    return 128, 128, 64, 64
  return 512, 512, 256, 256


def make_tiling(q, k, has_segments: bool, *, causal: bool, window: int, backend: str,
                blocks) -> Tiling:
  """The static tiling of a call; `blocks` = (block_q, block_k, block_q_bwd, block_k_bwd), each
  None for the backend's default. Padded lengths are multiples of both the forward and the
  backward blocks."""
  _, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  names = ('block_q', 'block_k', 'block_q_bwd', 'block_k_bwd')
  picked = []
  for name, given, default, length in zip(names, blocks, default_blocks(backend),
                                          (q_len, kv_len, q_len, kv_len)):
    picked.append(pick_block(default if given is None else given, length, name, backend))
  bq, bk, bq_bwd, bk_bwd = picked
  return Tiling(
      causal=bool(causal), window=int(window), q_len=q_len, kv_len=kv_len,
      q_len_pad=round_up(q_len, max(bq, bq_bwd)), kv_len_pad=round_up(kv_len, max(bk, bk_bwd)),
      block_q=bq, block_k=bk, block_q_bwd=bq_bwd, block_k_bwd=bk_bwd,
      group=num_heads // num_kv_heads, scale=1.0 / math.sqrt(head_dim),
      has_segments=has_segments, backend=backend)


def target_backend() -> str:
  """'tpu' (Mosaic), 'gpu' (Triton) or 'interpret' for the devices the program is traced for."""
  from lmjax.parallel import target  # pylint: disable=g-import-not-at-top
  platform = target.platform()
  return platform if platform in ('tpu', 'gpu') else 'interpret'


def resolve_backend(backend: str | None, interpret: bool | None) -> str:
  if interpret:
    return 'interpret'
  if backend is None:
    return target_backend()
  if backend not in BACKENDS:
    raise ValueError(f'flash attention: backend={backend!r} must be one of {", ".join(BACKENDS)}')
  return backend


def pad_len(x, length: int, axis: int = 1, mode: str = 'constant'):
  """Pads axis `axis` of x to `length` (zeros, or the edge value)."""
  extra = length - x.shape[axis]
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, mode=mode)


def as_offsets(q_offset, kv_offset):
  """The (2,) int32 array of global start positions fed to the kernels."""
  return jnp.stack([jnp.asarray(q_offset, jnp.int32), jnp.asarray(kv_offset, jnp.int32)])



def to_kernel_layout(t: Tiling, q, k, v, q_seg, kv_seg):
  """Padded BHLD values and lane-dense (B, 1, L) rows of segment ids (or None).

  Padded keys are masked by index; segment ids are padded with their edge value so that the
  per-block id ranges are not widened.
  """
  q = pad_len(q, t.q_len_pad).transpose(0, 2, 1, 3)
  k = pad_len(k, t.kv_len_pad).transpose(0, 2, 1, 3)
  v = pad_len(v, t.kv_len_pad).transpose(0, 2, 1, 3)
  if q_seg is not None:
    q_seg = pad_len(q_seg, t.q_len_pad, mode='edge')[:, None, :]
    kv_seg = pad_len(kv_seg, t.kv_len_pad, mode='edge')[:, None, :]
  return q, k, v, q_seg, kv_seg
