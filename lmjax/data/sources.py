"""Document sources: parsing `data.source`, listing documents, the held-out split, reading text.

A source is listed once up front into `DocRef`s (small tuples naming where a document lives), and
every document is checked while listing (readable, UTF-8, JSONL line parses and has the field), so a
bad input fails before training starts and skip mode can count exactly what it dropped. The text
itself is read again lazily, one document at a time, by the pipeline (`read_document`).

Source spec (`data.source`): `stdlib` | a glob of text files (`**` recursive) | a `.jsonl` path or
glob | record files as `lmjax.data.records` reads them (`.jsonl.gz`, `.jsonl.zst`, `.json` arrays,
`.parquet`, a Hugging Face `datasets` save_to_disk directory), whose `data.text_field` is the text;
a mixture is `SRC@WEIGHT,SRC@WEIGHT` (weight defaults to 1). Record files other than plain JSON
lines are read whole into memory once per process (`_record_texts`).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import logging
import os
import sysconfig
from typing import NamedTuple

from lmjax.data.jsonl import DataError, decode_line  # noqa: F401  (DataError re-exported)

_log = logging.getLogger(__name__)

STDLIB = 'stdlib'
_STDLIB_EXCLUDED_DIRS = frozenset({'site-packages', 'dist-packages', 'test', 'tests', 'idle_test',
                                   '__pycache__'})
_WARN_FIRST = 5


class DocRef(NamedTuple):
  """Where one document lives. `line` is 1-based for JSONL and 0 for whole-file documents."""
  source_index: int
  path: str
  line: int
  offset: int  # byte offset of the JSONL line or of a file's chunk; 0 for whole files
  key: str  # stable identity, hashed for the held-out split
  length: int = -1  # bytes of a file's chunk (a one-file source cut by position); -1 = all


@dataclasses.dataclass
class Source:
  """One component of `data.source`, listed and checked."""
  spec: str
  weight: float
  docs: list[DocRef]
  skipped: list[str]  # 'path[:line]: reason' of each skipped bad document


def parse_source_spec(spec: str) -> list[tuple[str, float]]:
  """'a.jsonl@1,stdlib@5' -> [('a.jsonl', 1.0), ('stdlib', 5.0)]."""
  parts = [p.strip() for p in spec.split(',') if p.strip()]
  if not parts:
    raise DataError('data.source: empty source')
  result = []
  for part in parts:
    name, weight = part, 1.0
    if '@' in part:
      head, tail = part.rsplit('@', 1)
      try:
        name, weight = head, float(tail)
      except ValueError:
        pass  # an '@' inside a path, not a weight
    if not weight > 0:
      raise DataError(f'data.source: weight of {name!r} must be positive; got {weight}')
    result.append((name, weight))
  return result


def unit_hash(key: str, salt: str = '') -> float:
  """A deterministic hash of `key` mapped to [0, 1)."""
  digest = hashlib.blake2b(f'{salt}\0{key}'.encode('utf-8'), digest_size=8).digest()
  return int.from_bytes(digest, 'big') / 2.0**64


def stdlib_paths() -> list[str]:
  """Sorted `*.py` files of the running interpreter's standard library, without tests."""
  root = sysconfig.get_paths()['stdlib']
  paths = []
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = [d for d in subdirs if d not in _STDLIB_EXCLUDED_DIRS]
    paths.extend(os.path.join(directory, f) for f in files if f.endswith('.py'))
  return sorted(paths)


def _glob_root(pattern: str) -> str:
  """The directory a source spec's paths are keyed relative to: the pattern's leading directories
  without a wildcard (a plain file's directory), so moving a dataset keeps its held-out split."""
  parts = os.path.expanduser(pattern).split(os.sep)
  first_wild = next((i for i, p in enumerate(parts) if any(c in p for c in '*?[')),
                    len(parts) - 1)
  root = os.sep.join(parts[:first_wild])
  return root or (os.sep if pattern.startswith(os.sep) else os.curdir)


def _glob_files(pattern: str) -> list[str]:
  paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                 if os.path.isfile(p))
  if not paths:
    raise DataError(f'data.source: {pattern!r} matches no files')
  return paths


def _read_text_file(path: str, offset: int = 0, length: int = -1) -> str:
  """`length` bytes of `path` from `offset` (all of it by default), decoded as UTF-8."""
  try:
    with open(path, 'rb') as f:
      f.seek(offset)
      data = f.read(length)
  except OSError as e:
    raise DataError(f'{path}: cannot read: {e.strerror or e}') from None
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError as e:
    raise DataError(f'{path}: not valid UTF-8 (byte {offset + e.start})') from None


def _jsonl_text(raw: bytes, path: str, line: int, text_field: str) -> str:
  where = f'{path}:{line}'
  record = decode_line(raw, where)
  if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
    raise DataError(f'{where}: no string field {text_field!r} (data.text_field)')
  return record[text_field]


def _list_jsonl(path, key, source_index, text_field, skip, skipped):
  """Yields a DocRef per non-blank line of one JSONL file (keyed `key:line`), checking each line."""
  try:
    f = open(path, 'rb')
  except OSError as e:
    raise DataError(f'{path}: cannot read: {e.strerror or e}') from None
  with f:
    offset = 0
    for line_no, raw in enumerate(f, start=1):
      start, offset = offset, offset + len(raw)
      if not raw.strip():
        continue
      try:
        _jsonl_text(raw, path, line_no, text_field)
      except DataError as e:
        if not skip:
          raise
        skipped.append(str(e))
        continue
      yield DocRef(source_index, path, line_no, start, f'{key}:{line_no}')


def _list_files(paths, source_index, key_fn, skip, skipped):
  for path in paths:
    try:
      _read_text_file(path)
    except DataError as e:
      if not skip:
        raise
      skipped.append(str(e))
      continue
    yield DocRef(source_index, path, 0, 0, key_fn(path))


