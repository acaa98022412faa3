"""Optimizers and learning-rate schedules as optax chains, built from the `optimizer` config."""

from __future__ import annotations

import optax
from flax import traverse_util


def learning_rate_schedule(opt_config, steps: int) -> optax.Schedule:
  """Linear warmup to the peak, then cosine / linear decay, a warmup-stable-decay, or constant."""
  peak = opt_config.learning_rate
  warmup = opt_config.warmup_steps
  final = peak * opt_config.final_lr_fraction
  decay_steps = max(steps - warmup, 1)
  warmup_fn = optax.linear_schedule(0.0, peak, warmup) if warmup else optax.constant_schedule(peak)
  name = opt_config.schedule
  if name == 'cosine':
    decay_fn = optax.cosine_decay_schedule(peak, decay_steps, alpha=final / peak if peak else 0.0)
  elif name == 'linear':
    decay_fn = optax.linear_schedule(peak, final, decay_steps)
  elif name == 'wsd':
    cooldown = max(int(round(steps * opt_config.decay_fraction)), 1)
    stable = max(decay_steps - cooldown, 0)
    decay_fn = optax.join_schedules(
        [optax.constant_schedule(peak), optax.linear_schedule(peak, final, cooldown)], [stable])
  elif name == 'constant':
    decay_fn = optax.constant_schedule(peak)
  else:
    raise ValueError(f'optimizer.schedule: unknown schedule {name!r}')
  return optax.join_schedules([warmup_fn, decay_fn], [warmup])


def weight_decay_mask(params, decay_embeddings: bool):
  """True for leaves that take weight decay: matrices, not norm scales (nor embeddings unless
  asked)."""
  flat = traverse_util.flatten_dict(params)

  def decays(path, leaf):
    if path[-1] == 'scale' or path[-1].endswith('_bias') or leaf.ndim < 2:  # norms (2-D when
      # stacked under scan) and biases
      return False
    if path[-1] in ('embed', 'lm_head'):
      return decay_embeddings
    return True

  return traverse_util.unflatten_dict({p: decays(p, x) for p, x in flat.items()})


def make_optimizer(opt_config, steps: int, updates_per_step: int = 1
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax chain (clipping, then the optimizer with masked weight decay) and its schedule
  over `steps`. With several optimizer updates per step (PPO's epochs x minibatches) every update
  of step s uses the step's rate schedule(s)."""
  step_schedule = learning_rate_schedule(opt_config, steps)
  schedule = step_schedule
  if updates_per_step > 1:
    schedule = lambda count: step_schedule(count // updates_per_step)
  mask = lambda params: weight_decay_mask(params, opt_config.decay_embeddings)
  wd = opt_config.weight_decay
  name = opt_config.name
  if name == 'adamw':
    opt = optax.adamw(schedule, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
                      weight_decay=wd, mask=mask)
  elif name == 'lion':
    opt = optax.lion(schedule, b1=opt_config.b1, b2=opt_config.b2, weight_decay=wd, mask=mask)
  elif name == 'adafactor':
    opt = optax.adafactor(schedule, decay_rate=opt_config.b2, weight_decay_rate=wd or None,
                          weight_decay_mask=mask)
  elif name == 'sgd':
    opt = optax.chain(optax.add_decayed_weights(wd, mask), optax.sgd(schedule, momentum=opt_config.b1))
  else:
    raise ValueError(f'optimizer.name: unknown optimizer {name!r}')
  if opt_config.grad_clip:
    opt = optax.chain(optax.clip_by_global_norm(opt_config.grad_clip), opt)
  return opt, step_schedule

