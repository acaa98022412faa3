"""`lmjax train` with fault injection, for tests that kill or signal a run in flight.

  python tests/fault_injection.py [--crash_at=N] [--step_delay=S] ARGS OF `lmjax train`

`--crash_at=N` kills this process (SIGKILL) right after step N is dispatched and its checkpoint
save, if any, has started; `--step_delay=S` sleeps S seconds after every step, so that a test can
signal a run in flight. Both are hooks of `lmjax.train.loop.train` (called after each step).
Exits like `lmjax train`: 0 when the run finishes or stops on SIGTERM (printing `stopped at step
...`), 2 on a config error.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # lmjax itself


def fault_hooks(crash_at: int = 0, step_delay: float = 0.0) -> list:
  """Loop hooks: SIGKILL right after step `crash_at` (0: never); sleep `step_delay` s a step."""
  hooks = []
  if crash_at:
    def crash(step, state):
      del state
      if step == crash_at:
        os.kill(os.getpid(), signal.SIGKILL)
    hooks.append(crash)
  if step_delay:
    hooks.append(lambda step, state: time.sleep(step_delay))
  return hooks


def main(argv: list[str]) -> int:
  from lmjax import cli  # pylint: disable=g-import-not-at-top
  from lmjax.commands import train as train_command  # pylint: disable=g-import-not-at-top
  from lmjax.commands.common import config_from_args  # pylint: disable=g-import-not-at-top
  from lmjax.config import ConfigError  # pylint: disable=g-import-not-at-top

  rest, overrides = cli.split_overrides(argv)
  parser = argparse.ArgumentParser(prog='fault_injection.py')
  train_command.add_arguments(parser)
  parser.add_argument('--crash_at', type=int, default=0, help='SIGKILL right after this step')
  parser.add_argument('--step_delay', type=float, default=0.0, help='seconds to sleep per step')
  args = parser.parse_args(rest)
  args.overrides = overrides
  try:
    config = config_from_args(args)
    from lmjax.train.loop import train  # pylint: disable=g-import-not-at-top
    summary = train(config, args.workdir, hooks=fault_hooks(args.crash_at, args.step_delay))
  except ConfigError as e:
    print(f'lmjax train: config error: {e}', file=sys.stderr)
    return 2
  if not summary['finished']:
    print(f'stopped at step {summary["step"]}; checkpoint saved, re-run the command to resume')
  else:
    print(f'finished step {summary["step"]}')
  if summary['finished'] and not args.no_sample:
    from lmjax.inference.complete import sample_text  # pylint: disable=g-import-not-at-top
    print('--- sample ---')
    print(config.sample.prompt + sample_text(args.workdir, config, [config.sample.prompt])[0])
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
