"""The train state and its sharded construction.

State construction only traces: `jax.eval_shape` gives the boxed (logically annotated) state, the
sharding rules turn its annotations into NamedShardings (the optimizer state's are matched to the
parameters' by tree path, without running `tx.init`), and `jax.jit(create, out_shardings=...)`
builds it directly sharded. Nothing runs eagerly under the target mesh, so the same code compiles
ahead of time for devices this host does not have.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from lmjax.models.transformer import init_params
from lmjax.parallel import sharding as sharding_lib
from lmjax.tasks import Task


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any  # the task's tree (`Task.split` gives the trainable and frozen halves)
  opt_state: Any  # over the trainable half only
  rng: jax.Array  # raw key data (uint32), so it checkpoints like any array
  skipped: jax.Array  # updates skipped so far (non-finite or spike)
  nonfinite_in_a_row: jax.Array
  recent_losses: jax.Array  # ring buffer for the loss-spike guard
  num_losses: jax.Array  # how many losses the ring buffer has seen
  task_state: Any = flax.struct.field(default_factory=dict)  # PPO: {'kl_coef'}; {} otherwise


def init_state(task: Task, tx: optax.GradientTransformation, seed: int) -> TrainState:
  """A fresh state (boxed params: logical axis names attached; unbox before use)."""
  params_rng, state_rng = jax.random.split(jax.random.key(seed))
  params = task.init_params(init_params(task.model, params_rng), jax.random.fold_in(params_rng, 1))
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      opt_state=tx.init(task.split(nn.unbox(params))[0]),
      rng=jax.random.key_data(state_rng), skipped=jnp.zeros((), jnp.int32),
      nonfinite_in_a_row=jnp.zeros((), jnp.int32),
      recent_losses=jnp.zeros((task.spike_window,), jnp.float32),
      num_losses=jnp.zeros((), jnp.int32), task_state=task.init_task_state())


def _names(path) -> tuple:
  return tuple(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def optimizer_specs(abstract_opt_state, params, param_specs):
  """PartitionSpecs of an (abstract) optimizer state: a leaf whose tree path ends with a
  parameter's path and has its shape (Adam's moments, ...) is laid out like that parameter;
  everything else (counts, Adafactor's factored moments) is replicated."""
  by_path = {}
  for (path, leaf), spec in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                jax.tree.leaves(param_specs,
                                                is_leaf=lambda x: isinstance(x, PartitionSpec))):
    by_path[_names(path)] = (leaf.shape, spec)

  def spec_of(path, leaf):
    names = _names(path)
    for start in range(len(names)):
      hit = by_path.get(names[start:])
      if hit is not None:
        return hit[1] if hit[0] == leaf.shape else PartitionSpec()
    return PartitionSpec()

  return jax.tree_util.tree_map_with_path(spec_of, abstract_opt_state)


def state_specs(task: Task, boxed_state: TrainState, params_rules, opt_rules):
  """PartitionSpecs of a whole (abstract, boxed) TrainState: params per `params_rules` (the
  frozen half too), the optimizer state's parameter-shaped leaves per `opt_rules`, the rest
  replicated."""
  sharding_lib.check_rule_coverage(boxed_state.params, params_rules)
  logical = nn.get_partition_spec(boxed_state.params)
  params_specs = nn.logical_to_mesh(logical, list(params_rules))
  trainable_opt_specs = task.split(nn.logical_to_mesh(logical, list(opt_rules)))[0]
  plain = jax.tree.map(lambda x: getattr(x, 'value', x), boxed_state.params,
                       is_leaf=lambda x: isinstance(x, nn.Partitioned))  # no constraint applied
  trainable = task.split(plain)[0]
  opt_specs = optimizer_specs(boxed_state.opt_state, trainable, trainable_opt_specs)
  rest = jax.tree.map(lambda _: PartitionSpec(), boxed_state.replace(params=None, opt_state=None))
  return rest.replace(params=params_specs, opt_state=opt_specs)


def state_shardings(task: Task, boxed_state: TrainState, mesh, params_rules, opt_rules):
  """`state_specs` as NamedShardings on `mesh`."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec),
                      state_specs(task, boxed_state, params_rules, opt_rules),
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def abstract_state(task: Task, tx, seed: int = 0) -> TrainState:
  """The boxed state's shapes (logical axis names attached), nothing allocated."""
  with nn.logical_axis_rules(()):  # init traces the model on a 1-row batch: no constraints
    return jax.eval_shape(lambda: init_state(task, tx, seed))


def _creator(task: Task, tx, seed: int, shardings):
  def create():
    with nn.logical_axis_rules(()):
      state = init_state(task, tx, seed)
    params = jax.lax.with_sharding_constraint(nn.unbox(state.params), shardings.params)
    return state.replace(params=params, opt_state=tx.init(task.split(params)[0]))
  return create


def state_layout(task: Task, tx, seed: int, mesh, rules) -> TrainState:
  """The plain (unboxed) state as ShapeDtypeStructs with their NamedShardings on `mesh`: what
  `build_state` creates, and what `lmjax compile` compiles the step for. Only traces.
  `rules` = (params rules, optimizer-state rules)."""
  boxed = abstract_state(task, tx, seed)
  shardings = state_shardings(task, boxed, mesh, *rules)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      jax.eval_shape(_creator(task, tx, seed, shardings)), shardings)


def build_state(task: Task, tx, seed: int, mesh, rules):
  """(compiled create(), abstract state with shardings). Nothing is allocated until `create()`
  runs, and then directly sharded. `rules` = (params rules, optimizer-state rules)."""
  boxed = abstract_state(task, tx, seed)
  shardings = state_shardings(task, boxed, mesh, *rules)
  compiled = jax.jit(_creator(task, tx, seed, shardings), out_shardings=shardings).lower().compile()
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          jax.eval_shape(_creator(task, tx, seed, shardings)),
                          compiled.output_shardings)
  return compiled, abstract
