"""A wheel of the repository installs and trains on its own: every subpackage and the presets ship.

The wheel is built (offline, no build isolation) from a copy of the checkout, so that setuptools'
`build/` and `*.egg-info` never land in the working tree, installed with `--no-deps` into a fresh
venv that sees the system site-packages (jax, flax, ...), and `lmjax train --config=tiny` runs
from a directory outside the repository.

The repository is also installed editable in the system site-packages. Its `.pth` file appends
setuptools' editable finder to `sys.meta_path`, i.e. after the `PathFinder` that walks `sys.path`,
and the venv's site-packages precedes the system's on `sys.path`, so the wheel wins. The test
checks that rather than assuming it, and keeps the other ways the checkout could win out of the
subprocesses: no `PYTHONPATH`, no user site (`PYTHONNOUSERSITE`), a working directory outside
the repository.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = '''
import importlib.resources, json, sys, sysconfig
import lmjax, lmjax.config
presets = importlib.resources.files('lmjax.configs')
print(json.dumps({'lmjax': lmjax.__file__, 'config': lmjax.config.__file__,
                  'configs': str(presets), 'tiny': str(presets / 'tiny.py'),
                  'purelib': sysconfig.get_paths()['purelib'], 'prefix': sys.prefix}))
'''


def _env(tmp_path):
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONHOME')}
  env.update(PYTHONNOUSERSITE='1', LMJAX_CACHE_DIR=str(tmp_path / 'cache'),
             LMJAX_PEAK_FLOPS='1e11', JAX_PLATFORMS='cpu', PIP_NO_INDEX='1',
             PIP_DISABLE_PIP_VERSION_CHECK='1')
  return env


def _run(args, env, cwd, timeout=120):
  proc = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                        check=False)
  assert proc.returncode == 0, f'{args}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n' \
                               f'{proc.stderr[-3000:]}'
  return proc.stdout


def _inside(path, directory):
  path, directory = os.path.realpath(path), os.path.realpath(directory)
  return os.path.commonpath([path, directory]) == directory


def test_every_package_directory_has_an_init():
  """`packages = find:` skips a directory without `__init__.py`: the wheel would lack it."""
  missing = sorted(os.path.relpath(directory, ROOT)
                   for directory, dirs, files in os.walk(os.path.join(ROOT, 'lmjax'))
                   if any(f.endswith('.py') for f in files) and '__init__.py' not in files)
  assert not missing, f'no __init__.py in {", ".join(missing)}'


def test_wheel_installs_into_a_venv_and_trains_from_elsewhere(tmp_path):
  env = _env(tmp_path)
  source = tmp_path / 'src'
  shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
      '.git', 'build', 'dist', '*.egg-info', '__pycache__', '.pytest_cache', 'runs'))
  wheels = tmp_path / 'wheels'
  _run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '--no-index',
        '-w', str(wheels), '.'], env, cwd=source)
  (wheel,) = wheels.glob('lmjax-*.whl')
  names = set(zipfile.ZipFile(wheel).namelist())
  for name in ('lmjax/train/__init__.py', 'lmjax/train/loop.py', 'lmjax/parallel/__init__.py',
               'lmjax/parallel/sharding.py', 'lmjax/configs/__init__.py', 'lmjax/configs/tiny.py',
               'lmjax/configs/7b.py'):
    assert name in names, f'{name} is not in the wheel'

  venv = tmp_path / 'venv'
  _run([sys.executable, '-m', 'venv', '--system-site-packages', '--without-pip', str(venv)], env,
       cwd=tmp_path)
  python = str(venv / 'bin' / 'python')
  # the system's pip, run by the venv's python, installs into the venv; --ignore-installed: the
  # editable lmjax 0.1.0 in the system site-packages would otherwise count as already there
  _run([python, '-m', 'pip', 'install', '--no-deps', '--no-index', '--ignore-installed',
        str(wheel)], env, cwd=tmp_path)

  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  where = json.loads(_run([python, '-c', PROBE], env, cwd=elsewhere).strip().splitlines()[-1])
  assert _inside(where['prefix'], venv), where
  for key in ('lmjax', 'config', 'configs', 'tiny'):
    assert _inside(where[key], where['purelib']), (key, where)
    assert not _inside(where[key], ROOT), (key, where)
  assert os.path.isfile(where['tiny'])

  workdir = tmp_path / 'w'
  _run([str(venv / 'bin' / 'lmjax'), 'train', '--config=tiny', '--config.steps=3',
        '--config.log_every=1', '--config.optimizer.warmup_steps=1',  # tiny warms up for 5
        f'--workdir={workdir}', '--no_sample'], env, cwd=elsewhere,
       timeout=300)
  with open(workdir / 'metrics.jsonl', encoding='utf-8') as f:
    records = [json.loads(line) for line in f]
  train = [r for r in records if r.get('split') == 'train' and 'loss' in r]
  assert [r['step'] for r in train] == [1, 2, 3], records
  assert all(r['loss'] > 0 for r in train), train
