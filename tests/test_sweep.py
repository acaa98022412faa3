"""Sweep definitions, the resumable local runner, results.csv and cluster dry runs."""

import os
import subprocess
import sys
import threading

import pytest

from lmjax.commands import sweep as sweep_command
from lmjax.scaling import results, runner
from lmjax.scaling import sweep as sweep_lib
from tests.test_scaling_flops import run_command

CONFIG = '''from lmjax.config import base_config
def get_config():
  c = base_config()
  c.steps, c.batch_size, c.seq_len = 10, 2, 16
  c.model.vocab_size, c.model.num_layers, c.model.d_model = 64, 1, 32
  c.model.num_heads = c.model.num_kv_heads = 2
  c.model.mlp_dim = 64
  c.optimizer.warmup_steps = 2
  return c
'''
SWEEP = '''from lmjax.scaling.sweep import Sweep, grid
def get_sweep():
  return Sweep(config='small.py', overrides=('log_every=1',),
               points=grid({'optimizer.learning_rate': [1e-3, 3e-3], 'model.d_model': [32, 64]},
                           seeds=(0, 1)))
'''


@pytest.fixture
def sweep_file(tmp_path):
  (tmp_path / 'small.py').write_text(CONFIG)
  (tmp_path / 'sweep.py').write_text(SWEEP)
  return str(tmp_path / 'sweep.py')


class FakeTrain:
  """Stands in for `lmjax train`: 'trains' 10 steps, checkpointing each; a point in `kill_at`
  dies (exit -9) at that step on its first run; a point in `interrupt` stops the whole sweep."""

  def __init__(self, kill_at=None, interrupt=()):
    self.kill_at, self.interrupt = dict(kill_at or {}), set(interrupt)
    self.calls, self.resumed_from, self.envs = [], {}, {}
    self.lock = threading.Lock()

  def __call__(self, command, directory, env):
    name = os.path.basename(directory)
    with self.lock:
      self.calls.append(name)
      self.envs[name] = env.get('CUDA_VISIBLE_DEVICES')
    if name in self.interrupt:
      self.interrupt.discard(name)
      raise KeyboardInterrupt
    os.makedirs(directory, exist_ok=True)
    checkpoint = os.path.join(directory, 'checkpoint')
    step = int(open(checkpoint).read()) if os.path.exists(checkpoint) else 0
    self.resumed_from[name] = step
    while step < 10:
      step += 1
      with open(checkpoint, 'w') as f:
        f.write(str(step))
      if self.kill_at.get(name) == step:
        del self.kill_at[name]
        return -9
    with open(os.path.join(directory, 'summary.json'), 'w') as f:
      f.write('{"step": 10, "train_loss": 2.5, "eval_loss": 2.75, "tokens": 320, '
              '"wall_seconds": 1.0, "finished": true}')
    return 0


def test_grid_times_seeds_expands_to_every_combination():
  points = sweep_lib.grid({'optimizer.learning_rate': [1e-3, 3e-3, 1e-2], 'model.d_model': [64, 128]},
                          seeds=(0, 1))
  assert len(points) == 12 and len({p.name for p in points}) == 12
  combos = {tuple(p.overrides) for p in points}
  assert ('optimizer.learning_rate=0.003', 'model.d_model=128', 'seed=1') in combos
  assert points[0].name == 'learning_rate=0.001_d_model=64_seed=0'
  sampled = sweep_lib.random_search({'optimizer.learning_rate': (1e-4, 1e-2), 'model.num_layers': [1, 2]},
                                    num_points=5, seeds=(0, 1, 2))
  assert len(sampled) == 15
  assert all(1e-4 <= dict(p.info)['optimizer.learning_rate'] <= 1e-2 for p in sampled)
  with pytest.raises(ValueError, match='unique'):
    sweep_lib.Sweep(config='x', points=points + points[:1])


def test_resume_skips_finished_and_reruns_killed_points(sweep_file, tmp_path):
  sweep = sweep_lib.load_sweep(sweep_file)
  workdir = str(tmp_path / 'work')
  names = [p.name for p in sweep.points]
  fake = FakeTrain(kill_at={names[1]: 4, names[5]: 7})
  outcome = runner.run_local(sweep, workdir, runner=fake, log=lambda *_: None)
  assert sorted(outcome['failed']) == sorted([names[1], names[5]])
  assert len(outcome['finished']) == 6
  again = FakeTrain()
  outcome = runner.run_local(sweep, workdir, runner=again, log=lambda *_: None)
  assert sorted(again.calls) == sorted([names[1], names[5]])  # only the unfinished ones
  assert again.resumed_from == {names[1]: 4, names[5]: 7}  # from their checkpoints
  assert len(outcome['skipped']) == 6 and not outcome['failed']
  rows = results.read_rows(runner.results_path(workdir))
  assert sorted(r['name'] for r in rows) == sorted(names)
  row = next(r for r in rows if r['name'] == names[0])
  assert float(row['eval_loss']) == 2.75 and int(row['tokens']) == 320
  assert int(row['params']) > int(row['non_embedding_params']) > 0
  assert row['overrides'] == ' '.join(sweep.points[0].overrides)
  third = FakeTrain()
  runner.run_local(sweep, workdir, runner=third, log=lambda *_: None)
  assert not third.calls


