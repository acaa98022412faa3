"""Cluster submission of a sweep: a SLURM job array (one task per point) or one
`gcloud compute tpus tpu-vm ssh --worker=all` command per point on a TPU VM slice.

Each job runs the point's `lmjax train` command (which resumes from the run's checkpoint when
resubmitted) and then `lmjax sweep ... --collect`, which adds the finished row to results.csv under
the file lock. The workdir must therefore be on a filesystem the jobs share.
"""

from __future__ import annotations

import os
import shlex
import subprocess

from lmjax.scaling import runner as runner_lib


def point_job(sweep, point, workdir, sweep_file, python, extra_overrides=()) -> str:
  """The shell command of one point: train, then collect its row."""
  train = runner_lib.train_command(sweep, point, workdir, python=python,
                                   extra_overrides=extra_overrides)
  collect = [python, '-m', 'lmjax.cli', 'sweep', sweep_file, f'--workdir={workdir}', '--collect']
  collect += [f'--config.{o}' for o in extra_overrides]
  return f'{shlex.join(train)} && {shlex.join(collect)}'


def slurm_script(sweep, points, workdir, sweep_file, python='python', parallel=0,
                 sbatch_options=(), repo_dir=None, extra_overrides=()) -> str:
  """A job-array script running `points[$SLURM_ARRAY_TASK_ID]`; `parallel` > 0 caps how many
  tasks run at once; `sbatch_options` are extra `#SBATCH` options (`--gres=gpu:1`, ...)."""
  array = f'0-{len(points) - 1}' + (f'%{parallel}' if parallel > 0 else '')
  log_dir = os.path.join(workdir, 'slurm')
  lines = ['#!/bin/bash', '#SBATCH --job-name=lmjax-sweep', f'#SBATCH --array={array}',
           f'#SBATCH --output={log_dir}/%A_%a.out']
  lines += [f'#SBATCH {option}' for option in sbatch_options]
  lines += ['set -euo pipefail', f'cd {shlex.quote(repo_dir or os.getcwd())}', 'JOBS=(']
  for point in points:
    job = point_job(sweep, point, workdir, sweep_file, python, extra_overrides)
    lines.append(f'  {shlex.quote(job)}  # {point.name}')
  lines += [')', 'eval "${JOBS[$SLURM_ARRAY_TASK_ID]}"', '']
  return '\n'.join(lines)


def submit_slurm(script: str, workdir: str, dry_run: bool, log=print) -> int:
  path = os.path.join(workdir, 'sweep.sbatch')
  command = ['sbatch', path]
  if dry_run:
    log(f'# {path}\n{script}\n# submit with: {shlex.join(command)}')
    return 0
  os.makedirs(os.path.join(workdir, 'slurm'), exist_ok=True)
  with open(path, 'w') as f:
    f.write(script)
  return subprocess.run(command, check=False).returncode


def gcloud_commands(sweep, points, workdir, sweep_file, tpu, zone, project='', python='python3',
                    repo_dir='~/lmjax', extra_overrides=()) -> list[list[str]]:
  """One `gcloud ... tpu-vm ssh --worker=all` command per point: every host of the slice runs
  the point (multi-host JAX), then collects its row."""
  commands = []
  for point in points:
    job = point_job(sweep, point, workdir, sweep_file, python, extra_overrides)
    command = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', tpu, f'--zone={zone}']
    if project:
      command.append(f'--project={project}')
    command += ['--worker=all', f'--command=cd {repo_dir} && {job}']
    commands.append(command)
  return commands


def run_gcloud(commands, dry_run: bool, log=print) -> int:
  """Runs the points one after another (each uses the whole slice); returns failures."""
  failures = 0
  for command in commands:
    log(shlex.join(command))
    if not dry_run:
      failures += subprocess.run(command, check=False).returncode != 0
  return failures
