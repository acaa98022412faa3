"""Orbax checkpoints: the train state with the data-iterator position, and params-only exports.

Layout inside a workdir:
  checkpoints/<step>/state   the TrainState (params, optimizer state, step, rng, counters)
  checkpoints/<step>/data    the data iterator's state (JSON)
  params/                    params only (a converted or exported model), optional

Orbax writes each step into a temporary directory and renames it when complete, so a checkpoint
that was only partly written (a killed process) is never listed, never restored.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Async saves every call to `save`, keeps the last `keep`, restores the latest complete one."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                                          options=options, item_names=('state', 'data'))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_state: dict, force: bool = False) -> None:
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                     data=ocp.args.JsonSave(data_state)),
                       force=force)

  def restore(self, step: int, abstract_state):
    """Restores `state` into the shapes, dtypes and shardings of `abstract_state` (so a checkpoint
    written under one mesh restores under another), and the data state. Partial: a field with no
    leaves that older checkpoints lack (`task_state` = {}) restores as it is in `abstract_state`."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=abstract_state,
                                     restore_args=jax.tree.map(_restore_args, abstract_state),
                                     partial_restore=True),
        data=ocp.args.JsonRestore()))
    return restored['state'], restored['data']

  def restore_params(self, step: int, abstract_params):
    """Only the params of a train-state checkpoint."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item={'params': abstract_params},
            restore_args=jax.tree.map(_restore_args, {'params': abstract_params}),
            partial_restore=True)))
    return restored['state']['params']

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _restore_args(abstract):
  return ocp.ArrayRestoreArgs(sharding=getattr(abstract, 'sharding', None), dtype=abstract.dtype,
                              global_shape=abstract.shape)


def save_tree(directory: str, tree) -> None:
  """Writes a pytree of arrays to `directory` (synchronously)."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(directory), tree, force=True)
  checkpointer.wait_until_finished()


def load_tree(directory: str, abstract_tree=None):
  return ocp.StandardCheckpointer().restore(os.path.abspath(directory), abstract_tree)


def save_params(workdir: str, params) -> None:
  """Writes params alone to `workdir/params` (used by conversion and export)."""
  save_tree(os.path.join(workdir, 'params'), params)


def load_params(workdir: str, abstract_params):
  """Params from a workdir: the latest train checkpoint, else the params-only export.

  `abstract_params` gives shapes, dtypes and (optionally) shardings, e.g. from `jax.eval_shape`.
  """
  workdir = os.path.abspath(workdir)
  if os.path.isdir(os.path.join(workdir, 'checkpoints')):
    checkpointer = Checkpointer(workdir)
    step = checkpointer.latest_step()
    if step is not None:
      params = checkpointer.restore_params(step, abstract_params)
      checkpointer.close()
      return params
    checkpointer.close()
  params_dir = os.path.join(workdir, 'params')
  if not os.path.isdir(params_dir):
    raise FileNotFoundError(f'{workdir}: no checkpoint (checkpoints/ or params/) to load')
  return load_tree(params_dir, abstract_params)
