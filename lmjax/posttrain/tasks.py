"""Post-training tasks for the one training loop: data iterator, loss sums and optimizer.

`loss_sums(task, params, batch, rng)` returns the same sums contract as pretraining
(`losses.cross_entropy`): 'loss' (what is differentiated), 'nll' (the reported loss), 'z' and
'weight' (the denominator), plus any metric sums, which the train step divides by 'weight'.
  sft     token-weighted cross-entropy on response tokens (weight = response tokens)
  reward  Bradley-Terry on a scalar head over the last non-padding token (weight = pairs)
  dpo     `post.loss_type` sigmoid | ipo | hinge (DPO family, reference = frozen base or the
          base with adapters off; `post.chosen_nll_coef` adds the chosen responses' per-token
          NLL: RPO), orpo (no reference) or kto (weight = pairs). KTO on a paired
          file treats chosen rows as desirable and rejected rows as undesirable; on an unpaired
          file (`desirable` in the batch) its reference point z0 is the batch mean of
          policy - reference log-prob on the mismatched `kl_` rows (weight = examples)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from lmjax import losses
from lmjax.models.transformer import forward, forward_hidden
from lmjax.optim import make_optimizer as make_base_optimizer
from lmjax.peft import lora
from lmjax.posttrain import params as params_lib
from lmjax.posttrain.params import Task
from lmjax.train.step import loss_sums as token_loss_sums

DPO_LOSS_TYPES = ('sigmoid', 'ipo', 'hinge', 'orpo', 'kto')
_ROW_KEYS = ('inputs', 'targets', 'segment_ids', 'positions', 'weights')


def make_iterator(config, tok, process_index: int = 0, process_count: int = 1):
  from lmjax.data import preference, sft  # pylint: disable=g-import-not-at-top
  if config.task == 'sft':
    return sft.make_sft_iterator(config, tok, process_index, process_count)
  if config.task in ('reward', 'dpo'):
    return preference.make_preference_iterator(config, tok, process_index, process_count)
  raise ValueError(f'task: no data iterator for {config.task!r}')


def make_optimizer(config, task: Task | None, updates_per_step: int = 1):
  """The config's optimizer over the trainable tree; LoRA+ scales B's updates (= its LR, also for
  decoupled weight decay) by `peft.lora_plus_ratio`."""
  tx, schedule = make_base_optimizer(config.optimizer, config.steps, updates_per_step)
  if task is not None and task.peft.enabled and task.peft.lora_plus_ratio != 1.0:
    def mask(trainable):
      out = jax.tree.map(lambda _: False, trainable)
      out['adapters'] = lora.lora_b_mask(task.peft, trainable['adapters'])
      return out
    tx = optax.chain(tx, optax.masked(optax.scale(task.peft.lora_plus_ratio), mask))
  return tx, schedule


def score_last_token(hidden_BLD, segment_ids_BL, head):
  """Scalar head on the hidden state of each row's last non-padding token: (B,)."""
  length = segment_ids_BL.shape[1]
  last_B = jnp.max(jnp.where(segment_ids_BL > 0, jnp.arange(length)[None, :], 0), axis=1)
  last_BD = jnp.take_along_axis(hidden_BLD, last_B[:, None, None], axis=1)[:, 0]
  return last_BD.astype(jnp.float32) @ head['w'] + head['b']


def _pair_rows(batch):
  """Chosen rows then rejected rows, stacked: (2B, L) arrays."""
  return {k: jnp.concatenate([batch[f'chosen_{k}'], batch[f'rejected_{k}']]) for k in _ROW_KEYS}


def _run(task: Task, model, rows, peft=None):
  return forward(task.model, model, rows['inputs'], rows['positions'], rows['segment_ids'],
                 peft=peft)[0]


def reward_scores(task: Task, params, rows, rng=None):
  model = params_lib.model_params(task, params, rng)
  _, hidden_BLD = forward_hidden(task.model, model, rows['inputs'], rows['positions'],
                                 rows['segment_ids'], peft=params_lib.model_peft(task, params))
  return score_last_token(hidden_BLD, rows['segment_ids'], params['trainable']['head'])


def _sums(loss, metrics, n):
  out = {'loss': loss * n, 'nll': loss * n, 'z': jnp.zeros((), jnp.float32),
         'weight': jnp.asarray(n, jnp.float32)}
  out.update({k: v * n for k, v in metrics.items()})
  return out


