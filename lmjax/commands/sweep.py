"""`lmjax sweep experiments/NAME.py --workdir=DIR`: run (or resume) every point of a sweep.

  --dry_run                 print the commands / job script without running anything
  --parallel=N              points at once (local: processes; slurm: array tasks at once)
  --scheduler=local|slurm|gcloud
  --collect                 only add finished points' rows to DIR/results.csv
  --config.KEY=VALUE        extra overrides for every point (e.g. a short smoke test)

Each point runs in DIR/runs/<name>; finished points are skipped and unfinished ones resume.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from lmjax.scaling import runner
from lmjax.scaling import schedulers
from lmjax.scaling import sweep as sweep_lib


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('sweep_file', help='a Python file defining get_sweep()')
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--dry_run', action='store_true')
  parser.add_argument('--parallel', type=int, default=1)
  parser.add_argument('--scheduler', default='local', choices=('local', 'slurm', 'gcloud'))
  parser.add_argument('--collect', action='store_true',
                      help="only add finished points' rows to results.csv")
  parser.add_argument('--devices', default=None,
                      help='local: comma-separated GPU ids to share out (default: all visible)')
  parser.add_argument('--python', default='',
                      help='python on the cluster (default: this one locally, python elsewhere)')
  parser.add_argument('--sbatch', action='append', default=[],
                      help='an extra #SBATCH option, e.g. --sbatch=--gres=gpu:1 (repeatable)')
  parser.add_argument('--repo_dir', default='', help='checkout on the cluster (default: cwd)')
  parser.add_argument('--tpu', default='', help='gcloud: TPU VM name')
  parser.add_argument('--zone', default='', help='gcloud: zone')
  parser.add_argument('--project', default='', help='gcloud: project')


def _pending(sweep, workdir):
  return [p for p in sweep.points if not runner.read_summary(runner.run_dir(workdir, p))]


def run(args) -> int:
  sweep = sweep_lib.load_sweep(args.sweep_file)
  extra = list(getattr(args, 'overrides', []))
  for note in sweep.notes:
    print(note)
  for point in sweep.points:  # every point's config must be valid before anything runs
    sweep_lib.point_config(sweep, point, extra)
  if args.collect:
    added = runner.collect(sweep, args.workdir, extra)
    print(f'added {len(added)} rows to {runner.results_path(args.workdir)}')
    return 0
  pending = _pending(sweep, args.workdir)
  if args.scheduler == 'slurm':
    if not pending:
      print('every point has finished')
      return 0
    script = schedulers.slurm_script(sweep, pending, args.workdir, args.sweep_file,
                                     python=args.python or 'python', parallel=args.parallel,
                                     sbatch_options=args.sbatch, repo_dir=args.repo_dir or None,
                                     extra_overrides=extra)
    return schedulers.submit_slurm(script, args.workdir, args.dry_run)
  if args.scheduler == 'gcloud':
    if not (args.tpu and args.zone):
      print('lmjax sweep: --scheduler=gcloud needs --tpu and --zone', file=sys.stderr)
      return 2
    commands = schedulers.gcloud_commands(sweep, pending, args.workdir, args.sweep_file,
                                          args.tpu, args.zone, args.project,
                                          python=args.python or 'python3',
                                          repo_dir=args.repo_dir or '~/lmjax',
                                          extra_overrides=extra)
    return 1 if schedulers.run_gcloud(commands, args.dry_run) else 0
  if args.dry_run:
    for point in sweep.points:
      status = 'pending' if point in pending else 'finished'
      command = runner.train_command(sweep, point, args.workdir, python=args.python or
                                     sys.executable, extra_overrides=extra)
      print(f'# {point.name} ({status})\n{shlex.join(command)}')
    return 0
  devices = args.devices.split(',') if args.devices else None
  outcome = runner.run_local(sweep, args.workdir, parallel=args.parallel, devices=devices,
                             extra_overrides=extra)
  print(f'{len(outcome["finished"])} finished now, {len(outcome["skipped"])} earlier, '
        f'{len(outcome["failed"])} failed: {" ".join(outcome["failed"])}'.rstrip(': '))
  return 1 if outcome['failed'] else 0
