"""Preference data for reward modelling and DPO-family training: pairs, or unpaired KTO examples.

Paired: each JSONL line is {"prompt": "...", "chosen": "...", "rejected": "..."}; chat-style
records with "messages" (the shared context) and "chosen"/"rejected" assistant replies are
accepted too. A pair becomes two right-padded rows `[bos] prompt response [eos]` whose weights mark
the response tokens (targets) only. Batch keys: `chosen_*` and `rejected_*` for each of inputs,
targets, segment_ids, positions, weights -- all (rows, seq_len).

Unpaired (task=dpo with post.loss_type=kto only, as TRL's KTOTrainer reads): each line is
{"prompt" or "messages": ..., "completion": "...", "label": true|false} (true = desirable). The
format is the first record's; a file may not mix the two. Batch keys: inputs, targets,
segment_ids, positions, weights (rows, seq_len) for `[bos] prompt completion [eos]` (weights on
the completion only), `desirable` (rows,) float 1/0, and the same five with a `kl_` prefix: the
KL reference rows, prompt i with the completion of row (i + 1) mod rows of the global batch.
"""

from __future__ import annotations

import numpy as np

from lmjax.data import sft
from lmjax.data.sources import DataError

SIDES = ('chosen', 'rejected')


def split_reply(tok, record: dict, reply: str):
  """(context tokens, reply tokens + eos): `[bos] prompt`, or the rendered chat `messages`, then
  the assistant `reply`. Only the reply is scored: earlier assistant turns are context."""
  if 'messages' in record:
    messages = list(record['messages']) + [{'role': 'assistant', 'content': reply}]
    tokens, _ = sft.encode_messages(tok, messages)
  else:
    tokens, _ = sft.encode_prompt_response(tok, record['prompt'], reply)
  n = len(tokens) - len(tok.encode(reply)) - 1
  return tokens[:n], tokens[n:]


def encode_pair(tok, record: dict):
  """((tokens, mask) chosen, (tokens, mask) rejected), the mask on the reply only."""
  if not all(k in record for k in SIDES):
    raise DataError(f'preference record needs chosen and rejected: {sorted(record)}')
  out = []
  for side in SIDES:
    context, reply = split_reply(tok, record, record[side])
    out.append((context + reply, [0] * len(context) + [1] * len(reply)))
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


def is_unpaired(record) -> bool:
  return isinstance(record, dict) and ('completion' in record or 'label' in record)


def encode_unpaired(tok, record: dict):
  """(prompt tokens, completion tokens + eos, desirable) of an unpaired KTO record."""
  completion, label = record.get('completion'), record.get('label')
  if not isinstance(completion, str) or not ('prompt' in record or 'messages' in record):
    raise DataError('unpaired KTO record needs prompt (or messages), completion (a string) and '
                    f'label: {sorted(record)}')
  if not isinstance(label, bool):
    raise DataError(f'label: must be true (desirable) or false (undesirable); got {label!r}')
  context, reply = split_reply(tok, record, completion)
  return context, reply, label


def unpaired_batch(examples, row_len: int) -> dict[str, np.ndarray]:
  """KTO rows (loss on the completion only), `desirable` and the mismatched `kl_` rows."""
  rows = len(examples)
  rows_of = lambda pairs: pad_rows([(p + c, [0] * len(p) + [1] * len(c)) for p, c in pairs],
                                   row_len)
  batch = rows_of([(p, c) for p, c, _ in examples])
  kl = rows_of([(p, examples[(i + 1) % rows][1]) for i, (p, _, _) in enumerate(examples)])
  batch.update({f'kl_{k}': v for k, v in kl.items()})
  batch['desirable'] = np.array([label for _, _, label in examples], np.float32)
  return batch


def make_preference_iterator(config, tok, process_index: int = 0, process_count: int = 1):
  """Pair batches, or KTO batches for a file of unpaired records (see the module docstring)."""
  path = config.post.train_file
  unpaired = []  # the file's format, set by its first record

  def encode(record):
    unpaired[:] = unpaired or [is_unpaired(record)]
    if is_unpaired(record) != unpaired[0]:
      kinds = ('paired (chosen/rejected)', 'unpaired (completion/label)')
      raise DataError(f'a {kinds[not unpaired[0]]} record in a file of {kinds[unpaired[0]]} '
                      'records; a file cannot mix the two')
    return encode_unpaired(tok, record) if unpaired[0] else encode_pair(tok, record)

  examples = sft.read_train_file(path, encode)
  row_len = config.seq_len + 1
  make_batch = pair_batch
  if unpaired[0]:
    if config.task != 'dpo' or config.post.loss_type != 'kto':
      raise DataError(f'{path}: unpaired records (completion/label) need task=dpo with '
                      f'post.loss_type=kto, not task={config.task} '
                      f'loss_type={config.post.loss_type}')
    if config.batch_size < 2:
      raise DataError('batch_size: KTO on unpaired data needs at least 2 rows (the KL rows pair '
                      "each prompt with another row's completion)")
    make_batch = unpaired_batch

  def make_rows(example_at, start, rows):
    return make_batch([example_at(start + i) for i in range(rows)], row_len), rows

  return sft.EpochIterator(examples, make_rows, config.batch_size, config.seed, process_index,
                           process_count)
