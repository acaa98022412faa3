"""The sweep's `results.csv`: one row per finished point, keyed by `name`.

Rows are added under an exclusive `fcntl` lock on `results.csv.lock`, by rewriting the whole table
to a temporary file and renaming it over the old one. A reader or a crash never sees half a table,
concurrent writers (parallel points, SLURM array tasks on a shared filesystem) never lose each
other's rows, and a row whose name is already present is not added again.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import os
import tempfile

import numpy as np

REQUIRED_COLUMNS = ('name', 'overrides', 'params', 'non_embedding_params', 'flops', 'tokens',
                    'train_loss', 'eval_loss', 'wall_seconds')


@contextlib.contextmanager
def locked(path: str):
  with open(path + '.lock', 'a') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def read_rows(path: str) -> list[dict[str, str]]:
  if not os.path.exists(path):
    return []
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def _write_rows(path: str, rows: list[dict]) -> None:
  columns = list(REQUIRED_COLUMNS)
  for row in rows:
    columns.extend(k for k in row if k not in columns)
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.results.', suffix='.csv')
  try:
    with os.fdopen(fd, 'w', newline='') as f:
      writer = csv.DictWriter(f, fieldnames=columns, restval='')
      writer.writeheader()
      writer.writerows(rows)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def add_row(path: str, row: dict) -> bool:
  """Adds `row` unless a row with its name exists; returns whether it was added."""
  missing = [c for c in ('name',) if c not in row]
  if missing:
    raise ValueError(f'a results row needs a {missing[0]!r}')
  with locked(path):
    rows = read_rows(path)
    if any(r['name'] == row['name'] for r in rows):
      return False
    _write_rows(path, rows + [row])
    return True


def numeric_column(rows: list[dict[str, str]], column: str) -> np.ndarray:
  """A column as floats, NaN where empty or missing."""
  values = []
  for row in rows:
    text = (row.get(column) or '').strip()
    try:
      values.append(float(text))
    except ValueError:
      values.append(np.nan)
  return np.array(values, dtype=float)
