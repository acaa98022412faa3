"""Pure loss functions of logits (or log-probabilities); no model inside (`chunked_cross_entropy`
takes the final hidden states and the output projection instead of logits).

Losses return sums together with their denominators, so that averaging over micro-batches, hosts
or devices stays exact: the mean is `sum / count` taken once over the whole batch.
"""

from __future__ import annotations

import functools

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


def chunked_cross_entropy(hidden_BLD, w_DV, targets_BL, weights_BL, chunk: int,
                          z_loss: float = 0.0):
  """`cross_entropy(hidden_BLD @ w_DV, ...)` without ever holding the (B, L, V) logits.

  The output projection and the loss run over `chunk` tokens at a time in a `lax.scan` whose body
  is rematerialised (`jax.checkpoint`), so both passes keep one (chunk, V) float32 block of logits
  alive instead of the whole batch's logits, log-softmax and their gradient; the backward pass
  recomputes each chunk's logits (one extra head matmul). Same sums and z-loss as `cross_entropy`.

  `hidden_BLD` are the final-norm hidden states in the compute dtype; `w_DV` the head in its
  storage dtype, cast to the hidden's dtype inside each chunk (the matmul accumulates in float32,
  as the unchunked head does, and w's gradient accumulates over chunks in w's dtype). Tokens are
  flattened (T = B * L) and padded with zero weight to n * chunk; chunk j takes the strided
  tokens j, j + n, j + 2n, ..., so every chunk spans the whole (batch-sharded) token axis.
  """
  if chunk <= 0:
    raise ValueError(f'chunked_cross_entropy: chunk must be positive; got {chunk}')
  d = hidden_BLD.shape[-1]
  hidden_TD = hidden_BLD.reshape(-1, d)
  targets_T = targets_BL.reshape(-1)
  weights_T = weights_BL.reshape(-1).astype(jnp.float32)
  tokens = hidden_TD.shape[0]
  n = -(-tokens // chunk)
  pad = n * chunk - tokens
  if pad:
    hidden_TD = jnp.pad(hidden_TD, ((0, pad), (0, 0)))
    targets_T = jnp.pad(targets_T, (0, pad))
    weights_T = jnp.pad(weights_T, (0, pad))
  # (n * chunk,) -> (chunk, n) -> (n, chunk): chunk j holds tokens j, j + n, ...
  hidden_NCD = jnp.swapaxes(hidden_TD.reshape(chunk, n, d), 0, 1)
  targets_NC = jnp.swapaxes(targets_T.reshape(chunk, n), 0, 1)
  weights_NC = jnp.swapaxes(weights_T.reshape(chunk, n), 0, 1)

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def chunk_sums(w_DV, h_CD, targets_C, weights_C):
    logits_CV = jnp.dot(h_CD, w_DV.astype(h_CD.dtype), preferred_element_type=jnp.float32)
    log_z_C = jax.nn.logsumexp(logits_CV, axis=-1)
    target_logit_C = jnp.take_along_axis(logits_CV, targets_C[:, None], axis=-1)[:, 0]
    nll = jnp.sum((log_z_C - target_logit_C) * weights_C)
    z = jnp.sum(jnp.square(log_z_C) * weights_C)
    return nll, z

  def body(carry, xs):
    nll, z = chunk_sums(w_DV, *xs)
    return (carry[0] + nll, carry[1] + z), None

  zero = jnp.zeros((), jnp.float32)
  (nll, z), _ = jax.lax.scan(body, (zero, zero), (hidden_NCD, targets_NC, weights_NC))
  return {'loss': nll + z_loss * z, 'nll': nll, 'z': z, 'weight': jnp.sum(weights_T)}


# ----------------------------------------------------------------------------------------------
# Post-training losses. Shapes: B sequences (or pairs), T response tokens. Every function is pure
# and jittable; those that return `(loss, metrics)` average over the batch (a mean, so callers that
# need exact accumulation multiply by the number of rows, which is the same in every micro-batch).
# ----------------------------------------------------------------------------------------------


def masked_mean(x, mask, axis=None):
  """Mean of `x` over the entries where `mask` is 1 (masked entries never contribute)."""
  mask = mask.astype(jnp.float32)
  return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def masked_var(x, mask, unbiased: bool = True):
  """Variance of the unmasked entries of `x` (over all axes); Bessel-corrected when `unbiased`."""
  mask = mask.astype(jnp.float32)
  mean = masked_mean(x, mask)
  n = jnp.sum(mask)
  var = jnp.sum(jnp.square(x - mean) * mask) / jnp.maximum(n, 1.0)
  if unbiased:
    var = var * n / jnp.maximum(n - 1.0, 1.0)
  return var


def masked_whiten(x, mask, shift_mean: bool = True, eps: float = 1e-8):
  """(x - mean) / std with the statistics of the unmasked entries only; masked outputs are 0.

  With `shift_mean=False` the mean is added back (only the scale is normalised).
  """
  mean, var = masked_mean(x, mask), masked_var(x, mask)
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return jnp.where(mask > 0, out, 0.0)


def sequence_log_probs(logits_BLV, targets_BL, weights_BL, average: bool = False):
  """Per-sequence sum (or mean, with `average`) of log p(target) over the weighted tokens: (B,)."""
  logp_BL = token_log_probs(logits_BLV, targets_BL) * weights_BL
  total_B = jnp.sum(logp_BL, axis=-1)
  if average:
    return total_B / jnp.maximum(jnp.sum(weights_BL, axis=-1), 1.0)
  return total_B


def reward_loss(chosen_rewards_B, rejected_rewards_B, margin_B=0.0, center_coef: float = 0.0):
  """Bradley-Terry loss of a scalar reward model on preference pairs.

  loss = mean[-log sigma(r_c - r_r - margin)] + center_coef * mean[(r_c + r_r)^2]
  The centring term keeps rewards near zero. Metrics: accuracy (r_c > r_r), margin, rewards.
  """
  diff_B = chosen_rewards_B - rejected_rewards_B
  bt_B = -jax.nn.log_sigmoid(diff_B - margin_B)
  center_B = jnp.square(chosen_rewards_B + rejected_rewards_B)
  loss = jnp.mean(bt_B) + center_coef * jnp.mean(center_B)
  metrics = {'accuracy': jnp.mean((diff_B > 0).astype(jnp.float32)), 'margin': jnp.mean(diff_B),
             'chosen_reward': jnp.mean(chosen_rewards_B),
             'rejected_reward': jnp.mean(rejected_rewards_B)}
  return loss, metrics


def dpo_loss(policy_chosen_B, policy_rejected_B, ref_chosen_B, ref_rejected_B, beta: float = 0.1,
             loss_type: str = 'sigmoid', label_smoothing: float = 0.0):
  """Direct preference optimisation on per-sequence log-probs (sums over response tokens).

  h = (pi_c - ref_c) - (pi_r - ref_r), z = beta * h
    sigmoid: -(1 - eps) log sigma(z) - eps log sigma(-z)    (eps = label_smoothing, cDPO)
    ipo:     (h - 1 / (2 beta))^2
    hinge:   max(0, 1 - z)
  Metrics: implicit rewards beta * (pi - ref) for chosen and rejected, their margin, and reward
  accuracy (chosen reward > rejected reward).
  """
  chosen_ratio_B = policy_chosen_B - ref_chosen_B
  rejected_ratio_B = policy_rejected_B - ref_rejected_B
  h_B = chosen_ratio_B - rejected_ratio_B
  z_B = beta * h_B
  if loss_type == 'sigmoid':
    losses_B = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(z_B)
                - label_smoothing * jax.nn.log_sigmoid(-z_B))
  elif loss_type == 'ipo':
    losses_B = jnp.square(h_B - 1.0 / (2.0 * beta))
  elif loss_type == 'hinge':
    losses_B = jax.nn.relu(1.0 - z_B)
  else:
    raise ValueError(f'dpo_loss: unknown loss_type {loss_type!r} (sigmoid | ipo | hinge)')
  chosen_B = jax.lax.stop_gradient(beta * chosen_ratio_B)
  rejected_B = jax.lax.stop_gradient(beta * rejected_ratio_B)
  metrics = {'chosen_reward': jnp.mean(chosen_B), 'rejected_reward': jnp.mean(rejected_B),
             'margin': jnp.mean(chosen_B - rejected_B),
             'accuracy': jnp.mean((chosen_B > rejected_B).astype(jnp.float32))}
  return jnp.mean(losses_B), metrics


