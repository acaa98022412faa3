"""Runs a sweep's points locally, each as its own `lmjax train` process in `WORKDIR/runs/<name>`.

A point is finished when its run directory holds a `summary.json` with `"finished": true`; finished
points are skipped, and any other point is started with the same command, which makes `lmjax train`
resume from the run's latest checkpoint. When a point finishes its row goes to `WORKDIR/results.csv`
(see `results.py`); rows of finished points missing from it (a sweep killed between the two) are
added on the next invocation. With `parallel > 1` several points run at once, each process seeing
its own share of the GPUs through CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import queue
import shutil
import subprocess
import sys

from lmjax.scaling import flops as flops_lib
from lmjax.scaling import results as results_lib


def run_dir(workdir: str, point) -> str:
  return os.path.join(workdir, 'runs', point.name)


def results_path(workdir: str) -> str:
  return os.path.join(workdir, 'results.csv')


def train_command(sweep, point, workdir: str, python: str = sys.executable,
                  extra_overrides=()) -> list[str]:
  overrides = list(sweep.overrides) + list(point.overrides) + list(extra_overrides)
  return ([python, '-m', 'lmjax.cli', 'train', '--no_sample', f'--config={sweep.config}',
           f'--workdir={run_dir(workdir, point)}'] + [f'--config.{o}' for o in overrides])


def read_summary(directory: str) -> dict | None:
  """The run's summary if it finished, else None."""
  path = os.path.join(directory, 'summary.json')
  try:
    with open(path) as f:
      summary = json.load(f)
  except (OSError, ValueError):
    return None
  return summary if summary.get('finished') else None


def result_row(sweep, point, summary: dict, extra_overrides=()) -> dict:
  """The results.csv row of a finished point: exact counts from its config, losses from its
  summary."""
  from lmjax.scaling import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  config = sweep_lib.point_config(sweep, point, extra_overrides)
  counts = flops_lib.param_counts(config.model)
  per_token = flops_lib.flops_per_token(config.model, config.seq_len)['total']
  tokens = summary.get('tokens') or config.steps * config.batch_size * config.seq_len
  row = {'name': point.name, 'overrides': ' '.join(point.overrides),
         'params': counts['total'], 'non_embedding_params': counts['non_embedding'],
         'flops': tokens * per_token, 'tokens': tokens,
         'train_loss': summary.get('train_loss', ''), 'eval_loss': summary.get('eval_loss', ''),
         'wall_seconds': summary.get('wall_seconds', ''), 'steps': summary.get('step', ''),
         'flops_per_token': per_token}
  row.update({key: value for key, value in point.info if key not in row})
  return row


def collect(sweep, workdir: str, extra_overrides=()) -> list[str]:
  """Adds the rows of finished points missing from results.csv; returns their names."""
  added = []
  for point in sweep.points:
    summary = read_summary(run_dir(workdir, point))
    if summary and results_lib.add_row(results_path(workdir),
                                       result_row(sweep, point, summary, extra_overrides)):
      added.append(point.name)
  return added


def subprocess_runner(command: list[str], directory: str, env: dict) -> int:
  """Runs one point, appending its output to `<run dir>/train.log`; returns the exit status."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'train.log'), 'a') as log:
    return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                          check=False).returncode


def detect_gpus() -> list[str]:
  """GPU ids from CUDA_VISIBLE_DEVICES, else from `nvidia-smi -L`; [] when there are none."""
  visible = os.environ.get('CUDA_VISIBLE_DEVICES')
  if visible is not None:
    return [d for d in visible.split(',') if d.strip()]
  if not shutil.which('nvidia-smi'):
    return []
  listing = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, check=False)
  return [str(i) for i, line in enumerate(listing.stdout.splitlines()) if line.startswith('GPU')]


def device_groups(devices: list[str], parallel: int) -> list[list[str]]:
  """One device list per parallel slot: an even split when there are enough devices, else one
  device each, round-robin (several processes then share a device)."""
  if not devices:
    return [[] for _ in range(parallel)]
  if len(devices) >= parallel:
    return [devices[i::parallel] for i in range(parallel)]
  return [[devices[i % len(devices)]] for i in range(parallel)]


def run_local(sweep, workdir: str, parallel: int = 1, devices: list[str] | None = None,
              runner=subprocess_runner, log=print, extra_overrides=()) -> dict:
  """Runs every unfinished point; returns {'skipped', 'finished', 'failed'} lists of names."""
  os.makedirs(os.path.join(workdir, 'runs'), exist_ok=True)
  outcome = {'skipped': [], 'finished': [], 'failed': []}
  for name in collect(sweep, workdir, extra_overrides):
    log(f'{name}: finished earlier; row added to results.csv')
  pending = []
  for point in sweep.points:
    if read_summary(run_dir(workdir, point)):
      outcome['skipped'].append(point.name)
    else:
      pending.append(point)
  log(f'{len(outcome["skipped"])} points finished, {len(pending)} to run')
  slots = queue.Queue()
  for group in device_groups(devices if devices is not None else detect_gpus(), parallel):
    slots.put(group)

  def run_point(point):
    group = slots.get()
    try:
      env = dict(os.environ)
      if group:
        env['CUDA_VISIBLE_DEVICES'] = ','.join(group)
      command = train_command(sweep, point, workdir, extra_overrides=extra_overrides)
      log(f'{point.name}: starting' + (f' on devices {",".join(group)}' if group else ''))
      status = runner(command, run_dir(workdir, point), env)
    finally:
      slots.put(group)
    summary = read_summary(run_dir(workdir, point))
    if summary is None:
      log(f'{point.name}: failed (exit status {status}); see {run_dir(workdir, point)}/train.log')
      return point.name, False
    results_lib.add_row(results_path(workdir), result_row(sweep, point, summary, extra_overrides))
    log(f'{point.name}: finished, eval_loss={summary.get("eval_loss")}')
    return point.name, True

  pool = concurrent.futures.ThreadPoolExecutor(max_workers=parallel)
  try:
    for future in [pool.submit(run_point, p) for p in pending]:
      name, ok = future.result()
      outcome['finished' if ok else 'failed'].append(name)
  except BaseException:  # interrupted: start nothing new, let the running points end
    pool.shutdown(wait=True, cancel_futures=True)
    raise
  pool.shutdown()
  return outcome
