"""PPO (RLHF) and GRPO: the rollout-then-update outer loop.

Each iteration (one `step`):
  1. rollout: `post.rollout_batch // post.group_size` prompts, each sampled `group_size` times
     with the batched KV-cache sampler (`lmjax.generate.generate`) from the current policy;
  2. score: one jitted pass gives the policy's log-probs (old_logp), the reference's (the frozen
     base: adapters off, or a stored copy), the value head and the reward: the reward model's score
     at the last token (or the toy reward: count of `post.toy_reward_token`);
  3. advantages: per-token reward = -kl_coef * KL estimate (k1/k2/k3), plus the score at the last
     response token; GAE over the masked response tokens and masked whitening (gae), or
     group-relative advantages with the KL term in the loss instead (grpo, no value head);
  4. `post.ppo_epochs` passes of `post.minibatches` jitted updates: clipped policy loss + value_coef
     * clipped value loss - entropy_coef * entropy, gradients w.r.t. params['trainable'] only.
With `post.target_kl > 0` the KL coefficient adapts (proportional controller). Checkpoints use the
same `Checkpointer` (the state plus {'kl_coef'} as the data state), metrics the same writer.

Wall time: each iteration logs `time/{rollout,score,update}_s` (phase boundaries synchronised with
`jax.block_until_ready`), the running `time/*_total_s` over this process's iterations after its
first (which compiles), and `rollout_tokens_per_s`; summary.json carries the totals and fractions.
"""

from __future__ import annotations

import functools
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmjax import checkpoint as checkpoint_lib
from lmjax import config as config_lib
from lmjax import data as data_lib
from lmjax import losses
from lmjax.data.sft import read_jsonl
from lmjax.generate import SamplingConfig, generate
from lmjax.models.transformer import forward, forward_hidden
from lmjax.posttrain import params as params_lib
from lmjax.posttrain import tasks as tasks_lib
from lmjax.train import step as step_lib
from lmjax.train.metrics import MetricsWriter


