"""PPO / GRPO: an update on a fixed rollout, the clip, `score_rollout`'s advantages, the CLI."""

import dataclasses
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lmjax import cli
from lmjax import losses
from lmjax import tasks
from lmjax.config import base_config, frozen
from lmjax.models.transformer import forward_hidden, init_params
from lmjax.tasks import params as params_lib
from lmjax.tasks import ppo
from lmjax.train import step as step_lib
from lmjax.train.state import init_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP_EPS = 0.2

# A fixed rollout: 4 prompts of different lengths; responses of up to 6 tokens, rows 1 and 2 shorter
# (their mask has padding). Tokens of POS get advantage +1, those of NEG -1, padding 0.
POS, NEG = (40, 41, 42), (50, 51, 52)
PROMPTS = [[2, 7, 8], [2, 9, 10, 11, 12], [2, 13], [2, 7, 9, 11, 13, 15, 17]]
RESPONSES_BN = np.array([[40, 50, 41, 51, 42, 52],
                         [50, 40, 51, 41, 0, 0],
                         [42, 42, 50, 0, 0, 0],
                         [41, 52, 40, 50, 42, 51]], np.int32)
LENGTHS_B = np.array([6, 4, 3, 6])


def _config(**post):
  c = base_config()
  c.task = 'ppo'
  c.post.train_file = 'unused.jsonl'
  c.post.toy_reward_token = 5
  c.post.clip_eps = CLIP_EPS
  c.model.vocab_size, c.model.num_layers, c.model.d_model = 64, 2, 32
  c.model.num_heads, c.model.num_kv_heads, c.model.mlp_dim = 4, 2, 64
  c.model.dtype = 'float32'
  for k, v in post.items():
    c.post[k] = v
  return c


def _state(config, tx):
  """(task, a fresh unboxed state). Jitted like the loop's state creation: the reference copy of
  the base gets its own buffers (the train step donates the state)."""
  task = tasks.from_config(config)
  create = lambda: init_state(task, tx, 0)
  state = jax.jit(lambda: (lambda s: s.replace(params=nn.unbox(s.params)))(create()))()
  return task, state


def _rollout(responses_BN):
  """The fixed prompts left-padded to one width, followed by `responses_BN` (LENGTHS_B long)."""
  prompt = ppo.prompt_rows(PROMPTS, 8)
  return ppo.rollout_rows(prompt, jnp.asarray(responses_BN), jnp.asarray(LENGTHS_B))


_score = jax.jit(ppo.score_rollout, static_argnums=0)


def _step(task, tx):
  """The loop's train step (the task's epochs x minibatches updates) with optimizer `tx`."""
  return jax.jit(functools.partial(step_lib.train_step, task, tx, lambda count: 0.0),
                 donate_argnums=0)


def _policy_only(**post):
  """A config whose loss is the clipped policy loss alone (no value, entropy or KL term)."""
  return _config(value_coef=0.0, entropy_coef=0.0, whiten_advantages=False, **post)


def _fixed_advantages(mask_BN):
  adv_BN = np.where(np.isin(RESPONSES_BN, POS), 1.0, np.where(np.isin(RESPONSES_BN, NEG), -1.0, 0.))
  return (adv_BN * mask_BN).astype(np.float32)


def _scored(task, params):
  """The fixed rollout scored by `params`, the fixed advantages in place of the computed ones."""
  data, _ = _score(task, params, _rollout(RESPONSES_BN), jnp.float32(0.0))
  return dict(data, advantages=jnp.asarray(_fixed_advantages(np.asarray(data['mask']))))


def _logp(task, params):
  data, _ = _score(task, params, _rollout(RESPONSES_BN), jnp.float32(0.0))
  return np.asarray(data['old_logp'])


