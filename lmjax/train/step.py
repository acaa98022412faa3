"""The pure, jittable train and eval steps, the same for every task (`lmjax.tasks`).

`train_step(task, tx, schedule, state, batch) -> (state, metrics)` runs the task's update schedule
over the batch: `epochs` passes of `minibatches` optimizer updates (1 x 1 for all but PPO; rows
reshuffled per epoch by a key derived from the state's rng and step). Each update accumulates
gradients over `grad_accum_steps` micro-batches as sums, then divides once by the total weight:
exactly the large-batch gradient. An update whose loss or gradients are not finite (or, with
`spike_sigmas`, whose loss spikes above the recent mean) leaves params and optimizer state
untouched and is counted.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from lmjax.tasks import Task
from lmjax.train.state import TrainState


def step_key(state: TrainState):
  """The step's random key: a function of (seed, step) alone, so a resumed run draws the same."""
  return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def accumulated_grads(task: Task, params, batch, rng=None):
  """Gradient of the summed loss w.r.t. the trainable half, and the loss sums, accumulated over
  `grad_accum_steps` micro-batches."""
  trainable, frozen = task.split(params)

  def grads_of(micro_batch):
    sums_fn = lambda t: (lambda s: (s['loss'], s))(task.loss_sums(t, frozen, micro_batch, rng))
    (_, sums), grads = jax.value_and_grad(sums_fn, has_aux=True)(trainable)
    return grads, sums

  n = task.grad_accum_steps
  if n == 1:
    return grads_of(batch)
  micro = jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)

  def body(carry, micro_batch):
    return jax.tree.map(jnp.add, carry, grads_of(micro_batch)), None

  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grads_of, jax.tree.map(lambda x: x[0], micro)))
  (grads, sums), _ = jax.lax.scan(body, zeros, micro)
  return grads, sums


def _is_spike(task: Task, state: TrainState, loss):
  if not task.spike_sigmas:
    return jnp.zeros((), bool)
  mean = jnp.mean(state.recent_losses)
  std = jnp.std(state.recent_losses)
  return (state.num_losses >= task.spike_window) & (loss > mean + task.spike_sigmas * std)


def _update(task: Task, tx, state: TrainState, batch, rng):
  """One optimizer update on `batch` (guards applied); the step counter is not advanced."""
  grads, sums = accumulated_grads(task, state.params, batch, rng)
  weight = jnp.maximum(sums['weight'], 1.0)
  grads = jax.tree.map(lambda g: g / weight, grads)
  loss = sums['nll'] / weight
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(sums['loss']) & jnp.isfinite(grad_norm)
  apply = finite & ~(finite & _is_spike(task, state, loss))

  trainable, frozen = task.split(state.params)
  updates, new_opt_state = tx.update(grads, state.opt_state, trainable)
  new_params = task.join(optax.apply_updates(trainable, updates), frozen)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(apply, a, b), new, old)
  recent = state.recent_losses.at[state.num_losses % task.spike_window].set(loss)
  state = state.replace(
      params=keep(new_params, state.params),
      opt_state=keep(new_opt_state, state.opt_state),
      skipped=state.skipped + (~apply).astype(jnp.int32),
      nonfinite_in_a_row=jnp.where(finite, 0, state.nonfinite_in_a_row + 1),
      recent_losses=jnp.where(finite, recent, state.recent_losses),
      num_losses=state.num_losses + finite.astype(jnp.int32))
  metrics = {'loss': loss, 'z_loss': sums['z'] / weight, 'grad_norm': grad_norm,
             'tokens': sums['weight']}
  metrics.update({k: v / weight for k, v in sums.items() if k not in ('loss', 'nll', 'z', 'weight')})
  return state, metrics


def train_step(task: Task, tx: optax.GradientTransformation, schedule: Callable,
               state: TrainState, batch):
  """One step: the task's update schedule over `batch`. Returns the new state and device-side
  metrics (means over the step's updates; no host sync)."""
  rng = step_key(state)
  epochs, minibatches = task.updates
  if epochs * minibatches == 1:
    state, metrics = _update(task, tx, state, batch, rng)
  else:
    rows = jax.tree.leaves(batch)[0].shape[0]
    size = rows // minibatches

    def epoch(state, epoch_rng):
      order = jax.random.permutation(epoch_rng, rows)

      def minibatch(state, m):
        idx = jax.lax.dynamic_slice_in_dim(order, m * size, size)
        mb = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), batch)
        return _update(task, tx, state, mb, jax.random.fold_in(epoch_rng, m))

      return jax.lax.scan(minibatch, state, jnp.arange(minibatches))

    keys = jax.random.split(jax.random.fold_in(rng, 1), epochs)
    state, metrics = jax.lax.scan(epoch, state, keys)
    metrics = jax.tree.map(jnp.mean, metrics)
  state = state.replace(step=state.step + 1)
  metrics.update(learning_rate=schedule(state.step - 1), skipped=state.skipped,
                 nonfinite_in_a_row=state.nonfinite_in_a_row)
  return state, metrics


def eval_step(task: Task, params, batch):
  """Loss sums on one held-out batch."""
  return task.eval_sums(params, batch)
