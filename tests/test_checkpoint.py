"""Checkpointer retention: after N + 3 saves exactly the last N step directories remain."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.checkpoint import Checkpointer


@pytest.mark.parametrize('keep', [1, 2])
def test_keeps_exactly_the_last_n_steps(tmp_path, keep):
  checkpointer = Checkpointer(str(tmp_path), keep=keep)
  steps = [10 * (i + 1) for i in range(keep + 3)]
  for step in steps:
    checkpointer.save(step, {'w': jnp.full((4,), float(step))}, {'position': step})
  checkpointer.wait()
  entries = sorted(os.listdir(tmp_path / 'checkpoints'))
  assert entries == sorted(str(s) for s in steps[-keep:])  # nothing else: no tmp directories
  assert checkpointer.latest_step() == steps[-1]
  state, data = checkpointer.restore(steps[-keep], {'w': jnp.zeros((4,))})
  np.testing.assert_array_equal(state['w'], np.full((4,), float(steps[-keep])))
  assert data == {'position': steps[-keep]}
  checkpointer.close()
