"""Expert-parallel checks, run by tests/test_moe_parallel.py in one subprocess with 8 virtual CPU
devices: MoE training steps under `sharding=ep` layouts against the same steps on one device.

  python tests/moe_parallel_worker.py   (XLA_FLAGS must give 8 host devices)

Prints one JSON object as its last stdout line.
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax

from lmjax import tasks
from lmjax.parallel import mesh as mesh_lib
from lmjax.train import step as step_lib
from lmjax.train.loop import global_batch
from lmjax.train.state import build_state
from parallel_worker import batches, max_relative_error, small_config, spec_of

STEPS = 5
LAYOUTS = {  # name -> (data, fsdp, tensor, expert, dispatch)
    'expert8': (1, 1, 1, 8, 'dropless'),
    'expert4_fsdp2': (1, 2, 1, 4, 'dropless'),
    'expert2_tensor2_data2': (2, 1, 2, 2, 'dropless'),
    'expert8_capacity': (1, 1, 1, 8, 'capacity'),
}


def moe_config(**overrides):
  # capacity_factor = E / K: C = the shard's tokens, so nothing can drop
  moe = {'model.moe.num_experts': 8, 'model.moe.experts_per_token': 2,
         'model.moe.expert_mlp_dim': 32, 'model.moe.capacity_factor': 4.0,
         'model.moe.aux_loss_coef': 0.1, 'model.moe.z_loss_coef': 0.01}
  return small_config(**dict(moe, **overrides))


def run(config, host_batches, devices):
  """(per-step metrics, final state) of training on `host_batches` under the config's mesh."""
  mesh_lib.validate(config, len(devices))
  mesh = mesh_lib.make_mesh(config, devices)
  task = tasks.from_config(config)
  tx, schedule = task.optimizer(config)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  rules = mesh_lib.rules(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules[0])):
    create, abstract = build_state(task, tx, config.seed, mesh, rules)
    state = create()
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    fn = jax.jit(lambda s, b: step_lib.train_step(task, tx, schedule, s, b),
                 in_shardings=(shardings, batch_sharding),
                 out_shardings=(shardings, mesh_lib.replicated(mesh)))
    text = fn.lower(state, global_batch(host_batches[0], batch_sharding)).as_text()
    history = []
    for batch in host_batches:
      state, metrics = fn(state, global_batch(batch, batch_sharding))
      history.append({k: float(v) for k, v in metrics.items()
                      if k in ('loss', 'moe_aux_loss', 'moe_z_loss', 'moe_dropped',
                               'moe_load_max_l0')})
  return history, state, 'all_to_all' in text


def main():
  host_batches = batches(moe_config(), STEPS)
  ref, ref_state, _ = run(moe_config(**{'mesh.data': 1, 'sharding': 'dp'}), host_batches,
                       jax.devices()[:1])
  results = {'ref': ref}
  for name, (data, fsdp, tensor, expert, dispatch) in LAYOUTS.items():
    config = moe_config(**{'sharding': 'ep', 'mesh.data': data, 'mesh.fsdp': fsdp,
                           'mesh.tensor': tensor, 'mesh.expert': expert,
                           'model.moe.dispatch': dispatch})
    history, state, exchanged = run(config, host_batches, jax.devices())
    results[name] = {'history': history, 'all_to_all': exchanged,
                     'param_error': max_relative_error(state.params, ref_state.params),
                     'gate_spec': spec_of(state.params, 'layers_0', 'moe', 'gate')}
  print(json.dumps(results))


if __name__ == '__main__':
  main()
