"""`lmjax scaling {flops,design,fit}`: FLOP accounting, IsoFLOP designs and scaling-law fits.

  lmjax scaling flops --config=tiny [--config.KEY=VALUE ...]
  lmjax scaling design --budgets=1e15,3e15,1e16 --family=llama [--seq_len=..] [--out=points.json]
  lmjax scaling fit RESULTS.csv [--loss_column=eval_loss] [--out=DIR] [--target_flops=1e21]
      [--bootstrap=N]
"""

from __future__ import annotations

import argparse
import json
import os

from lmjax import config as config_lib
from lmjax.scaling import analysis
from lmjax.scaling import flops as flops_lib
from lmjax.scaling import isoflop
from lmjax.scaling import results as results_lib
from lmjax.scaling import shapes


def _floats(text: str) -> list[float]:
  try:
    return [float(x) for x in text.split(',') if x.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected comma-separated numbers, got {text!r}') from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
  sub = parser.add_subparsers(dest='scaling_command', metavar='SUBCOMMAND')
  sub.required = True

  flops = sub.add_parser('flops', help='parameter counts and training FLOPs per token')
  flops.add_argument('--config', default='', help='config file or preset (default: the schema)')

  design = sub.add_parser('design', help='an IsoFLOP design: model sizes and steps per budget')
  design.add_argument('--budgets', type=_floats, required=True, help='e.g. 1e15,3e15,1e16')
  design.add_argument('--family', default='llama', choices=sorted(shapes.FAMILIES))
  design.add_argument('--config', default='', help='base config (vocab, seq_len, batch)')
  design.add_argument('--seq_len', type=int, default=0)
  design.add_argument('--batch_size', type=int, default=0)
  design.add_argument('--num_sizes', type=int, default=5)
  design.add_argument('--span', type=float, default=10.0, help='largest / smallest model size')
  design.add_argument('--tokens_per_param', type=float, default=20.0)
  design.add_argument('--tolerance', type=float, default=0.05,
                      help='largest relative miss of the budget before adjusting or dropping')
  design.add_argument('--min_steps', type=int, default=20)
  design.add_argument('--out', default='', help='write the points as JSON here')

  fit = sub.add_parser('fit', help='fit scaling laws to a results table')
  fit.add_argument('results', help='CSV with params, tokens (or flops) and a loss column')
  fit.add_argument('--loss_column', default='eval_loss')
  fit.add_argument('--params_column', default='params')
  fit.add_argument('--tokens_column', default='tokens')
  fit.add_argument('--flops_column', default='flops')
  fit.add_argument('--out', default='', help='directory for fit.json and the plots')
  fit.add_argument('--target_flops', type=float, default=1e21)
  fit.add_argument('--bootstrap', type=int, default=0, help='bootstrap resamples (0 = none)')
  fit.add_argument('--level', type=float, default=0.95, help='confidence level of the intervals')
  fit.add_argument('--seed', type=int, default=0)
  fit.add_argument('--family', default='', choices=[''] + sorted(shapes.FAMILIES),
                   help='also allocate with the exact FLOPs per token of this family')
  fit.add_argument('--config', default='', help='base config of the family (vocab, seq_len)')


def _config(path: str, overrides) -> object:
  config = config_lib.load_config(path) if path else config_lib.base_config()
  config_lib.apply_overrides(config, list(overrides))
  config_lib.validate(config)
  return config


def run_flops(args) -> int:
  print(flops_lib.format_report(_config(args.config, args.overrides)))
  return 0


def run_design(args) -> int:
  base = _config(args.config, args.overrides)
  design = isoflop.design_isoflop(
      args.budgets, base, family=args.family, num_sizes=args.num_sizes, span=args.span,
      tokens_per_param=args.tokens_per_param, batch_size=args.batch_size or None,
      seq_len=args.seq_len or None, tolerance=args.tolerance, min_steps=args.min_steps)
  print(isoflop.format_design(design))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'points': [p.to_dict() for p in design.points], 'dropped': design.dropped,
                 'notes': design.notes}, f, indent=2)
    print(f'wrote {len(design.points)} points to {args.out}')
  return 0


def run_fit(args) -> int:
  rows = results_lib.read_rows(args.results)
  data = analysis.fit_data(rows, args.loss_column, args.params_column, args.tokens_column,
                           args.flops_column)
  candidates = None
  if args.family:
    candidates = analysis.exact_candidates(args.family, _config(args.config, args.overrides),
                                           args.params_column)
  result = analysis.analyze(data, target_flops=args.target_flops, bootstrap=args.bootstrap,
                            seed=args.seed, level=args.level, candidates=candidates)
  result['loss_column'] = args.loss_column
  result['params_column'] = args.params_column
  print(analysis.format_result(result))
  out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(args.results)), 'fit')
  for path in analysis.write_outputs(result, data, out_dir, size_label=args.params_column):
    print(f'wrote {path}')
  return 0


def run(args) -> int:
  try:
    return {'flops': run_flops, 'design': run_design, 'fit': run_fit}[args.scaling_command](args)
  except ValueError as e:
    if isinstance(e, config_lib.ConfigError):
      raise
    print(f'lmjax scaling {args.scaling_command}: {e}')
    return 2
