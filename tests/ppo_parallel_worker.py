"""PPO across devices, run by tests/test_ppo_parallel.py in subprocesses with virtual CPU devices.

  python tests/ppo_parallel_worker.py update              one PPO update (2 epochs x 2 minibatches)
                                                          on a fixed scored rollout, on one device
                                                          and under fsdp=8 and data=2 x fsdp=4
  python tests/ppo_parallel_worker.py train LAYOUT DIR    3 PPO iterations through `train`
  python tests/ppo_parallel_worker.py restore             workdirs restored onto fsdp=8 (init_from,
                                                          the reward model)

Prints one JSON object as its last stdout line.
"""

from __future__ import annotations

import json
import os
import sys

import flax.linen as nn
import jax
import numpy as np

from lmjax import config as config_lib
from lmjax import tasks
from lmjax.parallel import mesh as mesh_lib
from lmjax.tasks import ppo
from lmjax.train.loop import global_batch, jit_programs, train
from lmjax.train.state import build_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = {'one': (1, 1), 'fsdp8': (1, 8), 'data2_fsdp4': (2, 4)}  # (data, fsdp)


def ppo_config(layout: str, *overrides):
  config = config_lib.load_config(f'{ROOT}/configs/ppo_tiny.py')
  data, fsdp = LAYOUTS[layout]
  config_lib.apply_overrides(config, [
      f'mesh.data={data}', f'mesh.fsdp={fsdp}', 'sharding=dp_fsdp_tp', 'progress_bar=false',
      'post.kl_coef=0.1', 'post.entropy_coef=0.01', *overrides])
  return config


def fixed_rollout(config):
  """8 prompts and responses of fixed tokens and lengths (the rollout phase's output shape)."""
  rng = np.random.default_rng(0)
  vocab, n = config.model.vocab_size, config.post.max_new_tokens
  prompts = [list(rng.integers(4, vocab, size=k)) for k in (3, 5, 2, 7, 4, 6, 3, 5)]
  responses = rng.integers(4, vocab, size=(8, n)).astype(np.int32)
  responses[::3, 0] = 5  # some toy reward (token 5)
  lengths = np.array([8, 5, 3, 8, 6, 8, 2, 7], np.int32)
  rollout = ppo.rollout_rows(ppo.prompt_rows(prompts, 8), responses, lengths)
  return {k: np.asarray(v) for k, v in rollout.items()}


def update(layout: str) -> dict:
  # SGD: the update is linear in the gradient, so it shows the sharded gradient's own error
  # (Adam's first steps turn any float difference in a near-zero gradient into a full step)
  config = ppo_config(layout, 'optimizer.name=sgd', 'optimizer.learning_rate=0.05',
                      'optimizer.weight_decay=0.0')
  devices = jax.devices()[:int(np.prod(LAYOUTS[layout]))]
  mesh_lib.validate(config, len(devices))
  task = tasks.from_config(config)
  tx, schedule = task.optimizer(config)
  mesh = mesh_lib.make_mesh(config, devices)
  rules = mesh_lib.rules(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules[0])):
    create, abstract = build_state(task, tx, config.seed, mesh, rules)
    state = create()
    phases, train_fn, _ = jit_programs(task, tx, schedule, mesh, abstract)
    score_fn = dict(phases)['score']
    rollout = global_batch(fixed_rollout(config), mesh_lib.batch_sharding(mesh))
    data, stats, _ = score_fn(state, None, rollout)
    state, metrics = train_fn(state, data)
    params = jax.device_get(state.params)
  return {'params': [np.asarray(x, np.float64).ravel().tolist() for x in jax.tree.leaves(params)],
          'metrics': {k: float(v) for k, v in jax.device_get({**metrics, **stats}).items()}}


def restore() -> dict:
  """A LoRA-SFT workdir (its adapters merged) and its pretraining base, restored onto fsdp=8 by
  the rules, against the same loads on one device."""
  out = {}
  config = ppo_config('fsdp8')
  mesh = mesh_lib.make_mesh(config)
  for name in ('pretrain', 'sft_lora'):
    workdir = os.path.join(ROOT, 'tests', 'data', 'workdir_v0', name)
    _, sharded = tasks.load_trained(workdir, mesh=mesh, rules=mesh_lib.rules(config)[0])
    _, single = tasks.load_trained(workdir)
    out[name] = {
        'max_diff': max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                        for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single))),
        'embed_shards': len({str(s.index) for s in sharded['embed'].addressable_shards}),
        'embed_spec': str(sharded['embed'].sharding.spec)}
  return out


def main(argv):
  if argv[1] == 'restore':
    print(json.dumps(restore()))
    return
  if argv[1] == 'update':
    print(json.dumps({layout: update(layout) for layout, (data, fsdp) in LAYOUTS.items()
                      if data * fsdp <= jax.device_count()}))
    return
  layout, workdir = argv[2], argv[3]
  train(ppo_config(layout, 'steps=3', 'log_every=1'), workdir)
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    records = [json.loads(line) for line in f]
  print(json.dumps([r for r in records if r['split'] == 'train']))


if __name__ == '__main__':
  main(sys.argv)