def rollout_rows(prompts: list[list[int]], responses_BN: np.ndarray, lengths_B: np.ndarray):
  """Left-padded prompt (width P) + response (N): (B, P + N) tokens, positions, segment ids, and
  the response mask (B, N) (1 up to and including the stop token)."""
  batch, n = responses_BN.shape
  width = -(-max(len(p) for p in prompts) // 8) * 8  # few distinct widths: few compilations
  tokens = np.zeros((batch, width + n), np.int32)
  positions = np.zeros_like(tokens)
  segments = np.zeros_like(tokens)
  mask_BN = (np.arange(n)[None, :] < np.asarray(lengths_B)[:, None]).astype(np.float32)
  for row, prompt in enumerate(prompts):
    k = len(prompt)
    tokens[row, width - k:width] = prompt
    tokens[row, width:] = np.where(mask_BN[row] > 0, responses_BN[row], 0)
    positions[row, width - k:] = np.arange(k + n)
    segments[row, width - k:width] = 1
    segments[row, width:] = mask_BN[row]
  return {'tokens': tokens, 'positions': positions, 'segment_ids': segments,
          'mask': mask_BN}, width


def _response_view(task, model, rollout, width: int, temperature: float, with_hidden: bool):
  """(log p of each response token (B, N), entropies (B, N), hidden states (B, N, D) or None) for
  the positions that predict the response tokens."""
  tokens = rollout['tokens']
  args = (tokens[:, :-1], rollout['positions'][:, :-1], rollout['segment_ids'][:, :-1])
  if with_hidden:
    logits, hidden = forward_hidden(task.model, model, *args)
    hidden = hidden[:, width - 1:]
  else:
    logits, hidden = forward(task.model, model, *args)[0], None
  logits = logits[:, width - 1:] / temperature
  return (losses.token_log_probs(logits, tokens[:, width:]), losses.entropy_from_logits(logits),
          hidden)


def _value(head, hidden_BND):
  return hidden_BND.astype(jnp.float32) @ head['w'] + head['b']


@functools.partial(jax.jit, static_argnames=('task', 'width', 'reward_task'))
def score_rollout(task, params, rollout, width, kl_coef, reward_task=None, reward_params=None):
  """Old log-probs, values, reference log-probs, the sequence score and the advantages."""
  post = task.post
  use_value = post.advantage == 'gae'
  model = params_lib.model_params(task, params)
  logp, _, hidden = _response_view(task, model, rollout, width, post.temperature, use_value)
  ref_logp, _, _ = _response_view(task, params_lib.reference_params(task, params), rollout,
                                  width, post.temperature, False)
  mask = rollout['mask']
  if reward_task is None:
    score_B = jnp.sum((rollout['tokens'][:, width:] == post.toy_reward_token) * mask, axis=1)
    score_B = score_B.astype(jnp.float32)
  else:
    rows = {'inputs': rollout['tokens'], 'positions': rollout['positions'],
            'segment_ids': rollout['segment_ids']}
    score_B = tasks_lib.reward_scores(reward_task, reward_params, rows)
  kl_BN = losses.kl_penalty(logp, ref_logp, post.kl_estimator) * mask
  n = mask.shape[1]
  last_B = jnp.maximum(jnp.sum(mask, axis=1).astype(jnp.int32) - 1, 0)
  score_BN = jax.nn.one_hot(last_B, n) * score_B[:, None] * mask
  if use_value:
    values = _value(params['trainable']['value'], hidden) * mask
    rewards = score_BN - kl_coef * kl_BN
    adv, returns = losses.gae_advantages(rewards, values, mask, post.gamma, post.lam)
  else:
    values = returns = jnp.zeros_like(mask)
    adv = losses.grpo_advantages(score_B, post.group_size)[:, None] * mask
  if post.whiten_advantages:
    adv = losses.masked_whiten(adv, mask)
  stats = {'score': jnp.mean(score_B), 'kl': jnp.mean(jnp.sum(kl_BN, axis=1)),
           'response_length': jnp.mean(jnp.sum(mask, axis=1)),
           'value_mean': losses.masked_mean(values, mask)}
  return {'old_logp': logp, 'ref_logp': ref_logp, 'values': values, 'advantages': adv,
          'returns': returns, 'mask': mask, **rollout}, stats


def ppo_loss(task, trainable, frozen, mb, width, kl_coef):
  post = task.post
  params = {'trainable': trainable, 'frozen': frozen}
  use_value = post.advantage == 'gae'
  model = params_lib.model_params(task, params)
  logp, entropy, hidden = _response_view(task, model, mb, width, post.temperature, use_value)
  mask = mb['mask']
  loss, metrics = losses.ppo_policy_loss(logp, mb['old_logp'], mb['advantages'], mask,
                                         post.clip_eps)
  metrics['policy_loss'] = loss
  if use_value:
    values = _value(trainable['value'], hidden)
    value_loss, value_metrics = losses.ppo_value_loss(values, mb['values'], mb['returns'], mask,
                                                      post.value_clip)
    loss = loss + post.value_coef * value_loss
    metrics.update(value_metrics, value_loss=value_loss)
  else:  # grpo: the KL to the reference is a loss term (k3)
    kl = losses.masked_mean(losses.kl_penalty(logp, mb['ref_logp'], 'k3'), mask)
    loss = loss + kl_coef * kl
  entropy = losses.masked_mean(entropy, mask)
  loss = loss - post.entropy_coef * entropy
  metrics.update(entropy=entropy, loss=loss)
  return loss, metrics


@functools.partial(jax.jit, static_argnames=('task', 'tx', 'width'), donate_argnums=(1,))
def update_step(task, state, mb, tx, width, kl_coef):
  """One minibatch update of params['trainable']; a non-finite step is skipped."""
  trainable, frozen = state.params['trainable'], state.params['frozen']
  (loss, metrics), grads = jax.value_and_grad(ppo_loss, argnums=1, has_aux=True)(
      task, trainable, frozen, mb, width, kl_coef)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, trainable)
  new_trainable = optax.apply_updates(trainable, updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  state = state.replace(params={'trainable': keep(new_trainable, trainable), 'frozen': frozen},
                        opt_state=keep(opt_state, state.opt_state),
                        skipped=state.skipped + (~finite).astype(jnp.int32))
  return state, dict(metrics, grad_norm=grad_norm)


def _policy_params(task, params):
  return params_lib.model_params(task, params, merged=True)  # decoded step after step


def _load_reward(post):
  if not post.reward_model:
    return None, None
  reward_task, reward_params = params_lib.load_post_params(post.reward_model)
  if reward_task is None or reward_task.name != 'reward':
    raise config_lib.ConfigError(f'post.reward_model: {post.reward_model} is not a reward-model '
                                 'workdir (task=reward)')
  return reward_task, reward_params


def update_epochs(task, state, data, tx, width, kl_coef, rng):
  """`post.ppo_epochs` passes of `post.minibatches` updates over the scored rollout `data` (rows
  shuffled by the numpy generator `rng` each epoch): (state, per-update metrics on the host)."""
  post = task.post
  rows = data['mask'].shape[0]
  mb_size = rows // post.minibatches
  device_metrics = []
  for _ in range(post.ppo_epochs):
    order = rng.permutation(rows)
    for m in range(post.minibatches):
      idx = order[m * mb_size:(m + 1) * mb_size]
      mb = jax.tree.map(lambda x, idx=idx: x[idx], data)
      state, mb_metrics = update_step(task, state, mb, tx, width, jnp.float32(kl_coef))
      device_metrics.append(mb_metrics)
  return state, jax.device_get(device_metrics)  # one sync: updates are dispatched back to back


PHASES = ('rollout', 'score', 'update')


class PhaseClock:
  """Wall time of each phase of an iteration, and totals over the iterations after the first (a
  later iteration still compiles when its rollout brings a new prompt width)."""

  def __init__(self):
    self.last = dict.fromkeys(PHASES, 0.0)
    self.totals = dict.fromkeys(PHASES, 0.0)
    self.iterations = 0  # iterations finished by this process
    self._mark = time.perf_counter()

  def start(self):
    self._mark = time.perf_counter()

  def lap(self, phase: str, *outputs):
    """Ends `phase` once `outputs` are computed."""
    jax.block_until_ready(outputs)
    now = time.perf_counter()
    self.last[phase], self._mark = now - self._mark, now

  def finish(self) -> dict:
    """Closes the iteration; its metrics."""
    if self.iterations > 0:  # the first iteration compiles every program: not in the totals
      for phase in PHASES:
        self.totals[phase] += self.last[phase]
    self.iterations += 1
    return {**{f'time/{p}_s': self.last[p] for p in PHASES},
            **{f'time/{p}_total_s': self.totals[p] for p in PHASES}}

  def summary(self) -> dict:
    """Totals and fractions after the first iteration (the first one alone if it is the only)."""
    first_only = self.iterations == 1
    totals = self.last if first_only else self.totals
    overall = sum(totals.values())
    return {'timed_iterations': 1 if first_only else max(self.iterations - 1, 0),
            'timing_includes_compile': first_only,
            **{f'time_{p}_s': totals[p] for p in PHASES},
            **{f'{p}_fraction': totals[p] / overall if overall > 0 else None for p in PHASES}}


def _rollout(task, params, policy_fn, prompts, sampling, seed, pad_id):
  """Samples `group_size` responses per prompt: (rollout rows, prompt width, tokens generated)."""
  batch_prompts = [p for p in prompts for _ in range(task.post.group_size)]
  out = generate(task.model, policy_fn(params), batch_prompts, sampling, seed=seed, pad_id=pad_id)
  rollout, width = rollout_rows(batch_prompts, out['tokens'], out['lengths'])
  return rollout, width, int(np.sum(out['lengths']))


def train(config, workdir: str) -> dict:
  """Runs (or resumes) PPO per `config` in `workdir`; returns the run summary."""
  start_time = time.time()
  config_lib.validate(config, jax.device_count())
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump(config.to_dict(), f, indent=2, sort_keys=True)
  post = config.post
  tok = data_lib.load_or_train_tokenizer(config.data, config.model.vocab_size)
  prompts = [[tok.bos_id] + tok.encode(r['prompt']) for r in read_jsonl(post.train_file)]
  step_cfg = step_lib.StepConfig.from_config(config)
  task = step_cfg.task
  tx, schedule = tasks_lib.make_optimizer(config, task, post.ppo_epochs * post.minibatches)

  def create():
    state = step_lib.init_state(step_cfg, tx, config.seed)
    return state.replace(params=nn.unbox(state.params))

  checkpointer = checkpoint_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
  state = jax.jit(create)()
  kl_coef = post.kl_coef
  latest = checkpointer.latest_step()
  if latest is not None:
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                            state)
    state, data_state = checkpointer.restore(latest, abstract)
    kl_coef = data_state['kl_coef']
  elif config.init_from:
    state = params_lib.init_from(task, config.init_from, state)
  reward_task, reward_params = _load_reward(post)
  policy_fn = jax.jit(functools.partial(_policy_params, task))
  sampling = SamplingConfig(max_new_tokens=post.max_new_tokens, temperature=post.temperature,
                            stop_ids=(tok.eos_id,))
  n_prompts = post.rollout_batch // post.group_size
  writer = MetricsWriter(workdir, config.steps, int(state.step), enabled=True,
                         progress_bar=config.progress_bar)
  rng = np.random.default_rng([config.seed, int(state.step)])
  clock = PhaseClock()
  metrics = {}
  step = int(state.step)
  while step < config.steps:
    clock.start()
    chosen = [prompts[(step * n_prompts + i) % len(prompts)] for i in range(n_prompts)]
    rollout, width, generated = _rollout(task, state.params, policy_fn, chosen, sampling,
                                         config.seed * 100_003 + step, tok.pad_id)
    clock.lap('rollout')
    data, stats = score_rollout(task, state.params, rollout, width, jnp.float32(kl_coef),
                                reward_task, reward_params)
    clock.lap('score', data, stats)
    state, updates = update_epochs(task, state, data, tx, width, kl_coef, rng)
    clock.lap('update', state)
    stats = {k: float(v) for k, v in jax.device_get(stats).items()}
    if post.target_kl > 0:  # proportional controller (Ziegler et al.)
      error = float(np.clip(stats['kl'] / post.target_kl - 1.0, -0.2, 0.2))
      kl_coef = kl_coef * (1.0 + 0.1 * error)
    state = state.replace(step=state.step + 1)
    step += 1
    times = clock.finish()
    metrics = {**{k: float(np.mean([u[k] for u in updates])) for k in updates[0]}, **stats,
               **times, 'rollout_tokens_per_s': generated / max(times['time/rollout_s'], 1e-9),
               'kl_coef': kl_coef, 'learning_rate': float(schedule(step - 1)),
               'skipped': int(state.skipped)}
    if not all(np.isfinite(v) for v in metrics.values()):
      raise RuntimeError(f'ppo: non-finite metrics at step {step}: {metrics}')
    if step % config.log_every == 0 or step == config.steps:
      writer.write(step, 'train', metrics)
    writer.advance()
    if step % config.checkpoint_every == 0 or step == config.steps:
      checkpointer.save(step, state, {'kl_coef': kl_coef}, force=True)
  checkpointer.wait()
  checkpointer.close()
  writer.close()
  summary = {'step': step, 'finished': step >= config.steps, 'stopped_by_signal': False,
             'train_loss': metrics.get('loss'), 'eval_loss': None, 'eval_perplexity': None,
             'score': metrics.get('score'), 'kl': metrics.get('kl'), 'tokens': None,
             'skipped_steps': metrics.get('skipped'), 'wall_seconds': time.time() - start_time,
             **clock.summary()}
  with open(os.path.join(workdir, 'summary.json'), 'w', encoding='utf-8') as f:
    json.dump(summary, f, indent=2, sort_keys=True)
  return summary
