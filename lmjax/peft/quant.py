"""QLoRA-style quantised storage of a frozen base: `peft.base_dtype = int8 | nf4`.

Only matmul weights are quantised (the leaves `lora` knows how to see as an (in, out) matrix:
q/k/v/o, gate/up/down and lm_head, adapted or not). A weight of shape `lead + in_shape +
out_shape` (lead = the stacked layer axis under `scan_layers`) is cut into blocks of
`BLOCK = 64` consecutive rows of its flattened input dim (fewer, the largest power of two dividing
the input size, when that is not a multiple of 64), each block with its own float32 scale per
output column:
  int8: {'int8': int8 codes, shape of the weight;       'absmax': float32 scale = absmax / 127}
        w ~ code * scale, round to nearest: |w - deq| <= scale / 2
  nf4:  {'nf4': uint8, shape of the weight with the last axis halved (two 4-bit codes a byte:
        element 2j in the low nibble, 2j+1 in the high one); 'absmax': float32 block absmax}
        w ~ NF4_LEVELS[code] * absmax, the level nearest to w / absmax
`absmax` has shape `lead + (in_size // block,) + out_shape`. The other leaves (embedding, norm
scales, biases) stay float, in `REST_DTYPE` (bfloat16), and so does a weight whose last axis is odd
(nf4 cannot pack it).

The quantised leaf is a small dict in place of the array, so the frozen tree's paths end in
('q', 'nf4') / ('q', 'absmax'); `dequantize_tree` turns it back into the plain model tree inside
the jitted step (`lmjax.tasks.params.model_params`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lmjax.models.quantized import (NF4_LEVELS, dequantize_weight, is_quantized_leaf,
                                    unpack_nibbles)
from lmjax.peft import lora

QUANT_DTYPES = ('int8', 'nf4')
BLOCK = 64
REST_DTYPE = jnp.bfloat16
_NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2


def is_quantized(base_dtype: str) -> bool:
  return base_dtype in QUANT_DTYPES


def block_size(n_in: int) -> int:
  return math.gcd(n_in, BLOCK)


def quantizable(path: tuple, shape: tuple, fmt: str, stacked: bool) -> bool:
  """Whether the leaf at `path` is a matmul weight this format can store."""
  if path[-1] not in lora._IN_DIMS:  # pylint: disable=protected-access
    return False
  lead, _, out_shape = lora._split_shape(path, shape, stacked)  # pylint: disable=protected-access
  if len(shape) < len(lead) + 2 or not out_shape:
    return False
  return fmt != 'nf4' or shape[-1] % 2 == 0


def _blocks(path, shape, stacked):
  """(lead, n_in, out_shape, block) of a weight."""
  lead, n_in, out_shape = lora._split_shape(path, shape, stacked)  # pylint: disable=protected-access
  return lead, n_in, out_shape, block_size(n_in)


def pack_nibbles(codes):
  """uint8 codes in [0, 16) -> two a byte along the last axis (which must be even)."""
  codes = codes.astype(jnp.uint8)
  return codes[..., 0::2] | (codes[..., 1::2] << 4)


def nf4_codes(x):
  """Index of the NF4 level nearest to each x (x in [-1, 1])."""
  mid = jnp.asarray(_NF4_MIDPOINTS)
  return jnp.sum(x[..., None] > mid, axis=-1).astype(jnp.uint8)


def quantize(w, fmt: str, path: tuple, stacked: bool = False) -> dict:
  """The quantised leaf of weight `w` (see the module docstring)."""
  lead, n_in, out_shape, bs = _blocks(path, w.shape, stacked)
  n_out = math.prod(out_shape)
  w_bio = w.astype(jnp.float32).reshape(lead + (n_in // bs, bs, n_out))
  absmax = jnp.max(jnp.abs(w_bio), axis=-2, keepdims=True)  # lead + (nb, 1, out)
  safe = jnp.where(absmax > 0, absmax, 1.0)
  scale_shape = lead + (n_in // bs,) + out_shape
  if fmt == 'int8':
    scale = absmax / 127.0
    codes = jnp.clip(jnp.round(w_bio / jnp.where(scale > 0, scale, 1.0)), -127, 127)
    return {'int8': codes.astype(jnp.int8).reshape(w.shape),
            'absmax': scale.reshape(scale_shape)}
  if fmt == 'nf4':
    codes = nf4_codes(w_bio / safe).reshape(w.shape)
    return {'nf4': pack_nibbles(codes), 'absmax': absmax.reshape(scale_shape)}
  raise ValueError(f'peft.base_dtype: unknown quantised format {fmt!r}')


def dequantize(leaf: dict, path: tuple, stacked: bool = False, dtype=jnp.float32):
  """The float weight a quantised leaf stands for (`path` is the weight's own path)."""
  codes = leaf['int8'] if 'int8' in leaf else leaf['nf4']
  shape = codes.shape[:-1] + (codes.shape[-1] * (1 if 'int8' in leaf else 2),)
  lead, _, _ = lora._split_shape(path, shape, stacked)  # pylint: disable=protected-access
  return dequantize_weight(leaf, shape[len(lead):], dtype)


def quantize_leaf(path: tuple, value, fmt: str, stacked: bool):
  """`value` (an array, or a flax box of one) stored for a `fmt` frozen base: a quantised dict
  (each entry boxed like the weight, the scale's block axis unnamed) or a REST_DTYPE array."""
  boxed = hasattr(value, 'unbox')
  array = value.unbox() if boxed else value
  if not quantizable(path, array.shape, fmt, stacked):
    return jax.tree.map(lambda x: x.astype(REST_DTYPE), value)
  leaf = quantize(array, fmt, path, stacked)
  if not boxed:
    return leaf
  names = tuple(value.names)
  lead, _, out_shape = lora._split_shape(path, array.shape, stacked)  # pylint: disable=protected-access
  scale_names = names[:len(lead)] + (None,) + names[len(names) - len(out_shape):]
  return {fmt: value.replace(value=leaf[fmt]), 'absmax': value.replace(value=leaf['absmax'],
                                                                        names=scale_names)}


def dequantize_tree(tree, stacked: bool = False, dtype=jnp.float32):
  """A (nested dict) params tree with every quantised leaf replaced by its float weight."""
  if not tree:
    return tree
  flat = traverse_util.flatten_dict(tree)
  groups, out = {}, {}
  for path, x in flat.items():
    if path[-1] in ('absmax',) + QUANT_DTYPES:
      groups.setdefault(path[:-1], {})[path[-1]] = x
    else:
      out[path] = x
  for path, leaf in groups.items():
    if not is_quantized_leaf(leaf):  # a base leaf that happens to have such a name
      out.update({path + (k,): v for k, v in leaf.items()})
      continue
    out[path] = dequantize(leaf, path, stacked, dtype)
  return traverse_util.unflatten_dict(out)


def weight_shapes(tree, stacked: bool = False) -> dict:
  """{path: shape} of every quantised weight of `tree`, as it decodes (nothing is computed)."""
  decoded = jax.eval_shape(lambda t: dequantize_tree(t, stacked), tree)
  stored = traverse_util.flatten_dict(tree or {})
  return {p: x.shape for p, x in traverse_util.flatten_dict(decoded or {}).items()
          if p not in stored}
