"""Supervised fine-tuning data: JSONL prompt/response or chat `messages`, loss on responses only.

Each JSONL line is either
  {"prompt": "...", "response": "..."}          ("completion" is accepted for "response"), or
  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
An example becomes `[bos] prompt response [eos]` with a per-token loss mask that is 1 only on
response (assistant) tokens and the eos closing them. Chat turns are rendered as
`<|role|>\\n content \\n`; every assistant turn is trained on.

Batches have the pretraining layout (inputs, targets, segment_ids, positions, weights). With
packing several examples share a row, each its own segment (positions restart at 0, attention
never crosses segments) and an example is never split across rows; an example longer than a row
is truncated. The iterator is infinite (reshuffled each epoch) and checkpointable.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from lmjax.data import packing
from lmjax.data.jsonl import read_jsonl
from lmjax.data.sources import DataError


def read_train_file(path: str, encode: Callable | None = None) -> list:
  """The records of `post.train_file` (see `jsonl.read_jsonl`), each passed through `encode`; a
  missing path or a file without records is an error naming post.train_file."""
  return read_jsonl(path, encode=encode, what='post.train_file')


def encode_prompt_response(tok, prompt: str, response: str) -> tuple[list[int], list[int]]:
  """([bos] prompt response [eos], mask) with mask 1 on the response and eos."""
  p = [tok.bos_id] + tok.encode(prompt)
  r = tok.encode(response) + [tok.eos_id]
  return p + r, [0] * len(p) + [1] * len(r)


def encode_messages(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
  tokens, mask = [tok.bos_id], [0]
  for message in messages:
    role, content = message['role'], message['content']
    header = tok.encode(f'<|{role}|>\n')
    tokens += header
    mask += [0] * len(header)
    if role == 'assistant':
      body = tok.encode(content) + [tok.eos_id]
      tokens += body
      mask += [1] * len(body)
    else:
      body = tok.encode(content + '\n')
      tokens += body
      mask += [0] * len(body)
  return tokens, mask


def encode_sft(tok, record: dict) -> tuple[list[int], list[int]]:
  if 'messages' in record:
    return encode_messages(tok, record['messages'])
  response = record.get('response', record.get('completion'))
  if 'prompt' not in record or response is None:
    raise DataError(f'SFT record needs prompt/response or messages: {sorted(record)}')
  return encode_prompt_response(tok, record['prompt'], response)


def rows_to_batch(tokens, segment_ids, positions, mask) -> dict[str, np.ndarray]:
  """(rows, seq_len + 1) arrays -> the shifted batch; weight = mask of the target token, only
  inside one segment."""
  batch = packing.shift_rows(tokens, segment_ids, positions)
  batch['weights'] *= (mask[:, 1:] > 0)
  return batch


def pack_examples(examples, start: int, rows: int, row_len: int, pack: bool):
  """Fills `rows` rows from examples[start:] (cyclically by the caller); returns the rows and
  how many examples were consumed."""
  arrays = [np.zeros((rows, row_len), np.int32) for _ in range(4)]
  tokens, segments, positions, mask = arrays
  i = start
  for row in range(rows):
    col, seg = 0, 0
    while True:
      ex_tokens, ex_mask = examples(i)
      n = min(len(ex_tokens), row_len)
      if col and (not pack or col + n > row_len):
        break
      seg += 1
      tokens[row, col:col + n] = ex_tokens[:n]
      mask[row, col:col + n] = ex_mask[:n]
      segments[row, col:col + n] = seg
      positions[row, col:col + n] = np.arange(n)
      col += n
      i += 1
      if not pack or col >= row_len:
        break
  return rows_to_batch(tokens, segments, positions, mask), i - start


class EpochIterator:
  """Infinite batches over a list of examples, shuffled per epoch; `get_state`/`set_state`.

  `make_rows(example_at, start, rows) -> (batch, consumed)` builds one global batch; every
  process builds the same batch and keeps its own rows.
  """

  def __init__(self, examples: list[Any], make_rows: Callable, global_rows: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    self._examples = examples
    self._make_rows = make_rows
    self._rows = global_rows
    self._seed = seed
    self._slice = slice(process_index * global_rows // process_count,
                        (process_index + 1) * global_rows // process_count)
    self.position = 0  # examples consumed since the start (over all epochs)
    self._order = (None, None)  # (epoch, permutation)

  def _example_at(self, i: int):
    n = len(self._examples)
    epoch, index = divmod(i, n)
    if self._order[0] != epoch:
      self._order = (epoch, np.random.default_rng([self._seed, epoch]).permutation(n))
    return self._examples[self._order[1][index]]

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch, consumed = self._make_rows(self._example_at, self.position, self._rows)
    self.position += consumed
    return {k: v[self._slice] for k, v in batch.items()}

  def get_state(self) -> dict[str, Any]:
    return {'version': 1, 'position': self.position}

  def set_state(self, state: dict[str, Any]) -> None:
    self.position = int(state['position'])

  def close(self) -> None:
    pass


def make_sft_iterator(config, tok, process_index: int = 0, process_count: int = 1):
  examples = read_train_file(config.post.train_file, lambda r: encode_sft(tok, r))
  row_len = config.seq_len + 1
  pack = config.post.pack
  make_rows = lambda example_at, start, rows: pack_examples(example_at, start, rows, row_len, pack)
  return EpochIterator(examples, make_rows, config.batch_size, config.seed, process_index,
                       process_count)
