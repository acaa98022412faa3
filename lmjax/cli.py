"""`lmjax <command>`: one entry point, one module per command.

Each command module defines `add_arguments(parser)` and `run(args) -> int`. Arguments of the form
`--config.KEY=VALUE` are collected into `args.overrides` for the commands that take a config.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> (module, one-line help)
COMMANDS = {
    'train': ('lmjax.commands.train', 'train (or resume) a model in a workdir'),
    'sample': ('lmjax.commands.sample', 'generate text from a trained workdir'),
    'eval': ('lmjax.commands.evaluate', 'evaluate a trained workdir on held-out data'),
    'lm-eval': ('lmjax.commands.lm_eval', 'lm-evaluation-harness\'s CLI with the lmjax model'),
    'score': ('lmjax.commands.score', 'per-token log-probabilities of texts or token ids'),
    'convert': ('lmjax.commands.convert', 'convert Hugging Face models to/from workdirs'),
    'scaling': ('lmjax.commands.scaling', 'scaling laws: FLOP accounting, IsoFLOP design, fits'),
    'sweep': ('lmjax.commands.sweep', 'run or resume a sweep of training runs'),
    'peft': ('lmjax.commands.peft', 'merge adapters into a params export, or save them alone'),
    'compile': ('lmjax.commands.compile', 'compile a run for a TPU slice here; say if it fits'),
}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='lmjax', description='Train, evaluate and sample decoder-only language models.')
  subparsers = parser.add_subparsers(dest='command', metavar='COMMAND')
  subparsers.required = True
  for name, (module_name, help_text) in COMMANDS.items():
    sub = subparsers.add_parser(name, help=help_text, description=help_text)
    sub.set_defaults(module=module_name)
    importlib.import_module(module_name).add_arguments(sub)
  return parser


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.KEY=VALUE` (or `--config.KEY VALUE`) from the other arguments."""
  rest, overrides = [], []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith('--config.'):
      if '=' in arg:
        overrides.append(arg[len('--config.'):])
      elif i + 1 < len(argv):
        overrides.append(f'{arg[len("--config."):]}={argv[i + 1]}')
        i += 1
      else:
        overrides.append(arg[len('--config.'):])
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  rest, overrides = split_overrides(argv)
  args = build_parser().parse_args(rest)
  args.overrides = overrides
  module = importlib.import_module(args.module)
  from lmjax.config import ConfigError  # pylint: disable=g-import-not-at-top
  from lmjax.data.jsonl import DataError  # pylint: disable=g-import-not-at-top
  try:
    return module.run(args) or 0
  except ConfigError as e:
    return _fail(args.command, 'config error', e)
  except DataError as e:
    return _fail(args.command, 'data error', e)
  except ModuleNotFoundError as e:
    extra = OPTIONAL_MODULES.get((e.name or '').split('.')[0])
    if extra is None:
      raise
    return _fail(args.command, 'missing optional dependency',
                 f'{e.name}: pip install -e ".[{extra}]"')


# optional packages -> the extra (setup.cfg) that installs them
OPTIONAL_MODULES = {'safetensors': 'hf', 'tokenizers': 'hf', 'transformers': 'hf', 'torch': 'hf',
                    'pyarrow': 'data', 'datasets': 'data', 'zstandard': 'data', 'lm_eval': 'eval'}


def _fail(command: str, kind: str, error) -> int:
  """One line on stderr, exit status 2: a user mistake, not a crash."""
  message = ' '.join(str(error).split('\n')[:1]) or type(error).__name__
  print(f'lmjax {command}: {kind}: {message}', file=sys.stderr)
  return 2


if __name__ == '__main__':
  sys.exit(main())
