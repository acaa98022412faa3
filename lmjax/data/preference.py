"""Preference pairs for reward modelling and DPO-family training.

Each JSONL line is {"prompt": "...", "chosen": "...", "rejected": "..."}; chat-style records with
"messages" (the shared context) and "chosen"/"rejected" assistant replies are accepted too.
A pair becomes two right-padded rows `[bos] prompt response [eos]` whose weights mark the
response tokens (targets) only. Batch keys: `chosen_*` and `rejected_*` for each of inputs,
targets, segment_ids, positions, weights -- all (rows, seq_len).
"""

from __future__ import annotations

import numpy as np

from lmjax.data import sft
from lmjax.data.sources import DataError

SIDES = ('chosen', 'rejected')


def encode_pair(tok, record: dict):
  """((tokens, mask) chosen, (tokens, mask) rejected)."""
  if not all(k in record for k in SIDES):
    raise DataError(f'preference record needs chosen and rejected: {sorted(record)}')
  out = []
  for side in SIDES:
    if 'messages' in record:
      messages = list(record['messages']) + [{'role': 'assistant', 'content': record[side]}]
      out.append(sft.encode_messages(tok, messages))
    else:
      out.append(sft.encode_prompt_response(tok, record['prompt'], record[side]))
  return tuple(out)


def pad_rows(examples, row_len: int) -> dict[str, np.ndarray]:
  """One example per row, right-padded (segment 0), truncated to `row_len`."""
  rows = len(examples)
  tokens, segments, positions, mask = (np.zeros((rows, row_len), np.int32) for _ in range(4))
  for row, (ex_tokens, ex_mask) in enumerate(examples):
    n = min(len(ex_tokens), row_len)
    tokens[row, :n] = ex_tokens[:n]
    mask[row, :n] = ex_mask[:n]
    segments[row, :n] = 1
    positions[row, :n] = np.arange(n)
  return sft.rows_to_batch(tokens, segments, positions, mask)


def pair_batch(pairs, row_len: int) -> dict[str, np.ndarray]:
  batch = {}
  for i, side in enumerate(SIDES):
    for key, value in pad_rows([pair[i] for pair in pairs], row_len).items():
      batch[f'{side}_{key}'] = value
  return batch


def make_preference_iterator(config, tok, process_index: int = 0, process_count: int = 1):
  pairs = [encode_pair(tok, r) for r in sft.read_jsonl(config.post.train_file)]
  row_len = config.seq_len + 1

  def make_rows(example_at, start, rows):
    return pair_batch([example_at(start + i) for i in range(rows)], row_len), rows

  return sft.EpochIterator(pairs, make_rows, config.batch_size, config.seed, process_index,
                           process_count)
