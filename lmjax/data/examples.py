"""Post-training records as token pieces, truncation in TRL's order, and the count of what happened.

Every SFT, preference or KTO record becomes a prompt (context, `[bos]` first, never trained on) and
one or two responses, each `(tokens, mask)` (mask 1 = trained on). The shapes accepted (names after
`post.fields`, see `lmjax.data.fields`):
  SFT         prompt + response (or completion) | messages (loss on assistant turns) | text (all of
              it trained on)
  preference  prompt + chosen + rejected (strings) | messages (context) + chosen + rejected |
              chosen + rejected only: the prompt is their longest shared prefix at a turn boundary
              (HH-RLHF's "\\n\\nHuman: ... \\n\\nAssistant: ...") | chosen + rejected as message
              lists (the prompt is their shared leading messages, or `prompt`)
  KTO         prompt (or messages) + completion + label (true = desirable)
Messages are rendered by `lmjax.data.chat` (the model's own chat template, or lmjax's).

Truncation (`truncate`), for a row of `row_len` tokens: nothing is cut from an example that fits.
Otherwise, first the prompt is cut from the left to `post.max_prompt_length` tokens (0 = half a row;
`[bos]` stays), then each response that still does not fit is cut at its end. A pair whose chosen
and rejected responses are then identical, or an example with no trained token left, is dropped.
`Report` counts every record: kept, prompt cut, response cut, dropped (and why), skipped as bad.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from lmjax.data import chat, fields
from lmjax.data.jsonl import DataError

_log = logging.getLogger(__name__)
TURN_MARKERS = ('\n\nAssistant:', '\nAssistant:', 'Assistant:', '\n\nassistant:')


def implicit_prompt(chosen: str, rejected: str) -> str:
  """The longest shared prefix of two dialogues that ends at a turn boundary: just after the last
  assistant marker (HH-RLHF) in it, else at its last whitespace; '' if none."""
  n = 0
  limit = min(len(chosen), len(rejected))
  while n < limit and chosen[n] == rejected[n]:
    n += 1
  shared = chosen[:n]
  if n == len(chosen) == len(rejected):
    shared = shared[:max(0, n - 1)]  # identical texts: leave a reply to compare
  ends = [shared.rfind(m) + len(m) for m in TURN_MARKERS if m in shared]
  if ends:
    return shared[:max(ends)]
  cut = max(shared.rfind(' '), shared.rfind('\n'))
  return shared[:cut + 1] if cut >= 0 else ''


def _shared_messages(a: list, b: list) -> int:
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return n


@dataclasses.dataclass
class Encoder:
  """Turns records into token pieces for one tokenizer, field mapping and chat template."""
  tok: object
  fmap: fields.FieldMap = fields.FieldMap()
  template: str = ''  # Jinja source; '' = lmjax's default

  def _text(self, text: str) -> list[int]:
    return self.tok.encode(text)

  def _chat(self, messages, split_at: int):
    """(prompt tokens, response tokens, mask): messages[:split_at] are the prompt; the rest's
    assistant parts are trained on (their generation-prompt headers are context)."""
    prompt, response, mask = [], [], []
    for index, seg, assistant in chat.encode_chat(self.tok, messages, self.template):
      if index < split_at:
        prompt += seg
      else:
        response += seg
        mask += [int(assistant)] * len(seg)
    while response and not mask[0]:  # leading context (headers) belongs to the prompt
      prompt.append(response.pop(0))
      mask.pop(0)
    return prompt, response, mask

  def _reply(self, prompt, reply: str):
    """(prompt tokens, (reply tokens + eos, mask)) for a string prompt or context messages."""
    if isinstance(prompt, list):
      p, r, m = self._chat(prompt + [{'role': 'assistant', 'content': reply}], len(prompt))
      return p, (r, m)
    r = self._text(reply) + [self.tok.eos_id]
    return [self.tok.bos_id] + self._text(prompt), (r, [1] * len(r))

  def prompt(self, record) -> list[int]:
    """The tokens a policy continues (PPO / GRPO): `[bos] prompt`, or the rendered `messages`
    up to and including the assistant's generation header."""
    record = self.fmap.apply(record)
    prompt = self._prompt(record)
    if isinstance(prompt, list):
      return self._chat(prompt + [{'role': 'assistant', 'content': ''}], len(prompt))[0]
    return [self.tok.bos_id] + self._text(prompt)

  def _prompt(self, record: dict):
    if 'messages' in record:
      return fields.require_messages(record, 'messages', self.fmap)
    return fields.require_str(record, 'prompt', self.fmap)

  def sft(self, record) -> tuple[list[int], list[tuple[list[int], list[int]]]]:
    record = self.fmap.apply(record)
    if 'messages' in record:
      messages = fields.require_messages(record, 'messages', self.fmap)
      if not any(m['role'] == 'assistant' for m in messages):
        raise DataError(f'field {self.fmap.describe("messages")}: no assistant turn to train on')
      first = next(i for i, m in enumerate(messages) if m['role'] == 'assistant')
      p, r, m = self._chat(messages, first)
      return p, [(r, m)]
    if 'prompt' in record or 'response' in record or 'completion' in record:
      name = 'response' if 'response' in record or 'completion' not in record else 'completion'
      prompt = fields.require_str(record, 'prompt', self.fmap)
      p, reply = self._reply(prompt, fields.require_str(record, name, self.fmap))
      return p, [reply]
    if 'text' in record:
      r = self._text(fields.require_str(record, 'text', self.fmap)) + [self.tok.eos_id]
      return [self.tok.bos_id], [(r, [1] * len(r))]
    raise DataError('expected prompt + response, messages or text (post.fields maps other names); '
                    f'the record has fields {", ".join(sorted(map(str, record)))}')

  def pair(self, record) -> tuple[list[int], list[tuple[list[int], list[int]]]]:
    """(prompt tokens, [(chosen, mask), (rejected, mask)])."""
    record = self.fmap.apply(record)
    for side in ('chosen', 'rejected'):
      if side not in record:
        raise DataError(f'no field {self.fmap.describe(side)}; a preference record needs chosen '
                        f'and rejected (the record has fields '
                        f'{", ".join(sorted(map(str, record)))})')
    chosen, rejected = record['chosen'], record['rejected']
    if isinstance(chosen, list) or isinstance(rejected, list):
      sides = [fields.require_messages(record, s, self.fmap) for s in ('chosen', 'rejected')]
      prompt = record.get('prompt', record.get('messages'))
      if isinstance(prompt, str):
        prompt = [{'role': 'user', 'content': prompt}]
      if prompt is None:
        k = _shared_messages(*sides)
        while k and sides[0][k - 1]['role'] == 'assistant':
          k -= 1  # the compared reply starts at an assistant turn
        prompt, sides = sides[0][:k], [s[k:] for s in sides]
      out = [self._chat(list(prompt) + list(s), len(prompt)) for s in sides]
      return out[0][0], [(r, m) for _, r, m in out]
    chosen = fields.require_str(record, 'chosen', self.fmap)
    rejected = fields.require_str(record, 'rejected', self.fmap)
    if 'prompt' in record or 'messages' in record:
      prompt = self._prompt(record)
    else:  # implicit prompt: full dialogues
      prompt = implicit_prompt(chosen, rejected)
      chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
    p, c = self._reply(prompt, chosen)
    _, r = self._reply(prompt, rejected)
    return p, [c, r]

  def unpaired(self, record) -> tuple[list[int], list[tuple[list[int], list[int]]], bool]:
    record = self.fmap.apply(record)
    label = record.get('label')
    if not isinstance(label, bool):
      raise DataError(f'field {self.fmap.describe("label")}: expected true (desirable) or false '
                      f'(undesirable); got {label!r}')
    p, reply = self._reply(self._prompt(record),
                           fields.require_str(record, 'completion', self.fmap))
    return p, [reply], label


