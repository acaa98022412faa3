"""`lmjax lm-eval ARGS...`: lm-evaluation-harness's own command line, with the `lmjax` model.

lm-eval 0.4 cannot discover models from other packages, so this command registers the `lmjax`
model class (`lmjax.evaluation.harness.LmjaxLM`) and then runs lm-eval's CLI on the arguments as
given, e.g.

  lmjax lm-eval --model lmjax --model_args workdir=DIR,batch_size=16 --tasks hellaswag \
      --num_fewshot 10

Every lm-eval option works (`lm-eval run --help`); `lmjax eval --tasks` is the shorter form that
records the results in the workdir.
"""

from __future__ import annotations

import argparse
import sys

from lmjax.config import ConfigError


def add_arguments(parser) -> None:
  """Every argument after `lm-eval` belongs to lm-eval: this sub-parser takes them all as they
  are (argparse's REMAINDER refuses a first argument that looks like an option)."""
  parser.add_argument('args', nargs='*', help='lm-eval arguments (lm-eval run --help)')

  def take_all(args=None, namespace=None):
    namespace = namespace if namespace is not None else argparse.Namespace()
    namespace.module = parser.get_default('module')
    namespace.args = list(args or [])
    return namespace, []

  parser.parse_known_args = take_all


def run(args) -> int:
  from lmjax.evaluation import harness  # pylint: disable=g-import-not-at-top  (registers lmjax)
  from lm_eval._cli import HarnessCLI  # pylint: disable=g-import-not-at-top
  from lm_eval.utils import setup_logging  # pylint: disable=g-import-not-at-top
  saved = sys.argv
  sys.argv = ['lm-eval', *args.args]
  try:
    setup_logging()
    cli = HarnessCLI()
    cli.execute(cli.parse_args())
  except harness.HarnessInputError as e:
    raise ConfigError(str(e)) from None
  finally:
    sys.argv = saved
  return 0