def test_interrupted_sweep_loses_and_duplicates_no_rows(sweep_file, tmp_path):
  sweep = sweep_lib.load_sweep(sweep_file)
  workdir = str(tmp_path / 'work')
  names = [p.name for p in sweep.points]
  with pytest.raises(KeyboardInterrupt):
    runner.run_local(sweep, workdir, parallel=2, runner=FakeTrain(interrupt=[names[4]]),
                     log=lambda *_: None)
  # A point that finished but whose row was never written (killed in between) is collected.
  done = [n for n in names if runner.read_summary(os.path.join(workdir, 'runs', n))]
  assert 0 < len(done) < len(names)
  lost = done[0]
  kept = [r for r in results.read_rows(runner.results_path(workdir)) if r['name'] != lost]
  results._write_rows(runner.results_path(workdir), kept)  # pylint: disable=protected-access
  fake = FakeTrain()
  runner.run_local(sweep, workdir, parallel=3, devices=['0', '1', '2'], runner=fake,
                   log=lambda *_: None)
  assert not set(fake.calls) & set(done)
  assert set(fake.envs.values()) <= {'0', '1', '2'}
  rows = [r['name'] for r in results.read_rows(runner.results_path(workdir))]
  assert sorted(rows) == sorted(names)


ADD_ROWS = """
import sys
from lmjax.scaling import results
path, worker = sys.argv[1], sys.argv[2]
for i in range(12):
  results.add_row(path, {'name': f'shared{i}', 'eval_loss': worker})
  results.add_row(path, {'name': f'own{worker}_{i}', 'eval_loss': worker})
"""


def test_concurrent_writers_neither_lose_nor_duplicate_rows(tmp_path):
  path = str(tmp_path / 'results.csv')
  writers = [subprocess.Popen([sys.executable, '-c', ADD_ROWS, path, str(w)]) for w in range(4)]
  assert all(w.wait() == 0 for w in writers)
  names = [r['name'] for r in results.read_rows(path)]
  assert len(names) == len(set(names)) == 12 + 4 * 12
  assert list(results.read_rows(path)[0])[:len(results.REQUIRED_COLUMNS)] == list(
      results.REQUIRED_COLUMNS)


def test_device_groups():
  assert runner.device_groups(['0', '1', '2', '3'], 2) == [['0', '2'], ['1', '3']]
  assert runner.device_groups(['0', '1'], 3) == [['0'], ['1'], ['0']]
  assert runner.device_groups([], 2) == [[], []]


def test_dry_runs_print_every_points_command(sweep_file, tmp_path, capsys):
  sweep = sweep_lib.load_sweep(sweep_file)
  workdir = str(tmp_path / 'work')
  for scheduler in (['--scheduler=local'], ['--scheduler=slurm', '--parallel=2',
                                             '--sbatch=--gres=gpu:1'],
                    ['--scheduler=gcloud', '--tpu=my-tpu', '--zone=us-central2-b']):
    assert run_command(sweep_command, [sweep_file, f'--workdir={workdir}', '--dry_run']
                       + scheduler) == 0
    out = capsys.readouterr().out
    for point in sweep.points:
      assert f'--workdir={workdir}/runs/{point.name}' in out
      assert ' '.join(f'--config.{o}' for o in point.overrides) in out
    if 'slurm' in scheduler[0]:
      assert '#SBATCH --array=0-7%2' in out and '#SBATCH --gres=gpu:1' in out
      assert 'sbatch' in out and '--collect' in out
    if 'gcloud' in scheduler[0]:
      assert out.count('gcloud compute tpus tpu-vm ssh my-tpu') == 8
      assert '--worker=all' in out
  assert not os.path.exists(workdir)


def test_experiment_files_load():
  root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'experiments')
  iso = sweep_lib.load_sweep(os.path.join(root, 'isoflop_tiny.py'))
  assert len({dict(p.info)['budget'] for p in iso.points}) == 3 and len(iso.points) >= 12
  ablation = sweep_lib.load_sweep(os.path.join(root, 'ablation_lr.py'))
  assert len(ablation.points) == 8
  for sweep in (iso, ablation):
    for point in sweep.points:
      sweep_lib.point_config(sweep, point)


E2E_SWEEP = '''from lmjax.scaling.sweep import Sweep, grid
def get_sweep():
  return Sweep(config='tiny', points=grid({'optimizer.learning_rate': [1e-3, 3e-3]}, seeds=None),
               overrides=('steps=6', 'batch_size=2', 'seq_len=32', 'optimizer.warmup_steps=1',
                          'eval_every=3', 'eval_batches=1', 'checkpoint_every=2', 'log_every=1',
                          'progress_bar=False', 'model.num_layers=1'))
'''


def test_end_to_end_sweep_of_real_training(tmp_path, capsys):
  """Two tiny points through real `lmjax train` processes, side by side; a rerun skips both."""
  path = tmp_path / 'e2e.py'
  path.write_text(E2E_SWEEP)
  workdir = str(tmp_path / 'work')
  argv = [str(path), f'--workdir={workdir}', '--parallel=2', '--devices=']
  assert run_command(sweep_command, argv) == 0, capsys.readouterr().out
  assert '2 finished now' in capsys.readouterr().out
  rows = results.read_rows(runner.results_path(workdir))
  assert sorted(r['name'] for r in rows) == ['learning_rate=0.001', 'learning_rate=0.003']
  for row in rows:
    assert int(row['tokens']) == 6 * 2 * 32 and float(row['eval_loss']) > 0
    assert float(row['flops']) == pytest.approx(int(row['tokens']) * float(row['flops_per_token']))
  assert run_command(sweep_command, argv) == 0
  assert '0 finished now, 2 earlier' in capsys.readouterr().out
  assert len(results.read_rows(runner.results_path(workdir))) == 2
