"""lmjax: train, evaluate and post-train decoder-only language models with JAX and Flax."""

import os as _os

# On CPU, XLA's YNNPACK fusions make the backward-pass matmuls of 2-D (tokens, features)
# activations slower than Eigen's: turning them off measured +5-7% tokens/s on the training step
# (measured with tools/bench_train.py). Only a default: a user's XLA_FLAGS that
# already sets it wins. It must be set before jax starts its backend, hence here.
if 'xla_cpu_experimental_ynn_fusion_type' not in _os.environ.get('XLA_FLAGS', ''):
  _os.environ['XLA_FLAGS'] = (_os.environ.get('XLA_FLAGS', '') +
                              ' --xla_cpu_experimental_ynn_fusion_type=').strip()
