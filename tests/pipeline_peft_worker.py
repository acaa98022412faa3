"""Pipeline stages with fine-tuning: run by tests/test_pipeline_peft.py with 2 virtual CPU devices.

For each PEFT setup, the SFT loss and its gradient under 2 GPipe stages (mesh.pipeline=2) equal
the same task without stages. Prints one JSON object as its last stdout line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmjax import config as config_lib
from lmjax import tasks
from lmjax.parallel import mesh as mesh_lib
from lmjax.train import step as step_lib
from lmjax.train.state import init_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUPS = {
    # LoRA on every matmul and on the LM head, over an NF4-quantised frozen base (QLoRA)
    'qlora_head': ['peft.method=lora', 'peft.base_dtype=nf4',
                   'peft.targets=attn/(q|k|v|o)$|mlp/(gate|up|down)$|lm_head'],
    'dora_int8': ['peft.method=dora', 'peft.base_dtype=int8'],
    'bottleneck': ['peft.method=bottleneck'],
    'prefix': ['peft.method=prefix'],
    'full': ['peft.method=none', 'model.tie_embeddings=true'],
}


def _batch(config, rng):
  rows, length = config.batch_size, config.seq_len
  tokens = rng.integers(4, config.model.vocab_size, (rows, length + 1)).astype(np.int32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
          'positions': np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
          'segment_ids': np.ones((rows, length), np.int32),
          'weights': (rng.random((rows, length)) > 0.3).astype(np.float32)}


def check(name: str) -> dict:
  config = config_lib.load_config(f'{ROOT}/configs/sft_tiny.py')
  config_lib.apply_overrides(config, ['model.scan_layers=true', 'mesh.data=1', 'mesh.pipeline=2',
                                      'pipeline_microbatches=2', 'batch_size=4', 'seq_len=16',
                                      'model.remat=full', *SETUPS[name]])
  mesh_lib.validate(config, jax.device_count())
  task = tasks.from_config(config)
  assert task.pipeline == (2, 2)
  tx, _ = task.optimizer(config)
  params = jax.jit(lambda: nn.unbox(init_state(task, tx, 0).params))()
  keys = iter(jax.random.split(jax.random.key(1), 10_000))  # adapters away from their zero init
  trainable = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype),
                           params['trainable'])
  batch = _batch(config, np.random.default_rng(0))

  def loss_and_grads(t):
    grads, sums = step_lib.accumulated_grads(t, {**params, 'trainable': trainable}, batch)
    return sums['loss'], grads

  plain = dataclasses.replace(task, pipeline=(1, 1))
  want_loss, want_grads = jax.jit(lambda: loss_and_grads(plain))()
  mesh = mesh_lib.make_mesh(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(mesh_lib.rules(config)[0])):
    got_loss, got_grads = jax.jit(lambda: loss_and_grads(task))()
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                       got_grads, want_grads))
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want_grads))
  return {'loss': float(got_loss), 'want_loss': float(want_loss), 'max_grad_diff': max(diffs),
          'grad_scale': scale}


if __name__ == '__main__':
  print(json.dumps({name: check(name) for name in sys.argv[1:] or SETUPS}))
