"""Learning-rate ablation on the `tiny` preset: 4 peak learning rates x 2 seeds.

  lmjax sweep experiments/ablation_lr.py --workdir=/tmp/ablation_lr --parallel=2
"""

from lmjax.scaling.sweep import Sweep, grid

COMMON = ('steps=300', 'batch_size=16', 'optimizer.warmup_steps=30', 'eval_every=100',
          'checkpoint_every=100', 'progress_bar=False')


def get_sweep():
  points = grid({'optimizer.learning_rate': [1e-3, 3e-3, 1e-2, 3e-2]}, seeds=(0, 1))
  return Sweep(config='tiny', points=points, overrides=COMMON)
