"""Closed-form checks of the post-training losses in lmjax.losses."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import losses

A = lambda *x: jnp.asarray(x, jnp.float32)
softplus = lambda x: math.log1p(math.exp(x))  # -log sigma(-x)


@pytest.mark.parametrize('loss_type,beta,smoothing,expected', [
    ('sigmoid', 0.5, 0.0, softplus(-0.5)),
    ('sigmoid', 0.5, 0.1, 0.9 * softplus(-0.5) + 0.1 * softplus(0.5)),
    ('ipo', 0.25, 0.0, (1.0 - 2.0) ** 2),
    ('ipo', 0.5, 0.0, 0.0),
    ('hinge', 0.5, 0.0, 0.5),
])
def test_dpo_closed_form(loss_type, beta, smoothing, expected):
  # h = (pi_c - ref_c) - (pi_r - ref_r) = (-1 + 1.5) - (-2 + 1.5) = 1
  loss, metrics = losses.dpo_loss(A(-1.0), A(-2.0), A(-1.5), A(-1.5), beta, loss_type, smoothing)
  assert float(loss) == pytest.approx(expected, abs=1e-6)
  assert float(metrics['chosen_reward']) == pytest.approx(beta * 0.5)
  assert float(metrics['rejected_reward']) == pytest.approx(-beta * 0.5)
  assert float(metrics['margin']) == pytest.approx(beta)
  assert float(metrics['accuracy']) == 1.0


def test_dpo_reference_equal_policy_is_log2():
  logps = A(-3.0, -7.0)
  loss, _ = losses.dpo_loss(logps, logps + 1, logps, logps + 1)
  assert float(loss) == pytest.approx(math.log(2.0), abs=1e-6)


def test_reward_loss_margin_and_centring():
  loss, metrics = losses.reward_loss(A(1.0), A(0.0), margin_B=0.5, center_coef=0.1)
  assert float(loss) == pytest.approx(softplus(-0.5) + 0.1 * 1.0, abs=1e-6)
  assert float(metrics['accuracy']) == 1.0
  loss, metrics = losses.reward_loss(A(0.0, 2.0), A(1.0, 0.0))
  assert float(loss) == pytest.approx((softplus(1.0) + softplus(-2.0)) / 2, abs=1e-6)
  assert float(metrics['accuracy']) == 0.5


def test_orpo_closed_form():
  # p_c = 0.5 -> odds 1; p_r = 0.25 -> odds 1/3; log odds ratio = log 3
  chosen, rejected = A(math.log(0.5)), A(math.log(0.25))
  loss, metrics = losses.orpo_loss(chosen, rejected, -chosen, beta=0.1)
  assert float(metrics['log_odds']) == pytest.approx(math.log(3.0), abs=1e-6)
  assert float(loss) == pytest.approx(math.log(2.0) + 0.1 * math.log(4.0 / 3.0), abs=1e-6)


def test_kto_closed_form():
  sig = lambda x: 1 / (1 + math.exp(-x))
  policy, ref, desirable = A(0.0, -1.0), A(-1.0, 0.0), A(1.0, 0.0)  # ratios +1, -1
  loss, _ = losses.kto_loss(policy, ref, desirable, kl_ref=0.0, beta=1.0)
  assert float(loss) == pytest.approx(1 - sig(1.0), abs=1e-6)
  loss, _ = losses.kto_loss(policy, ref, desirable, kl_ref=0.5, beta=1.0, undesirable_weight=2.0)
  assert float(loss) == pytest.approx(((1 - sig(0.5)) + 2 * (1 - sig(1.5))) / 2, abs=1e-6)
  loss, metrics = losses.kto_loss(policy, ref, desirable, kl_ref=-3.0, beta=1.0)
  assert float(metrics['kl_ref']) == 0.0  # the reference point is clamped at 0


def test_kl_estimators():
  logp, ref = A(-1.0, -2.0), A(-2.0, -2.0)
  np.testing.assert_allclose(losses.kl_penalty(logp, ref, 'k1'), [1.0, 0.0])
  np.testing.assert_allclose(losses.kl_penalty(logp, ref, 'k2'), [0.5, 0.0])
  np.testing.assert_allclose(losses.kl_penalty(logp, ref, 'k3'), [math.exp(-1.0), 0.0],
                             rtol=1e-6)


def test_ppo_clipped_losses():
  logp = jnp.log(A(1.5, 0.5, 9.0))[None]
  old, adv, mask = jnp.zeros((1, 3)), A(1.0, -1.0, 100.0)[None], A(1.0, 1.0, 0.0)[None]
  loss, metrics = losses.ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
  assert float(loss) == pytest.approx((-1.2 + 0.8) / 2, abs=1e-6)
  assert float(metrics['clip_fraction']) == 1.0
  values, old_v, returns = A(2.0, 1.0, 50.0)[None], A(1.0, 1.0, 0.0)[None], A(3.0, 1.0, 0.0)[None]
  vloss, _ = losses.ppo_value_loss(values, old_v, returns, mask, clip_eps=0.2)
  assert float(vloss) == pytest.approx(0.5 * (3.24 + 0.0) / 2, abs=1e-6)


def _gae_loop(rewards, values, mask, gamma, lam):
  adv = np.zeros_like(rewards)
  for b in range(rewards.shape[0]):
    next_v = next_a = 0.0
    for t in reversed(range(rewards.shape[1])):
      if not mask[b, t]:
        continue
      delta = rewards[b, t] + gamma * next_v - values[b, t]
      next_a = delta + gamma * lam * next_a
      next_v = values[b, t]
      adv[b, t] = next_a
  return adv, (adv + values) * mask


def test_gae_matches_python_loop():
  rng = np.random.default_rng(0)
  rewards, values = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
  mask = np.array([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 1, 0]], float)
  adv, ret = losses.gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
  want_adv, want_ret = _gae_loop(rewards, values, mask, 0.9, 0.8)
  np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-6)


def test_masked_whiten_ignores_masked_entries():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(4, 6)).astype(np.float32)
  mask = (rng.uniform(size=(4, 6)) > 0.4).astype(np.float32)
  x_masked = np.where(mask > 0, x, 1e6)  # garbage where masked must not matter
  sub = x[mask > 0]
  assert float(losses.masked_mean(x_masked, mask)) == pytest.approx(sub.mean(), rel=1e-5)
  assert float(losses.masked_var(x_masked, mask)) == pytest.approx(sub.var(ddof=1), rel=1e-4)
  out = np.asarray(losses.masked_whiten(x_masked, mask))
  np.testing.assert_allclose(out[mask > 0], (sub - sub.mean()) / sub.std(ddof=1), rtol=1e-4,
                             atol=1e-5)
  assert np.all(out[mask == 0] == 0)
  shifted = np.asarray(losses.masked_whiten(x_masked, mask, shift_mean=False))
  np.testing.assert_allclose(shifted[mask > 0], (sub - sub.mean()) / sub.std(ddof=1) + sub.mean(),
                             rtol=1e-4, atol=1e-5)


def test_grpo_advantages():
  adv = losses.grpo_advantages(A(1.0, 2.0, 3.0, 5.0), group_size=2)
  np.testing.assert_allclose(adv, [-1.0, 1.0, -1.0, 1.0], rtol=1e-5)
  adv = losses.grpo_advantages(A(1.0, 2.0, 3.0, 5.0), group_size=2, scale=False)
  np.testing.assert_allclose(adv, [-0.5, 0.5, -1.0, 1.0], rtol=1e-6)


def test_dpo_gradient_equals_the_analytic_one():
  """d/d pi_c of -log sigma(beta h) is -beta sigma(-beta h), and the opposite for pi_r (mean over
  the batch, so each entry's gradient carries a 1/B)."""
  beta = 0.3
  chosen, rejected = A(-1.0, -4.0, -2.5), A(-2.0, -1.0, -2.5)
  ref_chosen, ref_rejected = A(-1.5, -3.0, -2.0), A(-1.5, -2.0, -3.0)
  grad_c, grad_r = jax.grad(
      lambda c, r: losses.dpo_loss(c, r, ref_chosen, ref_rejected, beta)[0], (0, 1))(chosen, rejected)
  h = (chosen - ref_chosen) - (rejected - ref_rejected)
  expected = -beta * jax.nn.sigmoid(-beta * h) / 3
  np.testing.assert_allclose(grad_c, expected, rtol=1e-5)
  np.testing.assert_allclose(grad_r, -expected, rtol=1e-5)


def test_k3_is_never_negative_and_k1_averages_to_the_kl():
  rng = np.random.default_rng(0)
  logp, ref = (jnp.asarray(rng.normal(size=1000) * 3) for _ in range(2))
  assert float(jnp.min(losses.kl_penalty(logp, ref, 'k3'))) >= 0.0
  # samples from p = N(0, 1) scored under q = N(1, 1): KL(p || q) = 1/2
  x = rng.normal(size=200_000)
  logp_x, logq_x = -0.5 * x**2, -0.5 * (x - 1.0)**2
  assert float(jnp.mean(losses.kl_penalty(logp_x, logq_x, 'k1'))) == pytest.approx(0.5, abs=0.01)
  assert float(jnp.mean(losses.kl_penalty(logp_x, logq_x, 'k3'))) == pytest.approx(0.5, abs=0.03)
