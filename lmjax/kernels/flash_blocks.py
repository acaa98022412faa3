"""Block-level flash attention for ring attention: one q block against one kv block.

`attention_block` attends queries at global positions `q_offset + [0, Lq)` to keys at
`kv_offset + [0, Lk)` (the offsets may be traced values, e.g. from `lax.axis_index`) and returns
the output together with its per-row log-sum-exp. Results over disjoint kv blocks combine with the
online-softmax rule (`merge`):

  lse = logaddexp(lse_a, lse_b);  o = exp(lse_a - lse) o_a + exp(lse_b - lse) o_b

Both outputs are differentiable: the kernels' backward takes the cotangent of lse as well
(delta = rowsum(o do) - dlse), so gradients through a merge are exact. Runs on the TPU tiling
(Mosaic, or the interpreter on CPU).
"""

from __future__ import annotations

import jax.numpy as jnp

from lmjax.kernels import flash_common as common
from lmjax.kernels import flash_tpu


def attention_block(q_BLHD, k_BSKD, v_BSKD, segment_ids=None, *, q_offset=0, kv_offset=0,
                    causal: bool = True, sliding_window: int = 0, block_q: int | None = None,
                    block_k: int | None = None, block_q_bwd: int | None = None,
                    block_k_bwd: int | None = None, backend: str | None = None):
  """(o_BLHD in q's dtype, lse_BHL float32) of one q block against one kv block.

  `segment_ids` is a pair (q_ids_BL, kv_ids_BS) (or one array when the lengths match). Rows with
  no visible key have o = 0 and lse = -inf (they weigh nothing in a merge).
  """
  q, k, v = q_BLHD, k_BSKD, v_BSKD
  common.check_args(q, k, v, sliding_window)
  backend = common.resolve_backend(backend, None)
  if backend == 'gpu':
    raise ValueError('flash attention: the block API runs on the TPU tiling (backend tpu or '
                     'interpret), not on gpu')
  batch, q_len = q.shape[:2]
  q_seg, kv_seg = common.split_segments(segment_ids, batch, q_len, k.shape[1])
  t = common.make_tiling(q, k, q_seg is not None, causal=causal, window=sliding_window,
                         backend=backend, blocks=(block_q, block_k, block_q_bwd, block_k_bwd))
  o_BHLD, lse_BH1L = flash_tpu.attend(t, *common.to_kernel_layout(t, q, k, v, q_seg, kv_seg),
                                      common.as_offsets(q_offset, kv_offset))
  lse_BHL = lse_BH1L[:, :, 0, :q_len]
  return o_BHLD.transpose(0, 2, 1, 3)[:, :q_len], jnp.where(lse_BHL == jnp.inf, -jnp.inf, lse_BHL)


def merge(o_a_BLHD, lse_a_BHL, o_b_BLHD, lse_b_BHL):
  """Combines two blocks' (o, lse) over disjoint keys into the (o, lse) over their union."""
  lse_BHL = jnp.logaddexp(lse_a_BHL, lse_b_BHL)
  lse_safe = jnp.where(lse_BHL == -jnp.inf, 0.0, lse_BHL)
  weight = lambda lse: jnp.swapaxes(jnp.exp(lse - lse_safe), 1, 2)[..., None]  # (B, L, H, 1)
  o = weight(lse_a_BHL) * o_a_BLHD.astype(jnp.float32) + weight(
      lse_b_BHL) * o_b_BLHD.astype(jnp.float32)
  return o.astype(o_a_BLHD.dtype), lse_BHL
