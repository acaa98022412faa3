"""`lmjax peft`: export a post-training workdir's adapters.

  lmjax peft merge --workdir=DIR --output=DIR2      params-only export with adapters merged
                                                    (DIR2 reads like a pretrained workdir:
                                                    `lmjax sample`, `lmjax convert --to_hf`,
                                                    `--config.init_from=DIR2`)
  lmjax peft save --workdir=DIR --output=DIR2       the adapters (and heads) alone + peft.json

Bottleneck adapters, prefix tuning, prompt tuning and P-tuning add computation to the forward
pass rather than a weight delta: `merge` refuses them with an error; `save` exports them.
"""

from __future__ import annotations

import json
import os
import sys


def add_arguments(parser) -> None:
  parser.add_argument('action', choices=('merge', 'save'))
  parser.add_argument('--workdir', required=True, help='a post-training workdir')
  parser.add_argument('--output', required=True, help='the directory to write')


def merge_workdir(workdir: str, output: str) -> None:
  from lmjax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from lmjax.posttrain import params as params_lib  # pylint: disable=g-import-not-at-top
  config = params_lib.read_config(workdir)
  if config is None:
    raise FileNotFoundError(f'{workdir}: no config.json (not an lmjax workdir)')
  task = params_lib.task_from_config(config)
  if task is not None and not task.peft.low_rank and task.peft.enabled:
    from lmjax.peft import hooks  # pylint: disable=g-import-not-at-top
    raise hooks.merge_error(task.peft.method)
  task, params = params_lib.load_post_params(workdir, config)
  merged = params_lib.merged_model_params(task, params)
  os.makedirs(output, exist_ok=True)
  checkpoint_lib.save_params(output, merged)
  config.task = 'pretrain'
  config.peft.method = 'none'
  config.peft.base_dtype = 'float32'  # the export is float (model.param_dtype)
  config.init_from = ''
  with open(os.path.join(output, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump(config.to_dict(), f, indent=2, sort_keys=True)


def save_workdir_adapters(workdir: str, output: str) -> None:
  from lmjax.posttrain import params as params_lib  # pylint: disable=g-import-not-at-top
  task, params = params_lib.load_post_params(workdir)
  if task is None:
    raise ValueError(f'{workdir}: a pretraining workdir has no adapters')
  params_lib.save_adapters(output, task, params)


def run(args) -> int:
  try:
    if args.action == 'merge':
      merge_workdir(args.workdir, args.output)
      print(f'merged {args.workdir} -> {args.output}/params')
    else:
      save_workdir_adapters(args.workdir, args.output)
      print(f'saved adapters of {args.workdir} -> {args.output}/adapters')
  except (FileNotFoundError, ValueError) as e:
    print(f'lmjax peft: error: {e}', file=sys.stderr)
    return 2
  return 0