def test_one_epoch_moves_log_ratio_with_the_advantage_inside_the_clip_range():
  """One epoch (2 minibatches of 2 rows) of plain SGD on the fixed rollout: every +1 token's
  log-ratio log pi_new - log pi_old rises, every -1 token's falls, and no ratio leaves
  [1 - eps, 1 + eps]: the first minibatch starts at ratio 1 and the second one's clip fraction is 0.

  lr = 5e-3: to first order an SGD step moves log p_i by lr * sum_j A_j <g_i, g_j> / n (g_i: the
  gradient of log p_i w.r.t. the params); here that gives |log-ratio| of 0.03-0.07, far above float
  noise (1e-3 asserted) and inside log(1 + eps) = 0.18. At lr = 0.05 the second minibatch already
  clips and from lr ~ 1 SGD overshoots (the log-ratios flip sign): the claim holds for a modest
  step, which is what PPO assumes.
  """
  config = _policy_only(ppo_epochs=1, minibatches=2)
  tx = optax.sgd(5e-3)
  task, state = _state(config, tx)
  data = _scored(task, state.params)
  old_BN, adv_BN, mask_BN = (np.asarray(data[k]) for k in ('old_logp', 'advantages', 'mask'))
  # the first update sees the old policy itself: score_rollout and the loss agree on log p
  _, first = ppo.ppo_loss(task, state.params, data)
  assert float(first['ratio']) == pytest.approx(1.0, abs=1e-6)
  assert float(first['approx_kl']) == pytest.approx(0.0, abs=1e-6)
  state, metrics = _step(task, tx)(state, data)
  assert task.updates == (1, 2)
  assert float(metrics['clip_fraction']) == 0.0  # the mean of two non-negative fractions

  log_ratio_BN = _logp(task, state.params) - old_BN
  pos, neg = adv_BN > 0, adv_BN < 0
  assert pos.sum() == 10 and neg.sum() == 9 and (mask_BN == 0).sum() == 5
  assert log_ratio_BN[pos].mean() > 1e-3 and log_ratio_BN[neg].mean() < -1e-3
  assert np.all(log_ratio_BN[pos] > 0) and np.all(log_ratio_BN[neg] < 0)  # every token, too
  ratio = np.exp(log_ratio_BN[mask_BN > 0])
  assert np.all((ratio >= 1.0 - CLIP_EPS - 1e-6) & (ratio <= 1.0 + CLIP_EPS + 1e-6)), ratio


def _policy_grad_closed_form(ratio_BN, adv_BN, mask_BN):
  """d loss / d log pi of the clipped surrogate: -A * ratio / n, but 0 where the ratio has left
  [1 - eps, 1 + eps] in the advantage's direction (and on padding)."""
  up, down = (adv_BN > 0) & (ratio_BN > 1 + CLIP_EPS), (adv_BN < 0) & (ratio_BN < 1 - CLIP_EPS)
  clipped_BN = up | down
  grad_BN = np.where(clipped_BN, 0.0, -adv_BN * ratio_BN) * mask_BN / mask_BN.sum()
  return grad_BN, clipped_BN & (mask_BN > 0)


def test_clip_zeroes_the_gradient_of_tokens_past_the_range():
  """Many SGD updates on one minibatch with a large LR: after each, the policy loss's gradient
  w.r.t. each token's log pi equals the closed form (exactly 0 once the token's ratio is past
  1 + eps with A > 0 or below 1 - eps with A < 0); once every token is clipped the update's
  gradient is exactly 0: the policy stops."""
  config = _policy_only(ppo_epochs=1, minibatches=1)
  tx = optax.sgd(0.02)
  task, state = _state(config, tx)
  data = _scored(task, state.params)
  old_BN, adv_BN, mask_BN = (np.asarray(data[k]) for k in ('old_logp', 'advantages', 'mask'))
  update = _step(task, tx)  # one update on the whole rollout
  loss_grad = jax.jit(jax.grad(
      lambda logp_BN: losses.ppo_policy_loss(logp_BN, old_BN, adv_BN, mask_BN, CLIP_EPS)[0]))
  mixed = 0
  for _ in range(12):
    state, _ = update(state, data)
    logp_BN = _logp(task, state.params)
    ratio_BN = np.exp(logp_BN - old_BN)
    want_BN, clipped_BN = _policy_grad_closed_form(ratio_BN, adv_BN, mask_BN)
    grad_BN = np.asarray(loss_grad(logp_BN))
    np.testing.assert_allclose(grad_BN, want_BN, rtol=1e-5, atol=1e-7)
    assert np.all(grad_BN[clipped_BN] == 0.0)
    mixed += 0 < clipped_BN.sum() < (mask_BN > 0).sum()
  assert mixed >= 2  # the drive went through steps with clipped and unclipped tokens
  assert np.all(clipped_BN[mask_BN > 0])  # ... and ended with every token clipped
  state, metrics = update(state, data)
  assert float(metrics['grad_norm']) == 0.0 and float(metrics['clip_fraction']) == 1.0
  np.testing.assert_array_equal(_logp(task, state.params), logp_BN)


