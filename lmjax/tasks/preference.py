"""Preference tasks: reward models (Bradley-Terry) and the DPO family (DPO, IPO, hinge, ORPO, KTO).

Each loss is a mean over pairs (or examples), returned as sums with weight = pairs (see
`lmjax.tasks.base`).
  reward  Bradley-Terry on a scalar head over the last non-padding token
  dpo     `post.loss_type` sigmoid | ipo | hinge (DPO family, reference = frozen base or the
          base with adapters off; `post.chosen_nll_coef` adds the chosen responses' per-token
          NLL: RPO), orpo (no reference) or kto. KTO on a paired file treats chosen rows as
          desirable and rejected rows as undesirable; on an unpaired file (`desirable` in the
          batch) its reference point z0 is the batch mean of policy - reference log-prob on the
          mismatched `kl_` rows
Held out (`eval_metrics`): the loss, pair accuracy and mean margin of the rewards (reward model:
its scores; DPO family: the implicit rewards beta x (policy - reference) log-prob), the chosen and
rejected rewards and (DPO family) the chosen and rejected log-probs, averaged over held-out pairs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmjax import losses
from lmjax.data import preference as preference_data
from lmjax.models.transformer import forward, forward_hidden
from lmjax.tasks import params as params_lib
from lmjax.tasks.base import token_rows_spec
from lmjax.tasks.finetune import FineTuneTask, sequence_sums

_ROW_KEYS = ('inputs', 'targets', 'segment_ids', 'positions', 'weights')


def score_last_token(hidden_BLD, segment_ids_BL, head):
  """Scalar head on the hidden state of each row's last non-padding token: (B,)."""
  length = segment_ids_BL.shape[1]
  last_B = jnp.max(jnp.where(segment_ids_BL > 0, jnp.arange(length)[None, :], 0), axis=1)
  last_BD = jnp.take_along_axis(hidden_BLD, last_B[:, None, None], axis=1)[:, 0]
  return last_BD.astype(jnp.float32) @ head['w'] + head['b']


def _pair_rows(batch):
  """Chosen rows then rejected rows, stacked: (2B, L) arrays."""
  return {k: jnp.concatenate([batch[f'chosen_{k}'], batch[f'rejected_{k}']]) for k in _ROW_KEYS}


def _run(task, model, rows, peft=None):
  return forward(task.model, model, rows['inputs'], rows['positions'], rows['segment_ids'],
                 peft=peft)


def reward_scores(task, params, rows, rng=None):
  model = params_lib.model_params(task, params, rng)
  _, hidden_BLD = forward_hidden(task.model, model, rows['inputs'], rows['positions'],
                                 rows['segment_ids'], peft=params_lib.peft_leaves(task, params))
  return score_last_token(hidden_BLD, rows['segment_ids'], params['trainable']['head'])


def reward_sums(task, params, batch, rng=None):
  n = batch['chosen_inputs'].shape[0]
  scores = reward_scores(task, params, _pair_rows(batch), rng)
  loss, metrics = losses.reward_loss(scores[:n], scores[n:], task.post.margin,
                                     task.post.center_coef)
  return sequence_sums(loss, metrics, n)


def rows_log_probs(task, model, rows, peft=None):
  """Per-row sum of log p(target) over the weighted tokens of `rows` (B,) under plain `model`."""
  logits_BLV = _run(task, model, rows, peft)
  return losses.sequence_log_probs(logits_BLV, rows['targets'], rows['weights'])


def kto_unpaired_sums(task, params, batch, rng=None):
  """KTO on unpaired rows; z0 = max(0, mean(policy - reference)) on the `kl_` rows when present,
  else the loss's default (the batch mean on the rows themselves)."""
  post = task.post
  n = batch['inputs'].shape[0]
  rows = {k: batch[k] for k in _ROW_KEYS}
  model, peft = params_lib.model_params(task, params, rng), params_lib.peft_leaves(task, params)
  ref = params_lib.reference_params(task, params)
  logps_B = rows_log_probs(task, model, rows, peft)
  kl_ref = None
  if 'kl_inputs' in batch:
    kl_rows = {k: batch[f'kl_{k}'] for k in _ROW_KEYS}
    both = {k: jnp.concatenate([rows[k], kl_rows[k]]) for k in _ROW_KEYS}
    ref_logps_B = jax.lax.stop_gradient(rows_log_probs(task, ref, both))
    kl_logps_B = jax.lax.stop_gradient(rows_log_probs(task, model, kl_rows, peft))
    kl_ref = jnp.mean(kl_logps_B - ref_logps_B[n:])
    ref_logps_B = ref_logps_B[:n]
  else:
    ref_logps_B = jax.lax.stop_gradient(rows_log_probs(task, ref, rows))
  loss, metrics = losses.kto_loss(logps_B, ref_logps_B, batch['desirable'], kl_ref, post.beta,
                                  post.kto_desirable_weight, post.kto_undesirable_weight)
  metrics['chosen_logps'] = losses.masked_mean(logps_B, batch['desirable'])
  metrics['rejected_logps'] = losses.masked_mean(logps_B, 1.0 - batch['desirable'])
  return sequence_sums(loss, metrics, n)


