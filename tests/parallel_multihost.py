"""One process of a two-process `jax.distributed` job on localhost (CPU, gloo collectives).

  python tests/parallel_multihost.py MODE PROCESS_ID PORT WORKDIR [--crash_at=N] [--step_delay=S]

MODE `train`: joins the job through the config's `distributed.*` keys, runs two train steps on a
fixed global batch (this process feeds its half of the rows) and prints the losses and a params
checksum as JSON; then runs the training loop for a few steps (collective checkpoint, metrics from
process 0 only) and prints its summary. MODE `loop`: only the training loop (for the dead-peer test:
pass --crash_at=N to one process; the flags are tests/fault_injection.py's loop hooks).
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fault_injection import fault_hooks  # noqa: E402
from parallel_worker import batches, run_steps, small_config  # noqa: E402

from lmjax.parallel import distributed as distributed_lib  # noqa: E402
from lmjax.train.loop import train  # noqa: E402


def loop_config(process_id, port, **overrides):
  return small_config(**{'sharding': 'fsdp', 'mesh.data': 1, 'mesh.fsdp': -1,
                         'distributed.coordinator': f'localhost:{port}',
                         'distributed.num_processes': 2, 'distributed.process_id': process_id,
                         'distributed.heartbeat_timeout_s': 5, 'eval_batches': 0,
                         'log_every': 1, 'checkpoint_every': 2, **overrides})


def main(mode, process_id, port, workdir, *faults):
  process_id, port = int(process_id), int(port)
  flags = dict(f[len('--'):].split('=', 1) for f in faults)
  hooks = fault_hooks(int(flags.pop('crash_at', 0)), float(flags.pop('step_delay', 0)))
  assert not flags, f'unknown flags: {flags}'
  config = loop_config(process_id, port)
  distributed_lib.initialize(config)
  assert jax.process_count() == 2, jax.process_count()
  if mode == 'train':
    host_batches = batches(small_config(), 2)
    rows = small_config().batch_size // 2
    local = [{k: v[process_id * rows:(process_id + 1) * rows] for k, v in b.items()}
             for b in host_batches]
    losses, state = run_steps(small_config(**{'sharding': 'fsdp', 'mesh.data': 1,
                                               'mesh.fsdp': -1}), local, jax.devices())
    checksum = {'/'.join(str(getattr(k, 'key', k)) for k in path):
                float(np.sum(np.asarray(jax.experimental.multihost_utils.process_allgather(
                    leaf, tiled=True), np.float64)))
                for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    print(json.dumps({'losses': losses, 'checksum': checksum}), flush=True)
    summary = train(loop_config(process_id, port, steps=3), workdir, hooks=hooks)
  else:
    summary = train(loop_config(process_id, port, steps=60), workdir, hooks=hooks)
  print(json.dumps({'summary': summary, 'process_index': jax.process_index(),
                    'devices': jax.device_count()}), flush=True)


if __name__ == '__main__':
  import jax.experimental.multihost_utils  # noqa: F401  pylint: disable=g-import-not-at-top
  main(*sys.argv[1:])