def make_encoder(config, tok) -> Encoder:
  """The encoder of `config.post` (field mapping, chat template) for this tokenizer."""
  names = tuple(dict.fromkeys(fields.SFT_FIELDS + fields.PREFERENCE_FIELDS))
  fmap = fields.FieldMap.parse(config.post.fields, names, key='post.fields')
  return Encoder(tok, fmap, chat.template_text(config.post.chat_template, tok))


def max_prompt(config) -> int:
  row_len = config.seq_len + 1
  return config.post.max_prompt_length or row_len // 2


def truncate(prompt, responses, row_len: int, max_prompt_length: int):
  """(prompt, responses, prompt_cut, response_cut, drop_reason), cut in TRL's order (module
  docstring)."""
  longest = max(len(r) for r, _ in responses)
  prompt_cut = response_cut = False
  if len(prompt) + longest > row_len and len(prompt) > max_prompt_length:
    keep = max(max_prompt_length - 1, 0)
    prompt = prompt[:1] + (prompt[len(prompt) - keep:] if keep else [])
    prompt_cut = True
  room = row_len - len(prompt)
  out = []
  for tokens, mask in responses:
    if len(tokens) > room:
      tokens, mask, response_cut = tokens[:max(room, 0)], mask[:max(room, 0)], True
    out.append((tokens, mask))
  reason = ''
  if any(not any(mask) for _, mask in out):
    reason = 'response cut to nothing' if response_cut else 'no trained token'
  elif len(out) == 2 and out[0][0] == out[1][0]:
    reason = ('chosen = rejected after truncation' if response_cut
              else 'chosen and rejected identical')
  return prompt, out, prompt_cut, response_cut, reason


