"""Flash attention: the public entry point, choosing the kernels for the target devices.

  backend 'tpu'        Mosaic kernels on the streaming TPU tiling (`flash_tpu`);
  backend 'gpu'        Triton kernels (`flash_gpu`);
  backend 'interpret'  the TPU tiling run by the Pallas interpreter (CPU; what the tests check).

The backend comes from the devices of the mesh the program is traced for (`jax.set_mesh`; see
`lmjax.parallel.target`), never from the host's default backend: compiling for a TPU on a CPU host
takes the Mosaic path. Masks, tiling and the block-range arithmetic live in `flash_common`; the
block-level API for ring attention in `flash_blocks`.

A Mosaic or Triton call is not partitioned automatically: under a multi-device mesh call it inside
`jax.shard_map` (`lmjax.models.attention` does).
"""

from __future__ import annotations

from lmjax.kernels import flash_common as common
from lmjax.kernels import flash_gpu, flash_tpu


def flash_attention(q_BLHD, k_BSKD, v_BSKD, segment_ids_BL=None, *, causal: bool = True,
                    sliding_window: int = 0, block_q: int | None = None,
                    block_k: int | None = None, block_q_bwd: int | None = None,
                    block_k_bwd: int | None = None, backend: str | None = None,
                    interpret: bool | None = None, gpu_tiling: bool = False):
  """Memory-efficient `softmax(q k^T / sqrt(D) + mask) v`, differentiable in q, k and v.

  Args:
    q_BLHD: queries (batch, q_len, num_heads, head_dim), f32 or bf16.
    k_BSKD, v_BSKD: keys / values (batch, kv_len, num_kv_heads, head_dim);
      `num_heads % num_kv_heads == 0` (MHA / GQA / MQA; K/V are never repeated).
    segment_ids_BL: optional int (batch, len) ids shared by queries and keys, or a pair
      `(q_segment_ids, kv_segment_ids)`: a query only sees keys with its id.
    causal: key j is visible to query i only if j <= i (needs q_len == kv_len).
    sliding_window: if > 0, also require `i - j < sliding_window`.
    block_q, block_k, block_q_bwd, block_k_bwd: tiles (powers of two; on TPU multiples of 128),
      clipped to the length; None takes the backend's default (`flash_common.default_blocks`).
    backend: 'tpu', 'gpu' or 'interpret'; None reads the target devices.
    interpret: True forces 'interpret' (kept for callers of the older signature).
    gpu_tiling: with backend 'interpret', run the Triton kernels' tiling (tests).

  Returns:
    (batch, q_len, num_heads, head_dim) in q's dtype; rows with no visible key are 0 (and get
    zero gradients).
  """
  q, k, v = q_BLHD, k_BSKD, v_BSKD
  common.check_args(q, k, v, sliding_window)
  batch, q_len = q.shape[:2]
  kv_len = k.shape[1]
  if (causal or sliding_window > 0) and q_len != kv_len:
    raise ValueError('flash attention: causal / sliding_window needs q_len == kv_len, got '
                     f'{q_len} and {kv_len} (the block API takes offsets)')
  backend = common.resolve_backend(backend, interpret)
  q_seg, kv_seg = common.split_segments(segment_ids_BL, batch, q_len, kv_len)
  t = common.make_tiling(q, k, q_seg is not None, causal=causal, window=sliding_window,
                         backend=backend, blocks=(block_q, block_k, block_q_bwd, block_k_bwd))
  if backend == 'gpu' or gpu_tiling:
    return flash_gpu.flash_attention_gpu(t, q, k, v, q_seg, kv_seg)
  o_BHLD, _ = flash_tpu.attend(t, *common.to_kernel_layout(t, q, k, v, q_seg, kv_seg),
                               common.as_offsets(0, 0))
  return o_BHLD.transpose(0, 2, 1, 3)[:, :q_len]
