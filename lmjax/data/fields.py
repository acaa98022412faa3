"""Field mapping: reading records whose fields are named differently from what lmjax expects.

One mechanism for every kind of record (SFT, preference, KTO, eval data). A mapping is a string of
comma-separated `NAME=SOURCE` entries, e.g. `post.fields='prompt=question,chosen=answer_a'`:
  NAME    a field lmjax reads (the task says which: `SFT_FIELDS`, `PREFERENCE_FIELDS`, ...)
  SOURCE  the record's own field; a dotted path reaches into nested objects and lists
          (`meta.question`, `answers.0.text`)
Names that the mapping does not mention are read under their own name. Typical use:

    fmap = FieldMap.parse(config.post.fields, PREFERENCE_FIELDS, key='post.fields')
    record = fmap.apply(raw_record)          # canonical names; DataError if a SOURCE is missing
    text = require_str(record, 'prompt', fmap)

Errors: a malformed mapping is a `ConfigError` naming the key; a record without a mapped field is a
`DataError` naming the field (the caller prefixes the file and line).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from lmjax.config import ConfigError
from lmjax.data.jsonl import DataError

SFT_FIELDS = ('prompt', 'response', 'completion', 'messages', 'text')
PREFERENCE_FIELDS = ('prompt', 'chosen', 'rejected', 'messages', 'completion', 'label')
PROMPT_FIELDS = ('prompt', 'messages')  # PPO / GRPO prompt files
CHOICE_FIELDS = ('context', 'choices', 'label')  # multiple-choice eval data


@dataclasses.dataclass(frozen=True)
class FieldMap:
  """NAME -> SOURCE pairs (hashable); `FieldMap()` reads every field under its own name."""
  pairs: tuple[tuple[str, str], ...] = ()
  key: str = 'post.fields'  # the config key the mapping came from, for messages

  @classmethod
  def parse(cls, spec: str, names: Iterable[str], key: str = 'post.fields') -> 'FieldMap':
    """'prompt=question,chosen=better' -> FieldMap; `names`: the NAMEs allowed. A malformed entry,
    an unknown NAME or a NAME given twice is a ConfigError naming `key`."""
    names = tuple(names)
    pairs = []
    for entry in (e.strip() for e in (spec or '').split(',')):
      if not entry:
        continue
      name, eq, source = (s.strip() for s in entry.partition('='))
      if not eq or not name or not source:
        raise ConfigError(f'{key}: expected NAME=SOURCE entries separated by commas; got '
                          f'{entry!r}')
      if name not in names:
        raise ConfigError(f'{key}: unknown field {name!r} in {entry!r}; expected one of '
                          f'{", ".join(names)}')
      if any(name == n for n, _ in pairs):
        raise ConfigError(f'{key}: field {name!r} is mapped twice')
      pairs.append((name, source))
    return cls(tuple(pairs), key)

  def source(self, name: str) -> str:
    """The record field that NAME is read from."""
    return dict(self.pairs).get(name, name)

  def describe(self, name: str) -> str:
    """'prompt', or 'question' (post.fields prompt=question) for a mapped name: for messages."""
    source = self.source(name)
    return repr(name) if source == name else f'{source!r} ({self.key} {name}={source})'

  def apply(self, record: Any) -> dict:
    """The record with each mapped NAME set from its SOURCE (the record is not modified). A record
    that is not an object, or lacks a mapped SOURCE, is a DataError."""
    if not isinstance(record, dict):
      raise DataError(f'expected a JSON object (a record with named fields); got '
                      f'{type(record).__name__}')
    if not self.pairs:
      return record
    out = dict(record)
    for name, source in self.pairs:
      value = lookup(record, source)
      if value is _MISSING:
        raise DataError(f'no field {self.describe(name)}; the record has {_keys(record)}')
      out[name] = value
    return out


_MISSING = object()


def lookup(record: Any, path: str) -> Any:
  """The value at a dotted `path` (object keys and list indices), or `_MISSING`."""
  value = record
  for part in path.split('.'):
    if isinstance(value, dict) and part in value:
      value = value[part]
    elif isinstance(value, list) and part.lstrip('-').isdigit() and -len(value) <= int(part) < len(
        value):
      value = value[int(part)]
    else:
      return _MISSING
  return value


def _keys(record: dict) -> str:
  keys = sorted(map(str, record))
  return 'fields ' + ', '.join(keys[:12]) + (' ...' if len(keys) > 12 else '') if keys else (
      'no fields')


def require_str(record: dict, name: str, fmap: FieldMap = FieldMap()) -> str:
  """record[name] as a string; a missing field or another type is a DataError naming the field."""
  if name not in record:
    raise DataError(f'no field {fmap.describe(name)}; the record has {_keys(record)}')
  value = record[name]
  if not isinstance(value, str):
    raise DataError(f'field {fmap.describe(name)}: expected a string; got '
                    f'{type(value).__name__}')
  return value


def require_messages(record: dict, name: str = 'messages',
                     fmap: FieldMap = FieldMap()) -> list[dict]:
  """record[name] as a chat: a list of {'role': str, 'content': str}; else a DataError."""
  messages = record.get(name)
  if not isinstance(messages, list) or not messages:
    raise DataError(f'field {fmap.describe(name)}: expected a non-empty list of '
                    '{"role", "content"} messages; got '
                    f'{type(messages).__name__ if name in record else "nothing"}')
  for i, m in enumerate(messages):
    if not (isinstance(m, dict) and isinstance(m.get('role'), str)
            and isinstance(m.get('content'), str)):
      raise DataError(f'field {fmap.describe(name)}[{i}]: expected {{"role": str, "content": '
                      f'str}}; got {str(m)[:60]!r}')
  return messages
