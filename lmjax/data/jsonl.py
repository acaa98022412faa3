"""Reading and writing JSONL files: one JSON value per line, blank lines skipped.

Every problem is a `DataError` naming the file and, for a bad line, the line: `path:line: ...`.
"""

from __future__ import annotations

import json
from typing import Callable



class DataError(ValueError):
  """Bad input data; the message names the file (and the line, for JSONL)."""


def decode_line(raw: bytes, where: str):
  """One JSONL line's value; `where` ('path:line') heads the error."""
  try:
    return json.loads(raw.decode('utf-8'))
  except UnicodeDecodeError as e:
    raise DataError(f'{where}: not valid UTF-8 (byte {e.start})') from None
  except json.JSONDecodeError as e:
    raise DataError(f'{where}: not valid JSON ({e.msg})') from None


def read_jsonl(path: str, field: str | None = None, encode: Callable | None = None,
               what: str | None = None) -> list:
  """The records of a JSONL file, in order.

  `field`: each record must be an object with this string field, and that string is returned in
  its place. `encode(record)`: applied to each record; a DataError it raises is reported at the
  record's line. `what` names the setting the path came from (e.g. 'post.train_file'): an empty
  path, or a file without records, is then an error that names it.
  """
  if what is not None and not path:
    raise DataError(f'{what}: a JSONL file is required for this task')
  records = []
  try:
    f = open(path, 'rb')
  except OSError as e:
    raise DataError(f'{(what + ": ") if what else ""}{path}: cannot read: '
                    f'{e.strerror or e}') from None
  with f:
    for line_no, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      where = f'{path}:{line_no}'
      record = decode_line(raw, where)
      if field is not None:
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
          raise DataError(f'{where}: no string field {field!r}')
        record = record[field]
      if encode is not None:
        try:
          record = encode(record)
        except DataError as e:
          raise DataError(f'{where}: {e}') from None
      records.append(record)
  if what is not None and not records:
    raise DataError(f'{what}: {path!r} holds no examples')
  return records


def write_jsonl(path: str, records: list) -> None:
  """One JSON value per line (non-ASCII characters written as they are)."""
  with open(path, 'w', encoding='utf-8') as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + '\n')
