"""A CPU-sized IsoFLOP study: 3 budgets x 5 sizes of the `tiny` shape family on the `tiny` preset.

Every run trains for exactly the tokens its budget buys (a minute or two each on a CPU core):

  lmjax sweep experiments/isoflop_tiny.py --workdir=/tmp/isoflop_tiny [--parallel=2]
  lmjax scaling fit /tmp/isoflop_tiny/results.csv --out=/tmp/isoflop_tiny/fit --bootstrap=100
"""

from lmjax.scaling.sweep import Sweep, isoflop

BUDGETS = (3e10, 1e11, 3e11)
COMMON = ('batch_size=16', 'seq_len=64', 'eval_every=100000', 'eval_batches=8', 'log_every=50',
          'checkpoint_every=200', 'progress_bar=False', 'optimizer.learning_rate=3e-3')


def get_sweep():
  points, notes = isoflop('tiny', BUDGETS, family='tiny', overrides=COMMON, num_sizes=5,
                          span=10.0, tolerance=0.05, min_steps=50)
  return Sweep(config='tiny', points=points, overrides=COMMON, notes=notes)