def sft_sums(task: Task, params, batch, rng=None):
  return token_loss_sums(task.model, params_lib.model_params(task, params, rng), batch,
                         peft=params_lib.model_peft(task, params))


def reward_sums(task: Task, params, batch, rng=None):
  n = batch['chosen_inputs'].shape[0]
  scores = reward_scores(task, params, _pair_rows(batch), rng)
  loss, metrics = losses.reward_loss(scores[:n], scores[n:], task.post.margin,
                                     task.post.center_coef)
  return _sums(loss, metrics, n)


def sequence_log_probs(task: Task, model, rows, peft=None):
  """Per-row sum of log p(target) over the weighted tokens of `rows` (B,) under plain `model`."""
  logits_BLV = _run(task, model, rows, peft)
  return losses.sequence_log_probs(logits_BLV, rows['targets'], rows['weights'])


def kto_unpaired_sums(task: Task, params, batch, rng=None):
  """KTO on unpaired rows; z0 = max(0, mean(policy - reference)) on the `kl_` rows when present,
  else the loss's default (the batch mean on the rows themselves)."""
  post = task.post
  n = batch['inputs'].shape[0]
  rows = {k: batch[k] for k in _ROW_KEYS}
  model, peft = params_lib.model_params(task, params, rng), params_lib.model_peft(task, params)
  ref = params_lib.reference_params(task, params)
  logps_B = sequence_log_probs(task, model, rows, peft)
  kl_ref = None
  if 'kl_inputs' in batch:
    kl_rows = {k: batch[f'kl_{k}'] for k in _ROW_KEYS}
    both = {k: jnp.concatenate([rows[k], kl_rows[k]]) for k in _ROW_KEYS}
    ref_logps_B = jax.lax.stop_gradient(sequence_log_probs(task, ref, both))
    kl_logps_B = jax.lax.stop_gradient(sequence_log_probs(task, model, kl_rows, peft))
    kl_ref = jnp.mean(kl_logps_B - ref_logps_B[n:])
    ref_logps_B = ref_logps_B[:n]
  else:
    ref_logps_B = jax.lax.stop_gradient(sequence_log_probs(task, ref, rows))
  loss, metrics = losses.kto_loss(logps_B, ref_logps_B, batch['desirable'], kl_ref, post.beta,
                                  post.kto_desirable_weight, post.kto_undesirable_weight)
  return _sums(loss, metrics, n)


def preference_sums(task: Task, params, batch, rng=None):
  post = task.post
  if 'desirable' in batch:
    return kto_unpaired_sums(task, params, batch, rng)
  n = batch['chosen_inputs'].shape[0]
  rows = _pair_rows(batch)
  logits = _run(task, params_lib.model_params(task, params, rng), rows,
                params_lib.model_peft(task, params))
  if post.loss_type == 'orpo':
    avg = losses.sequence_log_probs(logits, rows['targets'], rows['weights'], average=True)
    loss, metrics = losses.orpo_loss(avg[:n], avg[n:], -avg[:n], post.beta)
    return _sums(loss, metrics, n)
  logps = losses.sequence_log_probs(logits, rows['targets'], rows['weights'])
  ref_logps = jax.lax.stop_gradient(
      sequence_log_probs(task, params_lib.reference_params(task, params), rows))
  if post.loss_type == 'kto':
    desirable = jnp.concatenate([jnp.ones((n,)), jnp.zeros((n,))])
    loss, metrics = losses.kto_loss(logps, ref_logps, desirable, None, post.beta,
                                    post.kto_desirable_weight, post.kto_undesirable_weight)
  else:
    loss, metrics = losses.dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:],
                                    post.beta, post.loss_type, post.label_smoothing)
    if post.chosen_nll_coef:  # RPO: + the per-token NLL of the chosen responses
      tokens_B = jnp.maximum(jnp.sum(rows['weights'][:n], axis=-1), 1.0)
      metrics['chosen_nll'] = jnp.mean(-logps[:n] / tokens_B)
      loss = loss + post.chosen_nll_coef * metrics['chosen_nll']
  return _sums(loss, metrics, n)


_SUMS = {'sft': sft_sums, 'reward': reward_sums, 'dpo': preference_sums}


def loss_sums(task: Task, params, batch, rng=None):
  """The task's loss sums for the train step (see the module docstring)."""
  return _SUMS[task.name](task, params, batch, rng)