@dataclasses.dataclass
class Report:
  """What happened to each record of one file."""
  path: str
  records: int = 0
  kept: int = 0
  prompt_cut: int = 0
  response_cut: int = 0
  dropped: dict = dataclasses.field(default_factory=dict)  # reason -> count
  skipped: int = 0  # bad records skipped (data.on_bad_input=skip)
  first_skipped: str = ''

  def as_metrics(self, prefix: str = 'data/') -> dict:
    out = {'records': self.records, 'kept': self.kept, 'prompt_cut': self.prompt_cut,
           'response_cut': self.response_cut, 'dropped': sum(self.dropped.values()),
           'skipped': self.skipped}
    out.update({'dropped_' + k.replace(' ', '_').replace('=', 'eq'): v
                for k, v in self.dropped.items()})
    return {prefix + k: v for k, v in out.items()}

  def line(self) -> str:
    dropped = ', '.join(f'{n} ({why})' for why, n in sorted(self.dropped.items())) or '0'
    text = (f'{os.path.basename(self.path)}: {self.records} records, {self.kept} kept '
            f'({self.prompt_cut} prompts cut from the left, {self.response_cut} with a response '
            f'cut at the end); dropped {dropped}; skipped {self.skipped} bad records')
    return text + (f' (first: {self.first_skipped})' if self.skipped else '')


def encode_file(path: str, encode, row_len: int, max_prompt_length: int, skip_bad: bool = False,
                what: str = 'post.train_file', records=None):
  """[(prompt, responses, *extra)] of the usable records of `path` and their `Report`. `encode`
  (record) -> (prompt, responses, *extra); a DataError it raises names the record's place, or,
  with `skip_bad`, counts the record as skipped. `records`: already read [(where, record)]."""
  from lmjax.data.records import read_records  # pylint: disable=g-import-not-at-top
  if records is None:
    records = read_records(path, what)
  report = Report(path, records=len(records))
  out = []
  for where, record in records:
    try:
      prompt, responses, *extra = encode(record)
    except DataError as e:
      if not skip_bad:
        raise DataError(f'{where}: {e}') from None
      report.skipped += 1
      report.first_skipped = report.first_skipped or f'{where}: {e}'
      continue
    prompt, responses, prompt_cut, response_cut, reason = truncate(prompt, responses, row_len,
                                                                    max_prompt_length)
    if reason:
      report.dropped[reason] = report.dropped.get(reason, 0) + 1
      continue
    report.kept += 1
    report.prompt_cut += prompt_cut
    report.response_cut += response_cut
    out.append((prompt, responses, *extra))
  if not out:
    raise DataError(f'{path}: no usable examples ({report.line()})')
  _log.info('%s', report.line())
  return out, report