# ---------------------------------------------------------------------------------------------
# score_rollout against an independent numpy computation
# ---------------------------------------------------------------------------------------------


_forward_hidden = jax.jit(forward_hidden, static_argnums=0)


def _row_forward(task, model, prompt, response):
  """(log p of the response tokens at temperature, final hidden states predicting them) from one
  unpadded row: no left padding, positions 0..L-1, a single segment."""
  tokens = np.asarray(prompt + list(response), np.int32)[None]
  positions = np.arange(tokens.shape[1], dtype=np.int32)[None]
  logits, hidden = _forward_hidden(task.model, model, tokens[:, :-1], positions[:, :-1],
                                   np.ones_like(tokens[:, :-1]))
  k = len(prompt)
  logits = np.asarray(logits[0, k - 1:], np.float64) / task.post.temperature
  logits -= logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return logp[np.arange(len(response)), response], np.asarray(hidden[0, k - 1:], np.float64)


def _gae(rewards, values, gamma, lam):
  adv, next_v, next_a = np.zeros_like(rewards), 0.0, 0.0
  for t in reversed(range(len(rewards))):
    next_a = rewards[t] + gamma * next_v - values[t] + gamma * lam * next_a
    next_v, adv[t] = values[t], next_a
  return adv


def _whiten(x_BN, mask_BN):
  sub = x_BN[mask_BN > 0]
  return np.where(mask_BN > 0, (x_BN - sub.mean()) / np.sqrt(sub.var(ddof=1) + 1e-8), 0.0)


@functools.partial(jax.jit, static_argnums=0)
def _drifted_params(task):
  """Post-training params whose policy has drifted from the reference (a non-zero KL) and whose
  value head is not zero."""
  params = nn.unbox(params_lib.build_params(task, init_params(task.model, jax.random.key(0)),
                                            jax.random.key(1)))
  keys = iter(jax.random.split(jax.random.key(2), 1000))
  params['trainable']['model'] = jax.tree.map(
      lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), params['trainable']['model'])
  params['trainable']['value'] = {'w': 0.3 * jax.random.normal(next(keys), (task.model.d_model,)),
                                  'b': jnp.float32(0.2)}
  return params


@pytest.mark.parametrize('advantage,whiten', [('gae', True), ('grpo', False)])
def test_score_rollout_advantages_match_numpy(advantage, whiten):
  kl_coef, gamma, lam = 0.1, 0.9, 0.8
  config = _config(advantage=advantage, whiten_advantages=whiten, group_size=2, gamma=gamma,
                   lam=lam, temperature=0.7)
  task = tasks.from_config(config)
  params = _drifted_params(dataclasses.replace(task, post=frozen(base_config().post)))  # 1 compile
  responses_BN = np.array([[5, 9, 5, 7, 8, 3], [6, 7, 8, 9, 0, 0], [5, 11, 3, 0, 0, 0],
                           [5, 5, 12, 5, 13, 3]], np.int32)
  data, stats = _score(task, params, _rollout(responses_BN), jnp.float32(kl_coef))

  policy, ref = params_lib.model_params(task, params), params['frozen']['ref']
  mask_BN = (np.arange(6)[None] < LENGTHS_B[:, None]).astype(np.float64)
  logp_BN, ref_BN, values_BN = (np.zeros_like(mask_BN) for _ in range(3))
  scores_B = np.zeros(4)
  for b, (prompt, n) in enumerate(zip(PROMPTS, LENGTHS_B)):
    response = responses_BN[b, :n]
    logp_BN[b, :n], hidden_ND = _row_forward(task, policy, prompt, response)
    ref_BN[b, :n], _ = _row_forward(task, ref, prompt, response)
    values_BN[b, :n] = hidden_ND @ np.asarray(params['trainable']['value']['w']) + 0.2
    scores_B[b] = np.sum(response == 5)
  np.testing.assert_array_equal(scores_B, [2, 0, 1, 3])
  np.testing.assert_allclose(data['old_logp'] * mask_BN, logp_BN, atol=2e-5)
  np.testing.assert_allclose(data['ref_logp'] * mask_BN, ref_BN, atol=2e-5)
  kl_BN = (logp_BN - ref_BN) * mask_BN  # k1
  assert np.abs(kl_BN).max() > 1e-2
  assert float(stats['kl']) == pytest.approx(kl_BN.sum(1).mean(), abs=1e-4)
  assert float(stats['score']) == pytest.approx(scores_B.mean())

  if advantage == 'gae':
    np.testing.assert_allclose(data['values'], values_BN, atol=2e-5)
    rewards_BN = -kl_coef * kl_BN
    rewards_BN[np.arange(4), LENGTHS_B - 1] += scores_B
    adv_BN = np.zeros_like(mask_BN)
    for b, n in enumerate(LENGTHS_B):
      adv_BN[b, :n] = _gae(rewards_BN[b, :n], values_BN[b, :n], gamma, lam)
    np.testing.assert_allclose(data['returns'], (adv_BN + values_BN) * mask_BN, atol=1e-4)
  else:
    groups = scores_B.reshape(-1, 2)
    adv_B = ((groups - groups.mean(1, keepdims=True)) / (groups.std(1, keepdims=True) + 1e-6))
    adv_BN = adv_B.reshape(-1)[:, None] * mask_BN
    np.testing.assert_array_equal(data['values'], 0.0)
  if whiten:
    adv_BN = _whiten(adv_BN, mask_BN)
  np.testing.assert_allclose(data['advantages'], adv_BN, atol=1e-4)
  assert np.all(np.asarray(data['advantages'])[mask_BN == 0] == 0.0)


