"""Pure loss functions of logits (or log-probabilities); no model inside.

Losses return sums together with their denominators, so that averaging over micro-batches, hosts
or devices stays exact: the mean is `sum / count` taken once over the whole batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_log_probs(logits_BLV, targets_BL):
  """log p(target) for every position, in float32."""
  logits_BLV = logits_BLV.astype(jnp.float32)
  log_z_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
  target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
  return target_logit_BL - log_z_BL


def cross_entropy(logits_BLV, targets_BL, weights_BL, z_loss: float = 0.0):
  """Next-token cross-entropy with per-token weights and optional z-loss.

  Returns a dict of sums: `loss` (weighted NLL + z_loss * log(Z)^2, what is optimised), `nll`
  (weighted NLL alone), `z` (weighted log(Z)^2) and `weight` (the sum of weights).
  """
  logits_BLV = logits_BLV.astype(jnp.float32)
  log_z_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
  target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
  nll_BL = log_z_BL - target_logit_BL
  weights_BL = weights_BL.astype(jnp.float32)
  nll = jnp.sum(nll_BL * weights_BL)
  z = jnp.sum(jnp.square(log_z_BL) * weights_BL)
  return {'loss': nll + z_loss * z, 'nll': nll, 'z': z, 'weight': jnp.sum(weights_BL)}