_CACHE: dict = {}  # the last file read, so make_iterator and make_eval_batches read it once


def _held_out_key(record) -> str:
  import json  # pylint: disable=g-import-not-at-top
  return json.dumps(record, sort_keys=True, default=str)


def split_records(records: list, fraction: float) -> tuple[list, list]:
  """(train, held out): the floor(fraction x records) records of lowest content hash are held out
  (none of a file under 1 / fraction records), the rest keep their order."""
  from lmjax.data.sources import unit_hash  # pylint: disable=g-import-not-at-top
  count = int(len(records) * fraction)
  if count < 1:
    return records, []
  hashes = [unit_hash(_held_out_key(r), 'post.eval') for _, r in records]
  held = set(sorted(range(len(records)), key=hashes.__getitem__)[:count])
  return ([r for i, r in enumerate(records) if i not in held],
          [r for i, r in enumerate(records) if i in held])


def load_examples(config, tok, encode) -> dict:
  """{'train': examples, 'eval': examples, 'train_report', 'eval_report', 'eval_source'} of
  `post.train_file` (and `post.eval_file`, or the held-out `post.eval_fraction` of train_file when
  `eval_batches` > 0); `encode(record)` as in `encode_file`."""
  from lmjax.data.records import read_records  # pylint: disable=g-import-not-at-top
  post = config.post
  key = (post.train_file, post.eval_file, post.eval_fraction, config.eval_batches, config.seq_len,
         max_prompt(config), post.fields, post.chat_template, config.data.on_bad_input,
         getattr(encode, '__name__', ''), id(tok))
  if key in _CACHE:
    return _CACHE[key]
  row_len, skip = config.seq_len + 1, config.data.on_bad_input == 'skip'
  records = read_records(post.train_file, 'post.train_file')
  eval_records, eval_source = [], ''
  if post.eval_file:
    eval_records, eval_source = read_records(post.eval_file, 'post.eval_file'), post.eval_file
  elif config.eval_batches > 0:
    records, eval_records = split_records(records, post.eval_fraction)
    eval_source = (f'{len(eval_records)} records held out of post.train_file '
                   f'(post.eval_fraction={post.eval_fraction})')
  train, report = encode_file(post.train_file, encode, row_len, max_prompt(config), skip,
                              records=records)
  out = {'train': train, 'train_report': report, 'eval': [], 'eval_report': None,
         'eval_source': eval_source}
  if eval_records:
    out['eval'], out['eval_report'] = encode_file(post.eval_file or post.train_file, encode,
                                                  row_len, max_prompt(config), skip,
                                                  what='post.eval_file', records=eval_records)
  _CACHE.clear()
  _CACHE[key] = out
  return out


def load_prompts(config, tok) -> tuple[list, list]:
  """(train, held-out) prompt tokens of `post.train_file` (held out as in `load_examples`), each
  cut from the left to leave `post.max_new_tokens` of the row (`[bos]` kept)."""
  from lmjax.data.records import read_records  # pylint: disable=g-import-not-at-top
  post, encoder = config.post, make_encoder(config, tok)
  keep = max(config.seq_len - post.max_new_tokens, 2)
  records = read_records(post.train_file, 'post.train_file')
  held = []
  if post.eval_file:
    held = read_records(post.eval_file, 'post.eval_file')
  elif config.eval_batches > 0:
    records, held = split_records(records, post.eval_fraction)

  def encode(pairs):
    out = []
    for where, record in pairs:
      try:
        tokens = encoder.prompt(record)
      except DataError as e:
        raise DataError(f'{where}: {e}') from None
      out.append(tokens if len(tokens) <= keep else tokens[:1] + tokens[len(tokens) - keep + 1:])
    return out

  return encode(records), encode(held)