def test_ppo_one_iteration_through_the_cli(tmp_path):
  workdir = str(tmp_path / 'ppo')
  rc = cli.main(['train', f'--config={ROOT}/configs/ppo_tiny.py', f'--workdir={workdir}',
                 '--no_sample', '--config.steps=2'])
  assert rc == 0
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  train = [r for r in records if r['split'] == 'train']
  assert train and all(np.isfinite(v) for r in train for v in r.values()
                       if isinstance(v, (int, float)))
  for key in ('policy_loss', 'value_loss', 'kl', 'score', 'entropy', 'approx_kl'):
    assert key in train[-1]
  # the time split: per iteration, and running totals that leave out the first (compiling) one
  first, last = train[0], train[-1]
  for phase in ('rollout', 'score', 'update'):
    assert first[f'time/{phase}_s'] > 0 and first[f'time/{phase}_total_s'] == 0.0
    assert last[f'time/{phase}_total_s'] == pytest.approx(last[f'time/{phase}_s'])
  assert last['rollout_tokens'] > 0
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  assert summary['timed_iterations'] == 1 and not summary['timing_includes_compile']
  assert summary['time_update_s'] == pytest.approx(last['time/update_total_s'])
  fractions = [summary[f'{p}_fraction'] for p in ('rollout', 'score', 'update')]
  assert all(0 < f < 1 for f in fractions) and sum(fractions) == pytest.approx(1.0)
  merged = str(tmp_path / 'merged')
  assert cli.main(['peft', 'merge', f'--workdir={workdir}', f'--output={merged}']) == 0
  assert os.path.isdir(os.path.join(merged, 'params'))


def test_every_update_of_an_iteration_uses_the_iterations_learning_rate():
  # PPO makes epochs x minibatches updates per iteration; warmup and decay count iterations.
  from lmjax.optim import make_optimizer  # pylint: disable=g-import-not-at-top
  config = base_config()
  opt = config.optimizer
  opt.name, opt.b1, opt.weight_decay, opt.grad_clip = 'sgd', 0.0, 0.0, 0.0
  opt.learning_rate, opt.warmup_steps, opt.schedule = 1.0, 4, 'constant'
  tx, schedule = make_optimizer(opt, steps=8, updates_per_step=3)
  params = {'w': jnp.zeros(())}
  state = tx.init(params)
  rates = []
  for _ in range(12):
    updates, state = tx.update({'w': jnp.ones(())}, state, params)
    rates.append(-float(updates['w']))
  expected = [float(schedule(i // 3)) for i in range(12)]
  assert rates == pytest.approx(expected)
  assert expected[:6] == pytest.approx([0.0, 0.0, 0.0, 0.25, 0.25, 0.25])