def _log1m_exp(x):
  """log(1 - exp(x)) for x < 0, stable at both ends."""
  return jnp.where(x > -0.693, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def orpo_loss(chosen_avg_logps_B, rejected_avg_logps_B, chosen_nll_B, beta: float = 0.1):
  """Odds-ratio preference optimisation (no reference model).

  With p = exp(mean token log-prob) of a response, odds = p / (1 - p):
    loss = mean[nll_chosen - beta * log sigma(log odds_c - log odds_r)]
  `chosen_nll_B` is the SFT term (mean token NLL of the chosen response).
  """
  log_odds_B = ((chosen_avg_logps_B - _log1m_exp(chosen_avg_logps_B))
                - (rejected_avg_logps_B - _log1m_exp(rejected_avg_logps_B)))
  ratio_B = jax.nn.log_sigmoid(log_odds_B)
  loss = jnp.mean(chosen_nll_B - beta * ratio_B)
  chosen_B = jax.lax.stop_gradient(beta * chosen_avg_logps_B)
  rejected_B = jax.lax.stop_gradient(beta * rejected_avg_logps_B)
  metrics = {'log_odds': jnp.mean(log_odds_B), 'odds_ratio_loss': -jnp.mean(ratio_B),
             'chosen_nll': jnp.mean(chosen_nll_B), 'chosen_reward': jnp.mean(chosen_B),
             'rejected_reward': jnp.mean(rejected_B), 'margin': jnp.mean(chosen_B - rejected_B),
             'accuracy': jnp.mean((chosen_B > rejected_B).astype(jnp.float32))}
  return loss, metrics


def kto_loss(policy_logps_B, ref_logps_B, desirable_B, kl_ref=None, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
  """Kahneman-Tversky optimisation on unpaired examples (`desirable_B` 1 = good, 0 = bad).

  r = pi - ref; z0 = max(0, kl_ref) (detached reference point; by default the batch mean of r)
    desirable:   w_d * (1 - sigma(beta * (r - z0)))
    undesirable: w_u * (1 - sigma(beta * (z0 - r)))
  """
  ratio_B = policy_logps_B - ref_logps_B
  desirable_B = desirable_B.astype(jnp.float32)
  if kl_ref is None:
    kl_ref = jnp.mean(ratio_B)
  z0 = jnp.maximum(jax.lax.stop_gradient(kl_ref), 0.0)
  good_B = desirable_weight * (1.0 - jax.nn.sigmoid(beta * (ratio_B - z0)))
  bad_B = undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z0 - ratio_B)))
  losses_B = desirable_B * good_B + (1.0 - desirable_B) * bad_B
  rewards_B = jax.lax.stop_gradient(beta * ratio_B)
  metrics = {'kl_ref': z0, 'chosen_reward': masked_mean(rewards_B, desirable_B),
             'rejected_reward': masked_mean(rewards_B, 1.0 - desirable_B)}
  return jnp.mean(losses_B), metrics


