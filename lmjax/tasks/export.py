"""Exports of a fine-tuning workdir: the model with its adapters merged, or the adapters alone."""

from __future__ import annotations

from lmjax import workdir as workdir_lib
from lmjax.peft import hooks
from lmjax.tasks import load_task_params, load_trained
from lmjax.tasks import params as params_lib


def merge_workdir(workdir: str, output: str) -> None:
  """Exports a LoRA-family run with its adapters merged: a float params-only workdir."""
  config = workdir_lib.config_of(workdir)
  if hooks.is_hook_method(config.peft.method):
    raise hooks.merge_error(config.peft.method)
  config, merged = load_trained(workdir, config)
  config.task = 'pretrain'
  config.peft.method = 'none'
  config.peft.base_dtype = 'float32'  # the export is float (model.param_dtype)
  config.init_from = ''
  workdir_lib.save_params(output, merged, config)


def save_workdir_adapters(workdir: str, output: str) -> None:
  """Writes a fine-tuning run's adapters (and heads) alone."""
  task, params = load_task_params(workdir)
  if task.name == 'pretrain':
    raise ValueError(f'{workdir}: a pretraining workdir has no adapters')
  small = {k: v for k, v in params['trainable'].items() if k not in ('model', 'adapters')}
  if task.peft.enabled:
    small['adapters'] = params_lib.adapters_of(params)
  workdir_lib.save_adapters(output, task.peft, small)
