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

import sys

from lmjax.tasks import export


def add_arguments(parser) -> None:
  parser.add_argument('action', choices=('merge', 'save'))
  parser.add_argument('--workdir', required=True, help='a post-training workdir')
  parser.add_argument('--output', required=True, help='the directory to write')


def run(args) -> int:
  try:
    if args.action == 'merge':
      export.merge_workdir(args.workdir, args.output)
      print(f'merged {args.workdir} -> {args.output}/params')
    else:
      export.save_workdir_adapters(args.workdir, args.output)
      print(f'saved adapters of {args.workdir} -> {args.output}/adapters')
  except (FileNotFoundError, ValueError) as e:
    print(f'lmjax peft: error: {e}', file=sys.stderr)
    return 2
  return 0
