"""Context-parallel checks, run by tests/test_ring_attention.py in one subprocess with 8 virtual
CPU devices: python tests/ring_attention_worker.py CHECK [CHECK ...]

Prints one JSON object (the results of every check) as its last stdout line.
"""

from __future__ import annotations

import json
import os
import sys

import flax.linen as nn
import jax
import numpy as np

from lmjax import config as config_lib
from lmjax.models import attention as attention_lib
from lmjax.parallel import mesh as mesh_lib
from lmjax.parallel import ring_attention
from parallel_worker import run_steps  # tests/ is this script's folder

# name -> (context, strategy, impl, causal, sliding_window, num_kv_heads); 4 q heads
ATTENTION_CASES = {
    'ring4_causal_gqa_window': (4, 'ring', 'xla', True, 5, 2),
    'ring4_noncausal_gqa': (4, 'ring', 'xla', False, 0, 2),
    'ring8_causal_mqa': (8, 'ring', 'xla', True, 0, 1),
    'ring8_noncausal_window': (8, 'ring', 'xla', False, 6, 4),
    'allgather4_causal_gqa_window': (4, 'allgather', 'xla', True, 5, 2),
    'ring4_pallas_causal_gqa_window': (4, 'ring', 'pallas', True, 5, 2),
}


def config_for(context, **overrides):
  config = config_lib.load_config('tiny')
  config.steps, config.batch_size, config.seq_len = 5, 4, 32
  config.optimizer.warmup_steps, config.optimizer.schedule = 1, 'constant'
  items = {'mesh.data': 1, 'mesh.context': context, **overrides}
  config_lib.apply_overrides(config, [f'{k}={v}' for k, v in items.items()])
  return config


def packed_rows(rng, rows, length):
  """Segment ids (two documents per row, padding at the end of one row) and positions that count
  up within each document."""
  segment_ids = np.ones((rows, length), np.int32)
  positions = np.zeros((rows, length), np.int32)
  for r in range(rows):
    cut = int(rng.integers(3, length - 3))
    segment_ids[r, cut:] = 2
    positions[r] = np.concatenate([np.arange(cut), np.arange(length - cut)])
  segment_ids[0, length - 5:] = 0
  return segment_ids, positions


def check_attention():
  """Context-parallel attention (through `attention_lib.attention`'s dispatch) vs the one-device
  xla path: max abs errors of the output and of dq/dk/dv (cotangent: a random tensor)."""
  rng = np.random.default_rng(0)
  batch, length, heads, head_dim = 2, 32, 4, 8
  seg, pos = packed_rows(rng, batch, length)
  results = {}
  for name, (context, strategy, impl, causal, window, kv_heads) in ATTENTION_CASES.items():
    arrays = {'q': rng.normal(size=(batch, length, heads, head_dim)),
              'k': rng.normal(size=(batch, length, kv_heads, head_dim)),
              'v': rng.normal(size=(batch, length, kv_heads, head_dim)),
              'ct': rng.normal(size=(batch, length, heads, head_dim))}
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    arrays.update(seg=seg, pos=pos)

    def loss(q, k, v, arrays=arrays, causal=causal, window=window, impl=impl, strategy=strategy):
      out = attention_lib.attention(q, k, v, segment_ids_BL=arrays['seg'],
                                    positions_BL=arrays['pos'], causal=causal,
                                    sliding_window=window, impl=impl, context_parallel=strategy)
      return (out * arrays['ct']).sum(), out

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    (_, ref), ref_grads = jax.jit(grad)(arrays['q'], arrays['k'], arrays['v'])
    config = config_for(context, **{'model.context_parallel': strategy})
    mesh = mesh_lib.make_mesh(config, jax.devices()[:context])
    zig = ring_attention.zigzag(arrays, context)
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(mesh_lib.rules(config)[0])):
      fn = jax.jit(lambda q, k, v, zig=zig: grad(q, k, v, zig))
      (_, out), grads = fn(zig['q'], zig['k'], zig['v'])
      hlo = fn.lower(zig['q'], zig['k'], zig['v']).as_text()
    back = ring_attention.unzigzag({'out': out, 'dq': grads[0], 'dk': grads[1], 'dv': grads[2]},
                                   context)
    results[name] = {
        'out': float(np.max(np.abs(np.asarray(back['out']) - np.asarray(ref)))),
        **{key: float(np.max(np.abs(np.asarray(back[key]) - np.asarray(r))))
           for key, r in zip(('dq', 'dk', 'dv'), ref_grads)},
        'ppermute': 'collective_permute' in hlo or 'ppermute' in hlo,
        'all_gather': 'all_gather' in hlo,
        'out_scale': float(np.max(np.abs(np.asarray(ref)))),
    }
  return results


def train_batches(config, count, seed=0):
  rng = np.random.default_rng(seed)
  rows, length = config.batch_size, config.seq_len
  out = []
  for _ in range(count):
    tokens = rng.integers(0, config.model.vocab_size, (rows, length + 1)).astype(np.int32)
    seg, pos = packed_rows(rng, rows, length)
    out.append({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'positions': pos,
                'segment_ids': seg,
                'weights': ((rng.random((rows, length)) > 0.1) & (seg > 0)).astype(np.float32)})
  return out


def train_losses(config, host_batches, devices):
  """Losses of len(host_batches) train steps under the config's mesh; batches reach the devices
  through the train loop's `global_batch` (zigzag order when mesh.context > 1)."""
  return run_steps(config, host_batches, devices)[0]


TRAIN_LAYOUTS = {  # name -> (overrides, devices)
    'context4': ({'sharding': 'dp'}, 4),
    'context2_fsdp2_tensor2': ({'sharding': 'fsdp_tp', 'mesh.fsdp': 2, 'mesh.tensor': 2}, 8),
}


def check_train():
  config = config_for(1, **{'sharding': 'dp', 'model.sliding_window': 12})
  host_batches = train_batches(config, config.steps)
  results = {'reference': train_losses(config, host_batches, jax.devices()[:1])}
  for name, (overrides, devices) in TRAIN_LAYOUTS.items():
    context = 4 if name == 'context4' else 2
    config = config_for(context, **{'model.sliding_window': 12}, **overrides)
    results[name] = train_losses(config, host_batches, jax.devices()[:devices])
  return results


def check_loop():
  """`lmjax.train.loop.train` (stdlib text, packed documents) at mesh.context=2 x data=4 and at
  data=8: per-step train losses and the final eval loss (eval batches are zigzagged too)."""
  from lmjax.train.loop import train  # pylint: disable=g-import-not-at-top
  root = os.environ['RING_WORKDIR']
  results = {}
  for name, context in (('data8', 1), ('context2_data4', 2)):
    config = config_for(context, **{'mesh.data': 8 // context, 'sharding': 'dp', 'steps': 3,
                                    'batch_size': 8, 'log_every': 1, 'eval_batches': 1,
                                    'eval_every': 100, 'checkpoint_every': 100,
                                    'progress_bar': False})
    workdir = os.path.join(root, name)
    summary = train(config, workdir)
    with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
      records = [json.loads(line) for line in f]
    results[name] = {'train': [r['loss'] for r in records if r['split'] == 'train'],
                     'eval': summary['eval_loss']}
  return results


CHECKS = {'attention': check_attention, 'train': check_train, 'loop': check_loop}

if __name__ == '__main__':
  print(json.dumps({name: CHECKS[name]() for name in sys.argv[1:]}))
