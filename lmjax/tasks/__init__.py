"""Tasks: what the one train step and loop run (the contract: `lmjax.tasks.base`).

`from_config(config)` builds the config's task once; `TASKS` maps each `task` value to its class;
`load_trained(workdir)` loads any workdir's model for decoding, scoring or `init_from`.
"""

from __future__ import annotations

import jax

from lmjax import workdir as workdir_lib
from lmjax.config import choices, mesh_shape
from lmjax.models.transformer import ModelConfig
from lmjax.parallel import target
from lmjax.tasks.base import Task
from lmjax.tasks.ppo import PpoTask
from lmjax.tasks.preference import DpoTask, RewardTask
from lmjax.tasks.pretrain import PretrainTask
from lmjax.tasks.sft import SftTask

TASKS = {cls.name: cls for cls in (PretrainTask, SftTask, RewardTask, DpoTask, PpoTask)}
assert tuple(TASKS) == choices('task'), 'every `task` value of the config schema has a class'


def pipeline_of(config) -> tuple[int, int]:
  """(stages, micro-batches) of a config on the target devices (`mesh.pipeline`, -1 resolved)."""
  if config.mesh.pipeline == 1:
    return 1, config.pipeline_microbatches
  return mesh_shape(config, target.device_count())['pipeline'], config.pipeline_microbatches


def from_config(config) -> Task:
  """The task of a (validated) config."""
  return TASKS[config.task].from_config(config, ModelConfig.from_config(config.model),
                                        pipeline_of(config))




def load_trained(workdir: str, config=None, mesh=None, rules=()):
  """(config, plain decoding params) of any lmjax workdir (pretraining, converted, exported, or a
  fine-tuning run with its adapters merged), on one device or restored straight onto `mesh`."""
  config = config if config is not None else workdir_lib.read_config(workdir)
  if config is None:
    raise FileNotFoundError(f'{workdir}: no config.json (not an lmjax workdir)')
  task, params = load_task_params(workdir, config, mesh, rules)
  return config, task.decoding_params(params)


def load_task_params(workdir: str, config=None, mesh=None, rules=()):
  """(task, the params tree the workdir's task trains), on one device or laid out on `mesh` by
  the logical-axis `rules`."""
  config = config if config is not None else workdir_lib.read_config(workdir)
  if config is None:
    raise FileNotFoundError(f'{workdir}: no config.json (not an lmjax workdir)')
  task = from_config(config)
  return task, workdir_lib.load_params(workdir, task.abstract_params(mesh, rules))


def load_model(workdir: str, config=None):
  """(ModelConfig, plain decoding params) of any lmjax workdir (see `load_trained`)."""
  config, params = load_trained(workdir, config)
  return ModelConfig.from_config(config.model), params
