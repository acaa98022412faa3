"""Multi-host start-up: `jax.distributed.initialize` from the config or the environment.

With `distributed.coordinator` set, the coordinator address, process count and id come from the
config (count and id may also be left to the environment). Without it, a multi-process environment
(SLURM with several tasks, Open MPI, a multi-host TPU slice, or `JAX_COORDINATOR_ADDRESS`) is
detected and JAX's own cluster detection fills in everything. A single process does nothing.

A process that dies stops sending heartbeats; after `distributed.heartbeat_timeout_s` the
coordination service declares it dead and the survivors terminate with an error instead of
waiting forever in a collective.
"""

from __future__ import annotations

import logging
import os

import jax

_log = logging.getLogger(__name__)


def _env_int(name: str) -> int:
  try:
    return int(os.environ.get(name, '') or 0)
  except ValueError:
    return 0


def multi_process_environment() -> str | None:
  """The name of the multi-process launcher this process runs under, or None."""
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return 'JAX_COORDINATOR_ADDRESS'
  if _env_int('SLURM_NTASKS') > 1 or _env_int('SLURM_STEP_NUM_TASKS') > 1:
    return 'slurm'
  if _env_int('OMPI_COMM_WORLD_SIZE') > 1:
    return 'openmpi'
  if ',' in os.environ.get('TPU_WORKER_HOSTNAMES', '') or os.environ.get(
      'MEGASCALE_COORDINATOR_ADDRESS'):
    return 'tpu'
  return None


def initialize(config) -> bool:
  """Joins the multi-process job if the config or the environment says there is one.

  Returns True when `jax.distributed` is initialized (now or before). Must run before anything
  touches the devices.
  """
  if jax.distributed.is_initialized():
    return True
  dist = config.distributed
  timeouts = dict(initialization_timeout=dist.initialization_timeout_s,
                  heartbeat_timeout_seconds=dist.heartbeat_timeout_s)
  if dist.coordinator:
    _log.info('jax.distributed: coordinator %s (from the config)', dist.coordinator)
    jax.distributed.initialize(
        coordinator_address=dist.coordinator,
        num_processes=dist.num_processes or None,
        process_id=dist.process_id if dist.process_id >= 0 else None, **timeouts)
    return True
  launcher = multi_process_environment()
  if launcher is None:
    return False
  _log.info('jax.distributed: detected %s', launcher)
  jax.distributed.initialize(**timeouts)
  return True