_RECORD_SUFFIXES = ('.jsonl.gz', '.jsonl.zst', '.json', '.parquet', '.json.gz', '.json.zst')


def _is_record_source(name: str) -> bool:
  return name.lower().endswith(_RECORD_SUFFIXES) or os.path.isdir(os.path.expanduser(name))


@functools.lru_cache(maxsize=4)
def _record_texts(path: str, text_field: str) -> tuple:
  """((where, text or a DataError message), ...) of every record of a record file."""
  from lmjax.data.records import iter_records  # pylint: disable=g-import-not-at-top
  out = []
  for where, record in iter_records(path):
    ok = isinstance(record, dict) and isinstance(record.get(text_field), str)
    out.append((where, record[text_field] if ok else None))
  return tuple(out)


def _list_records(path, key, source_index, text_field, skip, skipped):
  """A DocRef per record of a record file (line = record number, offset -1)."""
  for i, (where, text) in enumerate(_record_texts(path, text_field), start=1):
    if text is None:
      error = f'{where}: no string field {text_field!r} (data.text_field)'
      if not skip:
        raise DataError(error)
      skipped.append(error)
      continue
    yield DocRef(source_index, path, i, -1, f'{key}:{i}')


def list_source(name: str, weight: float, source_index: int, text_field: str,
                skip: bool) -> Source:
  """Lists and checks every document of one source component."""
  skipped: list[str] = []
  if name == STDLIB:
    root = sysconfig.get_paths()['stdlib']
    docs = list(_list_files(stdlib_paths(), source_index, lambda p: os.path.relpath(p, root),
                            skip, skipped))
  elif _is_record_source(name):
    docs = []
    root = _glob_root(name)
    paths = [os.path.expanduser(name)] if os.path.isdir(os.path.expanduser(name)) else (
        _glob_files(name))
    for path in paths:
      docs.extend(_list_records(path, os.path.relpath(path, root), source_index, text_field,
                                skip, skipped))
  elif name.endswith('.jsonl'):
    docs = []
    root = _glob_root(name)
    for path in _glob_files(name):
      docs.extend(_list_jsonl(path, os.path.relpath(path, root), source_index, text_field, skip,
                              skipped))
  else:
    root = _glob_root(name)
    docs = list(_list_files(_glob_files(name), source_index, lambda p: os.path.relpath(p, root),
                            skip, skipped))
  if skipped:
    _log.warning('data.source %r: skipped %d bad documents (data.on_bad_input=skip), e.g.: %s',
                 name, len(skipped), '; '.join(skipped[:_WARN_FIRST]))
  if not docs:
    raise DataError(f'data.source: {name!r} has no usable documents'
                    + (f' ({len(skipped)} skipped)' if skipped else ''))
  return Source(name, weight, docs, skipped)


def load_sources(data_config) -> list[Source]:
  """Lists every component of `data_config.source`."""
  skip = data_config.on_bad_input == 'skip'
  return [list_source(name, weight, i, data_config.text_field, skip)
          for i, (name, weight) in enumerate(parse_source_spec(data_config.source))]


def skipped_count(sources: list[Source]) -> int:
  return sum(len(s.skipped) for s in sources)


def file_chunks(ref: DocRef, count: int) -> list[DocRef]:
  """A whole-file document cut by position into about `count` chunks, each ending at a newline
  (the file's end for the last): the documents of a one-file corpus."""
  try:
    size = os.path.getsize(ref.path)
    with open(ref.path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise DataError(f'{ref.path}: cannot read: {e.strerror or e}') from None
  chunks, start = [], 0
  for i in range(1, count + 1):
    end = size if i == count else data.find(b'\n', max(start, size * i // count)) + 1
    if end <= start:  # no newline left: the rest is one chunk
      end = size
    if end > start:
      chunks.append(ref._replace(offset=start, length=end - start, key=f'{ref.key}@{start}'))
    start = end
    if start >= size:
      break
  return chunks


def split_eval(docs: list[DocRef], fraction: float) -> tuple[list[DocRef], list[DocRef]]:
  """Splits into (train, eval) by a hash of each document's identity, not its position.

  With `fraction > 0` at least one document is held out. A source of one whole file is first cut
  by position into `max(2, round(1 / fraction))` chunks at line ends (`file_chunks`).
  """
  if fraction > 0 and len(docs) == 1 and docs[0].line == 0 and docs[0].length < 0:
    chunks = file_chunks(docs[0], max(2, round(1 / fraction)))
    docs = chunks if len(chunks) > 1 else docs
  if fraction <= 0 or len(docs) < 2:
    return list(docs), []
  hashes = [unit_hash(d.key, 'eval') for d in docs]
  held = [h < fraction for h in hashes]
  if not any(held):
    held[min(range(len(docs)), key=hashes.__getitem__)] = True
  train = [d for d, h in zip(docs, held) if not h]
  evals = [d for d, h in zip(docs, held) if h]
  return train, evals


def read_document(ref: DocRef, text_field: str) -> str:
  """The text of one document; raises DataError naming the file (and line)."""
  if ref.line == 0:  # a whole file, or a chunk of a one-file corpus
    return _read_text_file(ref.path, *((ref.offset, ref.length) if ref.length >= 0 else ()))
  if ref.offset < 0:
    return _record_texts(ref.path, text_field)[ref.line - 1][1]
  try:
    with open(ref.path, 'rb') as f:
      f.seek(ref.offset)
      raw = f.readline()
  except OSError as e:
    raise DataError(f'{ref.path}: cannot read: {e.strerror or e}') from None
  return _jsonl_text(raw, ref.path, ref.line, text_field)