def preference_sums(task, params, batch, rng=None):
  post = task.post
  if 'desirable' in batch:
    return kto_unpaired_sums(task, params, batch, rng)
  n = batch['chosen_inputs'].shape[0]
  rows = _pair_rows(batch)
  logits = _run(task, params_lib.model_params(task, params, rng), rows,
                params_lib.peft_leaves(task, params))
  logps = losses.sequence_log_probs(logits, rows['targets'], rows['weights'])
  logp_metrics = {'chosen_logps': jax.lax.stop_gradient(jnp.mean(logps[:n])),
                  'rejected_logps': jax.lax.stop_gradient(jnp.mean(logps[n:]))}
  if post.loss_type == 'orpo':
    avg = losses.sequence_log_probs(logits, rows['targets'], rows['weights'], average=True)
    loss, metrics = losses.orpo_loss(avg[:n], avg[n:], -avg[:n], post.beta)
    return sequence_sums(loss, {**metrics, **logp_metrics}, n)
  ref_logps = jax.lax.stop_gradient(
      rows_log_probs(task, params_lib.reference_params(task, params), rows))
  if post.loss_type == 'kto':
    desirable = jnp.concatenate([jnp.ones((n,)), jnp.zeros((n,))])
    loss, metrics = losses.kto_loss(logps, ref_logps, desirable, None, post.beta,
                                    post.kto_desirable_weight, post.kto_undesirable_weight)
    rewards = jax.lax.stop_gradient(post.beta * (logps - ref_logps))
    metrics['margin'] = jnp.mean(rewards[:n] - rewards[n:])
    metrics['accuracy'] = jnp.mean((rewards[:n] > rewards[n:]).astype(jnp.float32))
  else:
    loss, metrics = losses.dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:],
                                    post.beta, post.loss_type, post.label_smoothing)
    if post.chosen_nll_coef:  # RPO: + the per-token NLL of the chosen responses
      tokens_B = jnp.maximum(jnp.sum(rows['weights'][:n], axis=-1), 1.0)
      metrics['chosen_nll'] = jnp.mean(-logps[:n] / tokens_B)
      loss = loss + post.chosen_nll_coef * metrics['chosen_nll']
  return sequence_sums(loss, {**metrics, **logp_metrics}, n)


def _pair_tokens(batch) -> int:
  rows, columns = batch['chosen_inputs'].shape
  return 2 * rows * columns


class RewardTask(FineTuneTask):
  """A scalar head ('head') on the final hidden state; chosen and rejected rows run together."""
  name = 'reward'
  heads = ('head',)

  def make_iterator(self, config, tokenizer, process_index=0, process_count=1):
    return preference_data.make_preference_iterator(config, tokenizer, process_index,
                                                    process_count)

  def make_eval_batches(self, config, tokenizer, process_index=0, process_count=1):
    return preference_data.make_eval_batches(config, tokenizer, process_index, process_count)

  def eval_sums(self, params, batch):
    """Every sum of the loss (its metrics included) on a held-out batch."""
    return self.loss_sums(*self.split(params), batch, None)

  def eval_metrics(self, totals):
    """Means over the held-out pairs (or KTO rows): loss, accuracy, margin, rewards and
    log-probs; `pairs` counts them."""
    weight = max(totals['weight'], 1.0)
    out = {k: v / weight for k, v in totals.items() if k not in ('weight', 'z', 'nll')}
    out['pairs'] = totals['weight']
    return out

  def batch_spec(self, config):
    """Pairs (unpaired KTO files yield other keys; their spec is not modelled here)."""
    return {**token_rows_spec(config.batch_size, config.seq_len, 'chosen_'),
            **token_rows_spec(config.batch_size, config.seq_len, 'rejected_')}

  def sums(self, params, batch, rng):
    return reward_sums(self, params, batch, rng)

  def step_tokens(self, batch):
    return _pair_tokens(batch), 0


class DpoTask(RewardTask):
  """The DPO family (`post.loss_type`); the reference pass runs forward only."""
  name = 'dpo'
  heads = ()

  @property
  def needs_reference(self) -> bool:
    return self.post.loss_type != 'orpo'

  def sums(self, params, batch, rng):
    return preference_sums(self, params, batch, rng)

  def step_tokens(self, batch):
    if 'desirable' in batch:  # unpaired KTO: policy rows; reference on rows + kl_ rows
      rows, columns = batch['inputs'].shape
      kl_rows = batch['kl_inputs'].shape[0] if 'kl_inputs' in batch else 0
      return rows * columns, (rows + 2 * kl_rows) * columns
    tokens = _pair_tokens(batch)
    return tokens, tokens if self.needs_reference else 0