def kl_penalty(logp, ref_logp, estimator: str = 'k1'):
  """Per-token estimate of KL(pi || ref) from samples of pi.

  k1 = log pi - log ref (unbiased, can be negative); k2 = (log pi - log ref)^2 / 2;
  k3 = exp(ref - pi) - 1 - (ref - pi) (unbiased, always >= 0).
  """
  log_ratio = logp - ref_logp
  if estimator == 'k1':
    return log_ratio
  if estimator == 'k2':
    return 0.5 * jnp.square(log_ratio)
  if estimator == 'k3':
    return jnp.expm1(-log_ratio) + log_ratio
  raise ValueError(f'kl_penalty: unknown estimator {estimator!r} (k1 | k2 | k3)')


def gae_advantages(rewards_BT, values_BT, mask_BT, gamma: float = 1.0, lam: float = 0.95):
  """Generalised advantage estimation as a reverse `lax.scan` over time.

  Masked steps are skipped: they get advantage 0 and pass the running (next value, next
  advantage) through unchanged, so trailing padding behaves like the end of the episode.
  Returns (advantages_BT, returns_BT = advantages + values) with masked entries 0.
  """
  mask_BT = mask_BT.astype(jnp.float32)

  def step(carry, xs):
    next_value_B, next_adv_B = carry
    r_B, v_B, m_B = xs
    delta_B = r_B + gamma * next_value_B - v_B
    adv_B = delta_B + gamma * lam * next_adv_B
    keep = m_B > 0
    new_carry = (jnp.where(keep, v_B, next_value_B), jnp.where(keep, adv_B, next_adv_B))
    return new_carry, jnp.where(keep, adv_B, 0.0)

  zeros_B = jnp.zeros(rewards_BT.shape[:1], jnp.float32)
  xs = (rewards_BT.T.astype(jnp.float32), values_BT.T.astype(jnp.float32), mask_BT.T)
  _, adv_TB = jax.lax.scan(step, (zeros_B, zeros_B), xs, reverse=True)
  adv_BT = adv_TB.T
  return adv_BT, (adv_BT + values_BT) * mask_BT


