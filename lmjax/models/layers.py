"""Small building blocks: RMSNorm, rotary embeddings, SwiGLU MLP, parameter helpers.

Activations between layers are 2-D `(tokens, features)`: every weight-gradient matmul then
contracts a single dimension, which keeps XLA from inserting transposes in the backward pass.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax.models.quantized import dequantize_weight, is_quantized_leaf


def param_with_axes(module: nn.Module, name: str, shape, axes, std: float, dtype):
  """A parameter initialised N(0, std^2) and annotated with logical axis names. Inside the layer
  it also decodes a quantised weight (`models.quantized`) and applies low-rank adapter factors
  stored next to it as `NAME_lora` (`lmjax.peft.lora.attach`, `low_rank_adapted`), so neither
  ever makes a float copy of the whole model."""
  stored = module.get_variable('params', name) if module.has_variable('params', name) else None
  if is_quantized_leaf(stored):  # a quantised frozen weight (lmjax.peft.quant), decoded here
    w = dequantize_weight(stored, shape, jnp.float32)
  else:
    init = nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)
    w = module.param(name, init, shape, dtype)
  if module.has_variable('params', name + '_lora'):
    w = low_rank_adapted(w, module.get_variable('params', name + '_lora'))
  return w


def low_rank_adapted(w, factors):
  """w + a @ b as an (in, out) matrix ('a': (in, r), 'b': (r, out)), in float32 (also for a
  bfloat16 weight); with DoRA's magnitudes 'm' (out,) each column is rescaled to its magnitude."""
  a_IR, b_RO = factors['a'], factors['b']
  new_IO = (w.reshape(a_IR.shape[0], b_RO.shape[1]).astype(jnp.float32)
            + jnp.einsum('ir,ro->io', a_IR, b_RO))
  if 'm' in factors:
    norm_1O = jax.lax.stop_gradient(jnp.linalg.norm(new_IO, axis=0, keepdims=True))
    new_IO = new_IO * (factors['m'][None, :] / norm_1O)
  dtype = jnp.float32 if w.dtype == jnp.bfloat16 else w.dtype
  return new_IO.reshape(w.shape).astype(dtype)


def constrain(x, axes):
  """Logical sharding constraint on an activation (a no-op without axis rules)."""
  return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
  eps: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_TD):
    scale_D = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
                         (x_TD.shape[-1],), self.param_dtype)
    x32_TD = x_TD.astype(jnp.float32)
    rms_T1 = jax.lax.rsqrt(jnp.mean(x32_TD * x32_TD, axis=-1, keepdims=True) + self.eps)
    return (x32_TD * rms_T1 * scale_D.astype(jnp.float32)).astype(self.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling=None):
  """RoPE inverse frequencies; `scaling` = ('llama3', factor, low_freq_factor, high_freq_factor,
  original_max_len) applies Llama 3.1's scaling: long wavelengths slowed down by `factor`, short
  ones kept, and a smooth interpolation between."""
  half = head_dim // 2
  inv_freq_F = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  if scaling is None:
    return inv_freq_F
  kind, factor, low_freq_factor, high_freq_factor, original_len = scaling
  if kind != 'llama3':
    raise ValueError(f'model.rope_scaling: unknown RoPE scaling {kind!r} (none | llama3)')
  wavelen_F = 2 * jnp.pi / inv_freq_F
  smooth_F = (original_len / wavelen_F - low_freq_factor) / (high_freq_factor - low_freq_factor)
  smoothed_F = (1 - smooth_F) * inv_freq_F / factor + smooth_F * inv_freq_F
  scaled_F = jnp.where(wavelen_F > original_len / low_freq_factor, inv_freq_F / factor, inv_freq_F)
  medium_F = (wavelen_F >= original_len / high_freq_factor) & (
      wavelen_F <= original_len / low_freq_factor)
  return jnp.where(medium_F, smoothed_F, scaled_F)


def rope(x_BLHD, positions_BL, theta: float, scaling=None):
  """Rotary position embedding, rotate-half layout (the Hugging Face LLaMA convention):
  dimension i is paired with dimension i + head_dim / 2. `scaling`: see `rope_inv_freq`."""
  head_dim = x_BLHD.shape[-1]
  inv_freq_F = rope_inv_freq(head_dim, theta, scaling)
  angles_BLF = positions_BL[..., None].astype(jnp.float32) * inv_freq_F
  sin_BL1F = jnp.sin(angles_BLF)[:, :, None, :]
  cos_BL1F = jnp.cos(angles_BLF)[:, :, None, :]
  x1, x2 = jnp.split(x_BLHD.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos_BL1F - x2 * sin_BL1F, x2 * cos_BL1F + x1 * sin_BL1F], -1)
  return rotated.astype(x_BLHD.dtype)


class MLP(nn.Module):
  """SwiGLU: down(silu(x @ gate) * (x @ up))."""
  d_model: int
  mlp_dim: int
  std: float
  out_std: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_TD):
    shape, axes = (self.d_model, self.mlp_dim), ('embed', 'mlp')
    gate_DF = param_with_axes(self, 'gate', shape, axes, self.std, self.param_dtype)
    up_DF = param_with_axes(self, 'up', shape, axes, self.std, self.param_dtype)
    down_FD = param_with_axes(self, 'down', shape[::-1], axes[::-1], self.out_std,
                              self.param_dtype)
    x_TD = x_TD.astype(self.dtype)
    gate_TF = x_TD @ gate_DF.astype(self.dtype)
    up_TF = x_TD @ up_DF.astype(self.dtype)
    h_TF = constrain(nn.silu(gate_TF) * up_TF, ('act_tokens', 'act_mlp'))
    return h_TF @ down_FD.astype(self.dtype)
