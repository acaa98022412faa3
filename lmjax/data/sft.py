"""Supervised fine-tuning data: prompt/response, chat `messages` or plain text, loss on responses.

Records are read by `lmjax.data.records` and encoded by `lmjax.data.examples` (the shapes accepted,
field mapping, chat templates, truncation and its report):
  {"prompt": "...", "response": "..."}          ("completion" is accepted for "response"),
  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}, or
  {"text": "..."}                                (every token trained on)
An example becomes `[bos] prompt response [eos]` with a per-token loss mask that is 1 only on
response (assistant) tokens and the eos closing them; every assistant turn is trained on.

Batches have the pretraining layout (inputs, targets, segment_ids, positions, weights). With
packing several examples share a row, each its own segment (positions restart at 0, attention
never crosses segments) and an example is never split across rows. The iterator is infinite
(reshuffled each epoch) and checkpointable.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from lmjax.data import examples as examples_lib
from lmjax.data import packing
from lmjax.data.jsonl import DataError  # noqa: F401  (re-exported)
from lmjax.data.records import read_records


def read_train_file(path: str, encode: Callable | None = None) -> list:
  """The records of `post.train_file` (any format `lmjax.data.records` reads), each passed through
  `encode`; a DataError it raises is reported at the record's place."""
  out = []
  for where, record in read_records(path, 'post.train_file'):
    try:
      out.append(encode(record) if encode is not None else record)
    except DataError as e:
      raise DataError(f'{where}: {e}') from None
  return out


def _tokens_mask(example) -> tuple[list[int], list[int]]:
  prompt, ((response, mask),) = example
  return prompt + response, [0] * len(prompt) + list(mask)


def encode_prompt_response(tok, prompt: str, response: str) -> tuple[list[int], list[int]]:
  """([bos] prompt response [eos], mask) with mask 1 on the response and eos."""
  return _tokens_mask(examples_lib.Encoder(tok).sft({'prompt': prompt, 'response': response}))


def encode_messages(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
  """lmjax's chat template of `messages`, mask 1 on the assistant replies."""
  return _tokens_mask(examples_lib.Encoder(tok).sft({'messages': messages}))


def encode_sft(tok, record: dict) -> tuple[list[int], list[int]]:
  return _tokens_mask(examples_lib.Encoder(tok).sft(record))


def rows_to_batch(tokens, segment_ids, positions, mask) -> dict[str, np.ndarray]:
  """(rows, seq_len + 1) arrays -> the shifted batch; weight = mask of the target token, only
  inside one segment."""
  batch = packing.shift_rows(tokens, segment_ids, positions)
  batch['weights'] *= (mask[:, 1:] > 0)
  return batch


def pad_rows(rows_in, row_len: int) -> dict[str, np.ndarray]:
  """One (tokens, mask) example per row, right-padded (segment 0), truncated to `row_len`."""
  rows = len(rows_in)
  tokens, segments, positions, mask = (np.zeros((rows, row_len), np.int32) for _ in range(4))
  for row, (ex_tokens, ex_mask) in enumerate(rows_in):
    n = min(len(ex_tokens), row_len)
    tokens[row, :n] = ex_tokens[:n]
    mask[row, :n] = ex_mask[:n]
    segments[row, :n] = 1
    positions[row, :n] = np.arange(n)
  return rows_to_batch(tokens, segments, positions, mask)


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


def load(config, tok) -> dict:
  """The encoded train / held-out examples (`examples.load_examples`) as (tokens, mask)."""
  encoder = examples_lib.make_encoder(config, tok)
  encode = encoder.sft
  data = examples_lib.load_examples(config, tok, encode)
  return dict(data, train=[_tokens_mask(e) for e in data['train']],
              eval=[_tokens_mask(e) for e in data['eval']])


def make_sft_iterator(config, tok, process_index: int = 0, process_count: int = 1):
  data = load(config, tok)
  row_len = config.seq_len + 1
  pack = config.post.pack
  make_rows = lambda example_at, start, rows: pack_examples(example_at, start, rows, row_len, pack)
  iterator = EpochIterator(data['train'], make_rows, config.batch_size, config.seed,
                           process_index, process_count)
  iterator.report, iterator.eval_report = data['train_report'], data['eval_report']
  return iterator


def make_eval_batches(config, tok, process_index: int = 0, process_count: int = 1) -> list:
  """Held-out batches, one example per row (right-padded, padding rows weigh nothing), at most
  `eval_batches` batches of `batch_size` rows."""
  held = load(config, tok)['eval']
  rows = config.batch_size
  mine = slice(process_index * rows // process_count, (process_index + 1) * rows // process_count)
  batches = []
  for start in range(0, min(len(held), rows * config.eval_batches), rows):
    chunk = held[start:start + rows]
    chunk = chunk + [([], [])] * (rows - len(chunk))
    batches.append({k: v[mine] for k, v in pad_rows(chunk, config.seq_len + 1).items()})
  return batches
