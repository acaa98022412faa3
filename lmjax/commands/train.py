"""`lmjax train`: train a model, or resume the run in the workdir."""

from __future__ import annotations

from lmjax.commands.common import add_config_arguments, config_from_args


def add_arguments(parser) -> None:
  add_config_arguments(parser)
  parser.add_argument('--workdir', required=True, help='run directory; re-running resumes it')
  parser.add_argument('--no_sample', action='store_true',
                      help='skip printing a sample after training')


def run(args) -> int:
  config = config_from_args(args)
  from lmjax.train.loop import train  # pylint: disable=g-import-not-at-top
  explicit = {o.split('=', 1)[0] for o in args.overrides}  # may differ from an init_from base
  summary = train(config, args.workdir, explicit=explicit)
  if not summary['finished']:
    print(f'stopped at step {summary["step"]}; checkpoint saved, re-run the command to resume')
    return 0
  losses = ', '.join(f'{name} {summary[key]:.4f}' for name, key in
                     (('train loss', 'train_loss'), ('eval loss', 'eval_loss'))
                     if summary.get(key) is not None)
  print(f'finished step {summary["step"]}' + (f': {losses}' if losses else ''))
  if not args.no_sample:
    from lmjax.inference.complete import sample_text  # pylint: disable=g-import-not-at-top
    print('--- sample ---')
    print(config.sample.prompt + sample_text(args.workdir, config, [config.sample.prompt])[0])
  return 0
