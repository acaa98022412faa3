"""What the fine-tuning tasks (sft, reward, dpo, ppo) share: a params tree of a frozen base and what
trains (`lmjax.tasks.params`), PEFT, the LoRA+ optimizer and a base loaded from another workdir."""

from __future__ import annotations

import jax
import optax

from lmjax.peft import hooks, lora
from lmjax.tasks import params as params_lib
from lmjax.tasks.base import Task


class FineTuneTask(Task):
  """params = {'trainable': {...}, 'frozen': {...}} (layout: `lmjax.tasks.params`)."""
  heads: tuple = ()  # scalar heads that train beside the model (reward: 'head', ppo: 'value')

  @property
  def needs_reference(self) -> bool:
    return False

  def init_params(self, model_params, rng):
    return params_lib.build_params(self, model_params, rng)

  def split(self, params):
    return params['trainable'], params['frozen']

  def join(self, trainable, frozen):
    return {'trainable': trainable, 'frozen': frozen}

  def decoding_params(self, params):
    """Plain model params with the adapters merged in; an in-model PEFT run (bottleneck, prefix,
    prompt, p_tuning) cannot merge: its base comes with the `peft` entry the model reads."""
    if hooks.is_hook_method(self.peft.method):
      return dict(params_lib.model_params(self, params), peft=params_lib.peft_leaves(self, params))
    return params_lib.merged_model_params(self, params)

  def place_base(self, params, base):
    if 'peft' in base:
      raise ValueError('init_from: the source holds an in-model PEFT run (bottleneck / prefix / '
                       'prompt / p_tuning) that cannot be merged into base weights; start from its '
                       'base model instead')
    return params_lib.place_model(self, params, base)

  def model_inputs(self, params, rng=None):
    """(the params tree the Transformer reads, its `peft` argument) for the policy."""
    return params_lib.model_params(self, params, rng), params_lib.peft_leaves(self, params)

  def loss_sums(self, trainable, frozen, batch, rng):
    return self.sums(self.join(trainable, frozen), batch, rng)

  def sums(self, params, batch, rng) -> dict:
    raise NotImplementedError

  def optimizer(self, config):
    """The config's optimizer over the trainable tree; LoRA+ scales B's updates (= its learning
    rate, also for decoupled weight decay) by `peft.lora_plus_ratio`."""
    tx, schedule = super().optimizer(config)
    if self.peft.enabled and self.peft.lora_plus_ratio != 1.0:
      def mask(trainable):
        out = jax.tree.map(lambda _: False, trainable)
        out['adapters'] = lora.lora_b_mask(self.peft, trainable['adapters'])
        return out
      tx = optax.chain(tx, optax.masked(optax.scale(self.peft.lora_plus_ratio), mask))
    return tx, schedule


def sequence_sums(loss, metrics: dict, n: int) -> dict:
  """The sums contract for a loss that is a mean over `n` sequences (pairs, examples)."""
  out = {'loss': loss * n, 'nll': loss * n, 'z': jax.numpy.zeros((), jax.numpy.float32),
         'weight': jax.numpy.asarray(n, jax.numpy.float32)}
  clash = set(out) & set(metrics)
  if clash:  # a metric must never stand in for the loss the step reports and guards
    raise ValueError(f'loss metrics {sorted(clash)} collide with the sums contract')
  out.update({k: v * n for k, v in metrics.items()})
  return out
