"""Gradient clipping in the optimizer chain, against updates computed by hand in numpy."""

import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.config import base_config
from lmjax.optim import make_optimizer

LR, CLIP = 0.1, 1.0
# two leaves: clipping is by the global norm over both, not per leaf
PARAMS = {'w': np.zeros((2, 3), np.float32), 'b': np.zeros((3,), np.float32)}
BIG = {'w': np.array([[3.0, -4.0, 0.0], [1.0, 2.0, -2.0]], np.float32),
       'b': np.array([0.0, 6.0, -1.0], np.float32)}  # global norm sqrt(71) ~ 8.4 > CLIP
SMALL = {'w': np.array([[0.1, -0.2, 0.0], [0.3, 0.1, -0.1]], np.float32),
         'b': np.array([0.2, 0.0, -0.1], np.float32)}  # global norm 0.45 < CLIP


def _optimizer(name, grad_clip=CLIP):
  opt = base_config().optimizer
  opt.name, opt.learning_rate, opt.grad_clip = name, LR, grad_clip
  opt.schedule, opt.warmup_steps, opt.weight_decay = 'constant', 0, 0.0
  tx, _ = make_optimizer(opt, steps=10)
  return tx, opt


def _global_norm(tree):
  return np.sqrt(sum(np.sum(np.square(x, dtype=np.float64)) for x in tree.values()))


def _clipped(tree):
  norm = _global_norm(tree)
  return {k: v * (CLIP / norm if norm > CLIP else 1.0) for k, v in tree.items()}


def _updates(tx, grads_seq):
  state = tx.init(PARAMS)
  out = []
  for grads in grads_seq:
    updates, state = tx.update({k: jnp.asarray(v) for k, v in grads.items()}, state, PARAMS)
    out.append({k: np.asarray(v) for k, v in updates.items()})
  return out


def test_sgd_update_is_the_globally_clipped_gradient_times_the_rate():
  assert _global_norm(BIG) > CLIP > _global_norm(SMALL)
  tx, _ = _optimizer('sgd')
  (big,), (small,) = _updates(tx, [BIG]), _updates(tx, [SMALL])
  want = _clipped(BIG)
  for k in PARAMS:  # first step: momentum's trace starts at zero, so the update is -lr * g
    np.testing.assert_allclose(big[k], -LR * want[k], rtol=1e-6)
    np.testing.assert_allclose(small[k], -LR * SMALL[k], rtol=1e-6)  # under the clip: unscaled
  assert _global_norm(big) == pytest.approx(LR * CLIP, rel=1e-6)
  (unclipped,) = _updates(_optimizer('sgd', grad_clip=0.0)[0], [BIG])  # grad_clip 0 = off
  np.testing.assert_allclose(unclipped['w'], -LR * BIG['w'], rtol=1e-6)


def test_adamw_sees_the_clipped_gradient():
  """Adam's first update is nearly scale-free, so two steps: a clipped gradient, then one under
  the clip; the second update depends on their ratio. Reference: Adam with bias correction."""
  tx, opt = _optimizer('adamw')
  _, second = _updates(tx, [BIG, SMALL])
  b1, b2, eps = opt.b1, opt.b2, opt.eps
  g1, g2 = _clipped(BIG), _clipped(SMALL)
  for k in PARAMS:
    m = b1 * ((1 - b1) * g1[k].astype(np.float64)) + (1 - b1) * g2[k]
    v = b2 * ((1 - b2) * np.square(g1[k].astype(np.float64))) + (1 - b2) * np.square(g2[k])
    want = -LR * (m / (1 - b1**2)) / (np.sqrt(v / (1 - b2**2)) + eps)
    np.testing.assert_allclose(second[k], want, rtol=1e-5, atol=1e-7)
  _, unclipped = _updates(_optimizer('adamw', grad_clip=0.0)[0], [BIG, SMALL])
  assert not np.allclose(unclipped['w'], second['w'], rtol=1e-3)  # the clip made a difference