def grpo_advantages(rewards_B, group_size: int, scale: bool = True, eps: float = 1e-6):
  """Group-relative advantages: each reward minus its group's mean (over `group_size` consecutive
  samples of one prompt), divided by the group's std when `scale`. Returns (B,)."""
  groups_GN = rewards_B.reshape(-1, group_size)
  adv_GN = groups_GN - jnp.mean(groups_GN, axis=-1, keepdims=True)
  if scale:
    adv_GN = adv_GN / (jnp.std(groups_GN, axis=-1, keepdims=True) + eps)
  return adv_GN.reshape(-1)


def ppo_policy_loss(logp_BT, old_logp_BT, advantages_BT, mask_BT, clip_eps: float = 0.2):
  """Clipped surrogate: masked mean of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)).

  Metrics: clip fraction, approximate KL(old || new) (k3 estimator), mean ratio.
  """
  log_ratio_BT = logp_BT - old_logp_BT
  ratio_BT = jnp.exp(log_ratio_BT)
  unclipped_BT = -advantages_BT * ratio_BT
  clipped_BT = -advantages_BT * jnp.clip(ratio_BT, 1.0 - clip_eps, 1.0 + clip_eps)
  loss = masked_mean(jnp.maximum(unclipped_BT, clipped_BT), mask_BT)
  metrics = {'clip_fraction': masked_mean((clipped_BT > unclipped_BT).astype(jnp.float32), mask_BT),
             'approx_kl': masked_mean(jnp.expm1(log_ratio_BT) - log_ratio_BT, mask_BT),
             'ratio': masked_mean(ratio_BT, mask_BT)}
  return loss, metrics


def ppo_value_loss(values_BT, old_values_BT, returns_BT, mask_BT, clip_eps: float = 0.2):
  """Clipped value loss: 0.5 * masked mean of max((v - R)^2, (v_clipped - R)^2), where
  v_clipped = old_v + clip(v - old_v, -eps, eps). Metrics: clip fraction."""
  clipped_BT = old_values_BT + jnp.clip(values_BT - old_values_BT, -clip_eps, clip_eps)
  loss_a_BT = jnp.square(values_BT - returns_BT)
  loss_b_BT = jnp.square(clipped_BT - returns_BT)
  loss = 0.5 * masked_mean(jnp.maximum(loss_a_BT, loss_b_BT), mask_BT)
  return loss, {'value_clip_fraction': masked_mean((loss_b_BT > loss_a_BT).astype(jnp.float32),
                                                   mask_BT)}


def entropy_from_logits(logits_BLV):
  """Per-position entropy of softmax(logits), float32."""
  logp_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp_BLV) * logp_BLV, axis=-1)
