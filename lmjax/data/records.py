"""Records from files as people have them: JSON lines (plain, gzip, zstd), JSON arrays, Parquet and
Hugging Face `datasets` directories (`save_to_disk`).

  read_records(path, what) -> [(where, record)]   `where` names the record in errors: 'FILE:LINE'
                                                   (JSON lines), 'FILE:record N' (JSON arrays),
                                                   'FILE:row N' (Parquet, datasets)

The format comes from the name: `.parquet`; `.json` (one array of records); anything else is JSON
lines, `.gz` / `.zst` after it meaning compressed. The first bytes are checked against the name, so
a compressed file without its suffix, a Parquet file named `.jsonl` or a binary file is a one-line
`DataError`, as are a missing file, bad JSON and a file without records. Parquet and `datasets`
directories need the `[data]` extra (pyarrow, datasets; zstd: zstandard); without it the error
says what to install.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from typing import Any, Iterator

from lmjax.data.jsonl import DataError, decode_line

INSTALL_DATA = 'pip install -e ".[data]"'
_MAGIC = {b'\x1f\x8b': 'gzip', b'\x28\xb5\x2f\xfd': 'zstd', b'PAR1': 'parquet'}
_SUFFIX = {'gzip': '.gz', 'zstd': '.zst', 'parquet': '.parquet'}
_HF_MARKERS = ('dataset_dict.json', 'state.json', 'dataset_info.json')


def file_format(path: str) -> tuple[str, str]:
  """(format, compression) from the name: format jsonl | json | parquet | hf; compression
  '' | gzip | zstd."""
  if os.path.isdir(path):
    return 'hf', ''
  name = path.lower()
  compression = ''
  for suffix, kind in (('.gz', 'gzip'), ('.zst', 'zstd'), ('.zstd', 'zstd')):
    if name.endswith(suffix):
      name, compression = name[:-len(suffix)], kind
  if name.endswith('.parquet'):
    return 'parquet', compression
  if name.endswith('.json'):
    return 'json', compression
  return 'jsonl', compression


def missing_extra(path: str, module: str, what: str) -> DataError:
  return DataError(f'{path}: reading {what} needs the {module} package: {INSTALL_DATA}')


def _check_magic(path: str, fmt: str, compression: str) -> None:
  try:
    with open(path, 'rb') as f:
      head = f.read(4)
  except FileNotFoundError:
    raise DataError(f'{path}: no such file') from None
  except OSError as e:
    raise DataError(f'{path}: cannot read: {e.strerror or e}') from None
  actual = next((kind for magic, kind in _MAGIC.items() if head.startswith(magic)), '')
  expected = compression or ('parquet' if fmt == 'parquet' else '')
  if actual == expected:
    return
  if actual:
    raise DataError(f'{path}: the file is {actual} data but its name does not end in '
                    f'{_SUFFIX[actual]}; rename it (e.g. {path}{_SUFFIX[actual]})')
  raise DataError(f'{path}: the name says {expected} but the file is not {expected} data')


def _open_text(path: str, compression: str):
  """A binary line reader over the decompressed bytes."""
  if compression == 'gzip':
    return gzip.open(path, 'rb')
  if compression == 'zstd':
    try:
      import zstandard  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise missing_extra(path, 'zstandard', 'zstd files') from None
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, 'rb'),
                                                                        closefd=True))
  return open(path, 'rb')


def _check_binary(path: str, head: bytes) -> None:
  nul = head.find(b'\x00')
  if nul >= 0:
    raise DataError(f'{path}: a binary file (NUL byte at offset {nul}); expected JSON text')


def _jsonl(path: str, compression: str) -> Iterator[tuple[str, Any]]:
  with _open_text(path, compression) as f:
    first = True
    for line_no, raw in enumerate(f, start=1):
      if first:
        _check_binary(path, raw[:8192])
        first = False
      if raw.strip():
        where = f'{path}:{line_no}'
        yield where, decode_line(raw, where)


def _json_array(path: str, compression: str) -> Iterator[tuple[str, Any]]:
  with _open_text(path, compression) as f:
    data = f.read()
  _check_binary(path, data[:8192])
  try:
    value = json.loads(data.decode('utf-8'))
  except UnicodeDecodeError as e:
    raise DataError(f'{path}: not valid UTF-8 (byte {e.start})') from None
  except json.JSONDecodeError as e:
    raise DataError(f'{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})') from None
  if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
    value = next(iter(value.values()))  # {"data": [...]}
  if not isinstance(value, list):
    raise DataError(f'{path}: expected a JSON array of records (or JSON lines named .jsonl); '
                    f'got a {type(value).__name__}')
  for i, record in enumerate(value, start=1):
    yield f'{path}:record {i}', record


def _parquet(path: str) -> Iterator[tuple[str, Any]]:
  try:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise missing_extra(path, 'pyarrow', 'Parquet files') from None
  try:
    table = pq.read_table(path)
  except Exception as e:  # pyarrow raises ArrowInvalid / OSError on a bad file
    raise DataError(f'{path}: not a readable Parquet file ({str(e).splitlines()[0]})') from None
  for i, record in enumerate(table.to_pylist(), start=1):
    yield f'{path}:row {i}', record


def _hf_dir(path: str, split: str) -> Iterator[tuple[str, Any]]:
  if not any(os.path.isfile(os.path.join(path, m)) for m in _HF_MARKERS):
    raise DataError(f'{path}: a directory, but not a Hugging Face datasets save_to_disk directory '
                    f'(none of {", ".join(_HF_MARKERS)})')
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise missing_extra(path, 'datasets', 'Hugging Face datasets directories') from None
  try:
    ds = datasets.load_from_disk(path)
  except Exception as e:  # datasets raises several types on a bad directory
    raise DataError(f'{path}: cannot load the datasets directory ({str(e).splitlines()[0]})'
                    ) from None
  if isinstance(ds, datasets.DatasetDict):
    names = list(ds)
    name = split if split in ds else ('train' if 'train' in ds else names[0])
    ds, path = ds[name], f'{path}[{name}]'
  for i, record in enumerate(ds, start=1):
    yield f'{path}:row {i}', record


def iter_records(path: str, split: str = 'train') -> Iterator[tuple[str, Any]]:
  """(where, record) of every record of `path`, in order (see the module docstring). `split`:
  the split read from a `datasets` directory holding several (default train, else the first)."""
  fmt, compression = file_format(path)
  if fmt == 'hf':
    yield from _hf_dir(path, split)
    return
  _check_magic(path, fmt, compression)
  if fmt == 'parquet':
    yield from _parquet(path)
  elif fmt == 'json':
    yield from _json_array(path, compression)
  else:
    try:
      yield from _jsonl(path, compression)
    except (OSError, EOFError) as e:  # truncated or corrupt compressed data
      raise DataError(f'{path}: corrupt {compression or "file"} data ({e})') from None


def read_records(path: str, what: str | None = None, split: str = 'train') -> list:
  """[(where, record)] of `path`. `what` names the setting the path came from (e.g.
  'post.train_file'): an empty path, or a file without records, is then an error naming it."""
  if what is not None and not path:
    raise DataError(f'{what}: a data file is required for this task')
  records = list(iter_records(path, split))
  if what is not None and not records:
    raise DataError(f'{path}: holds no records ({what})')
  return records
