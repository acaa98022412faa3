"""Reading block-quantised weights (int8 / NF4) inside the model.

A quantised weight is stored as a small dict in place of its array: {'int8': int8 codes, shape of
the weight} or {'nf4': uint8, two 4-bit codes a byte along the last axis}, with 'absmax' of shape
`(in_size // block,) + out_shape`: one float32 scale per block of rows of the flattened input
dimension and per output column (`lmjax.peft.quant` writes them). `dequantize_weight` decodes one;
`layers.param_with_axes` calls it, so a quantised frozen base is decoded one layer at a time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

# The 16 NormalFloat-4 levels of QLoRA (Dettmers et al. 2023, bitsandbytes' NF4 table).
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)


def is_quantized_leaf(value) -> bool:
  return isinstance(value, Mapping) and 'absmax' in value and ('int8' in value or 'nf4' in value)


def unpack_nibbles(packed):
  lo, hi = packed & 0xF, packed >> 4
  return jnp.stack([lo, hi], axis=-1).reshape(packed.shape[:-1] + (packed.shape[-1] * 2,))


def dequantize_weight(leaf: dict, shape: tuple, dtype=jnp.float32):
  """The float weight a quantised leaf stands for. `shape` is one weight's shape; leading dims
  beyond it (the stacked layer axis) are kept."""
  if 'int8' in leaf:
    values = leaf['int8'].astype(jnp.float32)
  else:
    values = jnp.asarray(NF4_LEVELS)[unpack_nibbles(leaf['nf4']).astype(jnp.int32)]
  lead = values.shape[:values.ndim - len(shape)]
  absmax = leaf['absmax']
  blocks = absmax.shape[len(lead)]
  n_out = math.prod(absmax.shape[len(lead) + 1:])
  block = math.prod(shape) // n_out // blocks
  w = values.reshape(lead + (blocks, block, n_out)) * absmax.reshape(lead + (blocks, 1, n_out))
  return w.reshape(values.shape).astype(dtype)
