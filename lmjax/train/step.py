"""The train state and the pure, jittable train and eval steps.

`train_step(state, batch) -> (state, metrics)` accumulates gradients over `grad_accum_steps`
micro-batches as sums, then divides once by the total token weight: exactly the large-batch
gradient. A step whose loss or gradients are not finite (or, with `spike_sigmas`, whose loss spikes
above the recent mean) leaves params and optimizer state untouched and is counted.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from lmjax.losses import chunked_cross_entropy, cross_entropy
from lmjax.parallel import pipeline as pipeline_lib
from lmjax.models.transformer import ModelConfig, forward, forward_head_inputs


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # raw key data (uint32), so it checkpoints like any array
  skipped: jax.Array  # updates skipped so far (non-finite or spike)
  nonfinite_in_a_row: jax.Array
  recent_losses: jax.Array  # ring buffer for the loss-spike guard
  num_losses: jax.Array  # how many losses the ring buffer has seen


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """What the step needs from the config, as hashable static data."""
  model: ModelConfig
  grad_accum_steps: int = 1
  z_loss: float = 0.0
  spike_sigmas: float = 0.0
  spike_window: int = 100
  pipeline: tuple = (1, 1)  # (stages, micro-batches); stages > 1 = GPipe over mesh.pipeline
  task: Any = None  # lmjax.posttrain.params.Task; None = pretraining

  @classmethod
  def from_config(cls, config) -> 'StepConfig':
    from lmjax.posttrain.params import task_from_config  # pylint: disable=g-import-not-at-top
    return cls(ModelConfig.from_config(config.model), config.grad_accum_steps, config.z_loss,
               config.spike_sigmas, config.spike_window,
               pipeline=(pipeline_lib.stages_of(config), config.pipeline_microbatches),
               task=task_from_config(config))


def trainable_params(step_cfg: StepConfig, params):
  """The leaves that are differentiated and optimised (post-training: params['trainable'])."""
  return params if step_cfg.task is None else params['trainable']


def with_trainable(step_cfg: StepConfig, params, trainable):
  return trainable if step_cfg.task is None else {**params, 'trainable': trainable}


def init_state(step_cfg: StepConfig, tx: optax.GradientTransformation, seed: int) -> TrainState:
  """A fresh state (boxed params: logical axis names attached; unbox before use)."""
  from lmjax.models.transformer import init_params  # pylint: disable=g-import-not-at-top
  rng = jax.random.key(seed)
  params_rng, state_rng = jax.random.split(rng)
  params = init_params(step_cfg.model, params_rng)
  if step_cfg.task is not None:
    from lmjax.posttrain.params import build_params  # pylint: disable=g-import-not-at-top
    params = build_params(step_cfg.task, params, jax.random.fold_in(params_rng, 1))
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      opt_state=tx.init(trainable_params(step_cfg, nn.unbox(params))),
      rng=jax.random.key_data(state_rng), skipped=jnp.zeros((), jnp.int32),
      nonfinite_in_a_row=jnp.zeros((), jnp.int32),
      recent_losses=jnp.zeros((step_cfg.spike_window,), jnp.float32),
      num_losses=jnp.zeros((), jnp.int32))


def loss_sums(model_cfg: ModelConfig, params, batch, z_loss: float = 0.0, pipeline=(1, 1),
              peft=None):
  """Sums (see `losses.cross_entropy`) of the next-token loss on one batch (`peft`: in-model PEFT
  leaves, SFT). With `model.logits_chunk` > 0 (and no pipeline) the head and loss run chunk by
  chunk (`losses.chunked_cross_entropy`): the same sums without the (B, L, V) logits in memory."""
  args = (model_cfg, params, batch['inputs'], batch['positions'], batch['segment_ids'])
  if pipeline[0] > 1:
    logits_BLV, _ = pipeline_lib.forward(*args, stages=pipeline[0], microbatches=pipeline[1])
  elif model_cfg.logits_chunk > 0:
    hidden_BLD, head_DV = forward_head_inputs(*args, peft=peft)
    return chunked_cross_entropy(hidden_BLD, head_DV, batch['targets'], batch['weights'],
                                 model_cfg.logits_chunk, z_loss)
  else:
    logits_BLV, _ = forward(*args, peft=peft)
  return cross_entropy(logits_BLV, batch['targets'], batch['weights'], z_loss)


def accumulated_grads(step_cfg: StepConfig, params, batch, rng=None):
  """Gradient of the summed loss and the loss sums, accumulated over micro-batches.

  Post-training differentiates only `params['trainable']` (the frozen tree gets no gradient).
  """

  def grads_of(micro_batch):
    if step_cfg.task is not None:
      from lmjax.posttrain.tasks import loss_sums as task_sums  # pylint: disable=g-import-not-at-top
      task_fn = lambda t: (lambda s: (s['loss'], s))(task_sums(
          step_cfg.task, {**params, 'trainable': t}, micro_batch, rng))
      (_, sums), grads = jax.value_and_grad(task_fn, has_aux=True)(params['trainable'])
      return grads, sums
    sums_fn = lambda p: (lambda s: (s['loss'], s))(loss_sums(step_cfg.model, p, micro_batch,
                                                             step_cfg.z_loss, step_cfg.pipeline))
    (_, sums), grads = jax.value_and_grad(sums_fn, has_aux=True)(params)
    return grads, sums

  n = step_cfg.grad_accum_steps
  if n == 1:
    return grads_of(batch)
  micro = jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)

  def body(carry, micro_batch):
    grads, sums = grads_of(micro_batch)
    return jax.tree.map(jnp.add, carry, (grads, sums)), None

  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grads_of, jax.tree.map(lambda x: x[0], micro)))
  (grads, sums), _ = jax.lax.scan(body, zeros, micro)
  return grads, sums


def _is_spike(state: TrainState, loss, step_cfg: StepConfig):
  if not step_cfg.spike_sigmas:
    return jnp.zeros((), bool)
  window = step_cfg.spike_window
  mean = jnp.mean(state.recent_losses)
  std = jnp.std(state.recent_losses)
  return (state.num_losses >= window) & (loss > mean + step_cfg.spike_sigmas * std)


def train_step(step_cfg: StepConfig, tx: optax.GradientTransformation, schedule: Callable,
               state: TrainState, batch):
  """One optimizer step. Returns the new state and device-side metrics (no host sync)."""
  rng = None
  if step_cfg.task is not None:  # dropout in adapters
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  grads, sums = accumulated_grads(step_cfg, state.params, batch, rng)
  weight = jnp.maximum(sums['weight'], 1.0)
  grads = jax.tree.map(lambda g: g / weight, grads)
  loss = sums['nll'] / weight
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(sums['loss']) & jnp.isfinite(grad_norm)
  spike = finite & _is_spike(state, loss, step_cfg)
  apply = finite & ~spike

  trainable = trainable_params(step_cfg, state.params)
  updates, new_opt_state = tx.update(grads, state.opt_state, trainable)
  new_params = with_trainable(step_cfg, state.params, optax.apply_updates(trainable, updates))
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(apply, a, b), new, old)

  recent = state.recent_losses.at[state.num_losses % step_cfg.spike_window].set(loss)
  new_state = state.replace(
      step=state.step + 1,
      params=keep(new_params, state.params),
      opt_state=keep(new_opt_state, state.opt_state),
      skipped=state.skipped + (~apply).astype(jnp.int32),
      nonfinite_in_a_row=jnp.where(finite, 0, state.nonfinite_in_a_row + 1),
      recent_losses=jnp.where(finite, recent, state.recent_losses),
      num_losses=state.num_losses + finite.astype(jnp.int32))
  metrics = {
      'loss': loss,
      'z_loss': sums['z'] / weight,
      'grad_norm': grad_norm,
      'learning_rate': schedule(state.step),
      'tokens': sums['weight'],
      'skipped': new_state.skipped,
      'nonfinite_in_a_row': new_state.nonfinite_in_a_row,
  }
  metrics.update({k: v / weight for k, v in sums.items() if k not in ('loss', 'nll', 'z', 'weight')})
  return new_state, metrics


def eval_step(model_cfg: ModelConfig, params, batch):
  """Loss sums on one held-out batch."""
  sums = loss_sums(model_cfg, params, batch)
  return {'nll': sums['nll'], 'weight': sums['weight']}
