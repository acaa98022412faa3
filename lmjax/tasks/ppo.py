"""PPO (RLHF) and GRPO as a task of the one loop: two experience phases, then the updates.

Each step (one iteration):
  rollout  `post.rollout_batch // post.group_size` prompts (left-padded to one width for the whole
           prompt file), each sampled `group_size` times with the KV-cache sampler from the
           current policy (adapters merged once), inside one jitted, sharded program;
  score    the policy's log-probs (old_logp), the reference's (the frozen base: adapters off, or a
           stored copy), the value head and the reward: the reward model's score at the last token
           (`post.reward_model`, a reward workdir) or the toy reward (count of
           `post.toy_reward_token`); per-token reward = -kl_coef * KL estimate (k1/k2/k3) plus the
           score at the last response token; GAE and masked whitening (gae), or group-relative
           advantages with the KL term in the loss instead (grpo);
  update   `post.ppo_epochs` passes of `post.minibatches` updates (the train step's update
           schedule, `Task.updates`): clipped policy loss + value_coef * clipped value loss -
           entropy_coef * entropy, gradients w.r.t. params['trainable'] only.
With `post.target_kl > 0` the KL coefficient adapts (proportional controller, Ziegler et al.); it
lives in the train state (`task_state['kl_coef']`) and every scored row carries the coefficient
it was scored with. Every random draw derives from (seed, step), so a resumed run is exact.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import losses
from lmjax import workdir as workdir_lib
from lmjax.data import examples as examples_lib
from lmjax.data.sft import EpochIterator
from lmjax.inference.generate import SamplingConfig, decode, left_pad, prefill
from lmjax.models.transformer import ModelConfig, forward, forward_hidden
from lmjax.tasks import params as params_lib
from lmjax.tasks.finetune import FineTuneTask, sequence_sums
from lmjax.tasks.preference import RewardTask, reward_scores


def prompt_rows(prompts: list[list[int]], width: int) -> dict[str, np.ndarray]:
  """Prompts left-padded to `width`: tokens, positions (0 at each first real token), segment ids."""
  return dict(zip(('prompt_tokens', 'prompt_positions', 'prompt_segment_ids'),
                  left_pad(prompts, width=width)))


def rollout_rows(prompt: dict, responses_BN, lengths_B) -> dict:
  """Left-padded prompt (width P) + response (N): (B, P + N) tokens, positions, segment ids, and
  the response mask (B, N) (1 up to and including the stop token)."""
  n = responses_BN.shape[1]
  mask_BN = (jnp.arange(n)[None, :] < lengths_B[:, None]).astype(jnp.float32)
  prompt_len_B = jnp.sum(prompt['prompt_segment_ids'], axis=1)
  return {
      'tokens': jnp.concatenate([prompt['prompt_tokens'],
                                 jnp.where(mask_BN > 0, responses_BN, 0)], axis=1),
      'positions': jnp.concatenate([prompt['prompt_positions'],
                                    prompt_len_B[:, None] + jnp.arange(n)[None, :]], axis=1),
      'segment_ids': jnp.concatenate([prompt['prompt_segment_ids'], mask_BN.astype(jnp.int32)],
                                     axis=1),
      'mask': mask_BN,
  }


def _response_view(model_cfg: ModelConfig, model, rollout, temperature: float, with_hidden: bool):
  """(log p of each response token (B, N), entropies (B, N), hidden states (B, N, D) or None) for
  the positions that predict the response tokens."""
  tokens = rollout['tokens']
  width = tokens.shape[1] - rollout['mask'].shape[1]
  args = (tokens[:, :-1], rollout['positions'][:, :-1], rollout['segment_ids'][:, :-1])
  if with_hidden:
    logits, hidden = forward_hidden(model_cfg, model, *args)
    hidden = hidden[:, width - 1:]
  else:
    logits, hidden = forward(model_cfg, model, *args), None
  logits = logits[:, width - 1:] / temperature
  return (losses.token_log_probs(logits, tokens[:, width:]), losses.entropy_from_logits(logits),
          hidden)


def _value(head, hidden_BND):
  return hidden_BND.astype(jnp.float32) @ head['w'] + head['b']


def score_rollout(task: 'PpoTask', params, rollout, kl_coef, reward_params=None):
  """Old log-probs, values, reference log-probs, the sequence score and the advantages."""
  post = task.post
  use_value = post.advantage == 'gae'
  model = params_lib.model_params(task, params)
  logp, _, hidden = _response_view(task.model, model, rollout, post.temperature, use_value)
  ref_logp, _, _ = _response_view(task.model, params_lib.reference_params(task, params), rollout,
                                  post.temperature, False)
  mask = rollout['mask']
  width = rollout['tokens'].shape[1] - mask.shape[1]
  if task.reward is None:
    score_B = jnp.sum((rollout['tokens'][:, width:] == post.toy_reward_token) * mask, axis=1)
    score_B = score_B.astype(jnp.float32)
  else:
    rows = {'inputs': rollout['tokens'], 'positions': rollout['positions'],
            'segment_ids': rollout['segment_ids']}
    score_B = reward_scores(task.reward, reward_params, rows)
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
  rows = mask.shape[0]
  return {'old_logp': logp, 'ref_logp': ref_logp, 'values': values, 'advantages': adv,
          'returns': returns, 'kl_coef': jnp.full((rows,), kl_coef, jnp.float32),
          **rollout}, stats


def ppo_loss(task: 'PpoTask', params, mb):
  """(loss, metrics) on one minibatch of scored rows: means over its response tokens."""
  post = task.post
  use_value = post.advantage == 'gae'
  model = params_lib.model_params(task, params)
  logp, entropy, hidden = _response_view(task.model, model, mb, post.temperature, use_value)
  mask = mb['mask']
  loss, metrics = losses.ppo_policy_loss(logp, mb['old_logp'], mb['advantages'], mask,
                                         post.clip_eps)
  metrics['policy_loss'] = loss
  if use_value:
    values = _value(params['trainable']['value'], hidden)
    value_loss, value_metrics = losses.ppo_value_loss(values, mb['values'], mb['returns'], mask,
                                                      post.value_clip)
    loss = loss + post.value_coef * value_loss
    metrics.update(value_metrics, value_loss=value_loss)
  else:  # grpo: the KL to the reference is a loss term (k3)
    kl = losses.masked_mean(losses.kl_penalty(logp, mb['ref_logp'], 'k3'), mask)
    loss = loss + mb['kl_coef'][0] * kl
  entropy = losses.masked_mean(entropy, mask)
  loss = loss - post.entropy_coef * entropy
  metrics.update(entropy=entropy)
  return loss, metrics


def next_kl_coef(kl_coef, kl, target_kl: float):
  """The adaptive KL controller: coef * (1 + 0.1 * clip(kl / target - 1, -0.2, 0.2))."""
  if target_kl <= 0:
    return kl_coef
  return kl_coef * (1.0 + 0.1 * jnp.clip(kl / target_kl - 1.0, -0.2, 0.2))


@functools.partial(jax.jit, static_argnums=0)
def _greedy_eval(task: 'PpoTask', params, reward_params, prompt):
  """score, kl and response_length (means over rows) of greedy completions of `prompt` rows."""
  policy = params_lib.model_params(task, params, merged=True)
  n = task.post.max_new_tokens
  logits_BV, cache = prefill(task.model, policy, prompt['prompt_tokens'],
                             prompt['prompt_positions'], prompt['prompt_segment_ids'],
                             max_len=prompt['prompt_tokens'].shape[1] + n)
  tokens_BN, _, _, lengths_B, _ = decode(
      task.model, SamplingConfig(max_new_tokens=n, temperature=0.0, stop_ids=task.stop_ids),
      policy, cache, logits_BV, jnp.sum(prompt['prompt_segment_ids'], axis=1),
      prompt['prompt_tokens'], prompt['prompt_segment_ids'], jax.random.key(0))
  _, stats = score_rollout(task, params, rollout_rows(prompt, tokens_BN, lengths_B),
                           jnp.zeros((), jnp.float32), reward_params)
  return {k: stats[k] for k in ('score', 'kl', 'response_length')}


@dataclasses.dataclass(frozen=True)
class PpoTask(FineTuneTask):
  reward: Any = None  # the RewardTask of post.reward_model; None: the toy reward
  stop_ids: tuple = ()  # tokens that end a response (the tokenizer's eos, `bind`)

  name = 'ppo'
  heads = ('value',)
  phases = ('rollout', 'score')

  @property
  def needs_reference(self) -> bool:
    return True

  @property
  def updates(self):
    return self.post.ppo_epochs, self.post.minibatches

  @classmethod
  def from_config(cls, config, model, pipeline):
    task = super().from_config(config, model, pipeline)
    if not config.post.reward_model:
      return task
    reward_config = workdir_lib.read_config(config.post.reward_model)
    if reward_config is None or reward_config.task != 'reward':
      from lmjax.config import ConfigError  # pylint: disable=g-import-not-at-top
      raise ConfigError(f'post.reward_model: {config.post.reward_model} is not a reward-model '
                        'workdir (task=reward)')
    reward = RewardTask.from_config(reward_config, ModelConfig.from_config(reward_config.model),
                                    (1, 1))
    return dataclasses.replace(task, reward=reward)

  def bind(self, tokenizer) -> 'PpoTask':
    return dataclasses.replace(self, stop_ids=(tokenizer.eos_id,))

  def make_iterator(self, config, tokenizer, process_index=0, process_count=1):
    prompts = examples_lib.load_prompts(config, tokenizer)[0]
    width = -(-max(len(p) for p in prompts) // 8) * 8  # one width for the file: one program
    group = self.post.group_size

    def make_rows(example_at, start, rows):
      chosen = [example_at(start + i) for i in range(rows // group)]
      return prompt_rows([p for p in chosen for _ in range(group)], width), rows // group

    return EpochIterator(prompts, make_rows, self.post.rollout_batch, config.seed, process_index,
                         process_count)

  def init_task_state(self):
    return {'kl_coef': jnp.asarray(self.post.kl_coef, jnp.float32)}

  def batch_spec(self, config):
    """Prompt rows as wide as the row length leaves room for: seq_len - max_new_tokens (the
    iterator's width is the file's longest prompt, rounded up to 8)."""
    shape = (config.post.rollout_batch, config.seq_len - self.post.max_new_tokens)
    return {key: jax.ShapeDtypeStruct(shape, jnp.int32)
            for key in ('prompt_tokens', 'prompt_positions', 'prompt_segment_ids')}

  def auxiliary_spec(self, mesh, rules):
    """`load_auxiliary`'s shapes and layout, without reading the reward model's workdir."""
    return None if self.reward is None else self.reward.abstract_params(mesh, rules)

  def load_auxiliary(self, mesh, rules):
    """The reward model's params, restored straight into the mesh layout of its rules."""
    if self.reward is None:
      return None
    return workdir_lib.load_params(self.post.reward_model,
                                   self.reward.abstract_params(mesh, rules))

  def experience(self, phase, state, aux, batch):
    task_state = state.task_state
    if phase == 'rollout':
      rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
      policy = params_lib.model_params(self, state.params, merged=True)
      n = self.post.max_new_tokens
      sampling = SamplingConfig(max_new_tokens=n, temperature=self.post.temperature,
                                stop_ids=self.stop_ids)
      prompt = batch
      logits_BV, cache = prefill(self.model, policy, prompt['prompt_tokens'],
                                 prompt['prompt_positions'], prompt['prompt_segment_ids'],
                                 max_len=prompt['prompt_tokens'].shape[1] + n)
      next_pos_B = jnp.sum(prompt['prompt_segment_ids'], axis=1)
      tokens_BN, _, _, lengths_B, _ = decode(
          self.model, sampling, policy, cache, logits_BV, next_pos_B, prompt['prompt_tokens'],
          prompt['prompt_segment_ids'], jax.random.fold_in(rng, 2))  # 1: the update's shuffles
      rollout = rollout_rows(prompt, tokens_BN, lengths_B)
      return rollout, {'rollout_tokens': jnp.sum(lengths_B).astype(jnp.float32)}, task_state
    data, stats = score_rollout(self, state.params, batch, task_state['kl_coef'], aux)
    new_coef = next_kl_coef(task_state['kl_coef'], stats['kl'], self.post.target_kl)
    return data, dict(stats, kl_coef=task_state['kl_coef']), {'kl_coef': new_coef}

  def make_eval_batches(self, config, tokenizer, process_index=0, process_count=1):
    """Held-out prompts (post.eval_file or post.eval_fraction of train_file) in batches of
    `rollout_batch` rows (the last one filled cyclically), at most `eval_batches`."""
    held = examples_lib.load_prompts(config, tokenizer)[1]
    if not held:
      return []
    rows = self.post.rollout_batch
    width = -(-max(len(p) for p in held) // 8) * 8
    mine = slice(process_index * rows // process_count,
                 (process_index + 1) * rows // process_count)
    count = min(-(-len(held) // rows), config.eval_batches)
    return [{k: v[mine] for k, v in prompt_rows(
        [held[(b * rows + i) % len(held)] for i in range(rows)], width).items()}
            for b in range(count)]

  def evaluate(self, eval_fn, params, batches, to_device=lambda batch: batch, aux=None):
    """Greedy completions of the held-out prompts: their mean reward (`score`), their KL to the
    reference (`kl`, summed over the response, post.kl_estimator) and `response_length`."""
    del eval_fn
    totals = {}
    for batch in batches:
      stats = jax.device_get(_greedy_eval(self, params, aux, to_device(batch)))
      rows = next(iter(batch.values())).shape[0]
      for key, value in stats.items():
        totals[key] = totals.get(key, 0.0) + float(value) * rows
      totals['prompts'] = totals.get('prompts', 0.0) + rows
    return {k: (v if k == 'prompts' else v / max(totals['prompts'], 1.0))
            for k, v in totals.items()}

  def sums(self, params, batch, rng):
    del rng
    loss, metrics = ppo_loss(self, params, batch)
    return sequence_sums(loss, metrics, batch['mask'].shape[0])

  def step_tokens(self, batch):
    """Updates: every rollout token ppo_epochs times; forward only: the rollout (prefill and
    decode) and the policy and reference scoring passes (the reward model is counted at the
    policy's FLOPs per token)."""
    rows, width = batch['prompt_tokens'].shape
    length = width + self.post.max_new_tokens
    forward_passes = 3 + (self.reward is not None)
    return self.post.ppo_epochs * rows * length, forward_passes * rows * length
