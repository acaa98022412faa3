"""The one place that reads and writes a workdir's files.

  DIR/config.json        the resolved config (written atomically)
  DIR/summary.json       the run summary (atomically)
  DIR/checkpoints/STEP/  train state + data iterator state (`lmjax.checkpoint.Checkpointer`)
  DIR/params/            params only (converted, merged or exported models)
  DIR/adapters/, DIR/peft.json   adapters alone (`lmjax peft save`)

Which params tree a workdir holds depends on its task; `lmjax.tasks.load_trained` composes these
functions with the task's layout.
"""

from __future__ import annotations

import dataclasses
import json
import os

from lmjax import checkpoint as checkpoint_lib
from lmjax import config as config_lib


def write_json(path: str, value) -> None:
  """Writes JSON atomically: a reader never sees a partial file."""
  tmp = f'{path}.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(value, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def read_json(path: str, default=None):
  if not os.path.exists(path):
    return default
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def write_config(workdir: str, config) -> None:
  os.makedirs(workdir, exist_ok=True)
  write_json(os.path.join(workdir, 'config.json'), config.to_dict())


def read_config(workdir: str):
  """The workdir's config (checked against today's schema), or None without a config.json."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    return config_lib.from_json(f.read())


def config_of(workdir: str, overrides=()):
  """The resolved config a workdir was trained (or converted) with, plus overrides, validated."""
  config = read_config(workdir)
  if config is None:
    raise config_lib.ConfigError(f'--workdir: {workdir} has no config.json (not an lmjax workdir)')
  config_lib.apply_overrides(config, list(overrides))
  config_lib.validate(config)
  return config


def write_summary(workdir: str, summary: dict) -> None:
  write_json(os.path.join(workdir, 'summary.json'), summary)


def read_summary(workdir: str) -> dict:
  return read_json(os.path.join(workdir, 'summary.json'), {})


def checkpointer(workdir: str, keep: int = 3) -> checkpoint_lib.Checkpointer:
  return checkpoint_lib.Checkpointer(workdir, keep=keep)


def load_params(workdir: str, abstract_params):
  """Params from a workdir: its latest complete checkpoint, else its params-only export, restored
  into `abstract_params`' shapes, dtypes and shardings."""
  return checkpoint_lib.load_params(workdir, abstract_params)


def save_params(workdir: str, params, config=None) -> None:
  """A params-only export (with its config, when given)."""
  os.makedirs(workdir, exist_ok=True)
  checkpoint_lib.save_params(workdir, params)
  if config is not None:
    write_config(workdir, config)


def save_adapters(directory: str, peft, small) -> None:
  """Adapter (and head) leaves alone, plus `peft.json`: a small Orbax directory."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  checkpoint_lib.save_tree(os.path.join(directory, 'adapters'), small)
  write_json(os.path.join(directory, 'peft.json'), dataclasses.asdict(peft))


def load_adapters(directory: str, abstract_small=None):
  """(the `peft` group as a dict, adapter tree) written by `save_adapters`."""
  directory = os.path.abspath(directory)
  peft = read_json(os.path.join(directory, 'peft.json'))
  if peft is None:
    raise FileNotFoundError(f'{directory}: no peft.json (not an adapters directory)')
  return peft, checkpoint_lib.load_tree(os.path.join(directory, 'adapters'), abstract_small)


def check_resume_compatible(config, workdir: str) -> None:
  """A workdir with checkpoints resumes only under the same model (and task, PEFT) shape."""
  saved = read_config(workdir)
  if saved is None or not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    return
  for group in ('model', 'peft', 'task'):
    old, new = saved.get(group), config.get(group)
    old = old.to_dict() if hasattr(old, 'to_dict') else old
    new = new.to_dict() if hasattr(new, 'to_dict') else new
    if old == new:
      continue
    if isinstance(old, dict):
      key = next(f'{group}.{k}' for k in new if old.get(k) != new[k])
      old, new = old.get(key.split('.', 1)[1]), new[key.split('.', 1)[1]]
    else:
      key = group
    raise config_lib.ConfigError(
        f'{key}: {workdir} holds checkpoints of a run with {key}={old!r}, not {new!r}; '
        'use another --workdir (or --config.init_from to start from it)')
