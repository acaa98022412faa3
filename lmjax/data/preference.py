"""Preference data for reward modelling and DPO-family training: pairs, or unpaired KTO examples.

Records are read by `lmjax.data.records` (JSON lines, gzip / zstd, JSON arrays, Parquet, datasets
directories) and encoded by `lmjax.data.examples` (the shapes accepted, field mapping, chat
templates, truncation and its report). A pair becomes two right-padded rows
`[bos] prompt response [eos]` whose weights mark the response tokens (targets) only. Batch keys:
`chosen_*` and `rejected_*` for each of inputs, targets, segment_ids, positions, weights -- all
(rows, seq_len).

Unpaired (task=dpo with post.loss_type=kto only, as TRL's KTOTrainer reads): each record is
{"prompt" or "messages": ..., "completion": "...", "label": true|false} (true = desirable). The
format is the first record's; a file may not mix the two. Batch keys: inputs, targets,
segment_ids, positions, weights (rows, seq_len) for `[bos] prompt completion [eos]` (weights on
the completion only), `desirable` (rows,) float 1/0, and the same five with a `kl_` prefix: the
KL reference rows, prompt i with the completion of row (i + 1) mod rows of the global batch.
"""

from __future__ import annotations

import numpy as np

from lmjax.data import examples as examples_lib
from lmjax.data import sft
from lmjax.data.sft import pad_rows
from lmjax.data.jsonl import DataError

SIDES = ('chosen', 'rejected')


def is_unpaired(record) -> bool:
  return isinstance(record, dict) and ('completion' in record or 'label' in record)


def _row(prompt, response):
  tokens, mask = response
  return prompt + tokens, [0] * len(prompt) + list(mask)


def encode_pair(tok, record: dict):
  """((tokens, mask) chosen, (tokens, mask) rejected) of one record (lmjax's chat template, no
  field mapping, no truncation), the mask on the reply only."""
  prompt, responses = examples_lib.Encoder(tok).pair(record)
  return tuple(_row(prompt, r) for r in responses)


def encode_unpaired(tok, record: dict):
  """(prompt tokens, completion tokens + eos, desirable) of an unpaired KTO record."""
  prompt, responses, label = examples_lib.Encoder(tok).unpaired(record)
  return prompt, responses[0][0], label


def pair_batch(pairs, row_len: int) -> dict[str, np.ndarray]:
  """Batch of pairs ((tokens, mask) chosen, (tokens, mask) rejected)."""
  batch = {}
  for i, side in enumerate(SIDES):
    for key, value in pad_rows([pair[i] for pair in pairs], row_len).items():
      batch[f'{side}_{key}'] = value
  return batch


def unpaired_batch(examples, row_len: int) -> dict[str, np.ndarray]:
  """KTO rows (loss on the completion only), `desirable` and the mismatched `kl_` rows; examples
  are (prompt tokens, completion tokens, desirable)."""
  rows = len(examples)
  rows_of = lambda pairs: pad_rows([(p + c, [0] * len(p) + [1] * len(c)) for p, c in pairs],
                                   row_len)
  batch = rows_of([(p, c) for p, c, _ in examples])
  kl = rows_of([(p, examples[(i + 1) % rows][1]) for i, (p, _, _) in enumerate(examples)])
  batch.update({f'kl_{k}': v for k, v in kl.items()})
  batch['desirable'] = np.array([label for _, _, label in examples], np.float32)
  return batch


def _legacy(example):
  """An encoded example in the batch builders' form: a pair of rows, or (prompt, completion,
  desirable)."""
  if len(example) == 3:
    prompt, responses, label = example
    return prompt, responses[0][0], label
  prompt, responses = example
  return tuple(_row(prompt, r) for r in responses)


def _encoder(config, tok):
  """encode(record) for the file's format (set by its first record)."""
  encoder = examples_lib.make_encoder(config, tok)
  unpaired = []

  def encode(record):
    record_unpaired = is_unpaired(encoder.fmap.apply(record))
    unpaired[:] = unpaired or [record_unpaired]
    if record_unpaired != unpaired[0]:
      kinds = ('paired (chosen/rejected)', 'unpaired (completion/label)')
      raise DataError(f'a {kinds[not unpaired[0]]} record in a file of {kinds[unpaired[0]]} '
                      'records; a file cannot mix the two')
    return encoder.unpaired(record) if unpaired[0] else encoder.pair(record)

  encode.__name__ = 'preference'
  return encode


def load(config, tok) -> tuple[dict, callable]:
  """The encoded train / held-out examples (`examples.load_examples`) and their batch builder."""
  encode = _encoder(config, tok)
  data = examples_lib.load_examples(config, tok, encode)
  data = dict(data, train=[_legacy(e) for e in data['train']],
              eval=[_legacy(e) for e in data['eval']])
  if len(data['train'][0]) == 3:
    path = config.post.train_file
    if config.task != 'dpo' or config.post.loss_type != 'kto':
      raise DataError(f'{path}: unpaired records (completion/label) need task=dpo with '
                      f'post.loss_type=kto, not task={config.task} '
                      f'loss_type={config.post.loss_type}')
    if config.batch_size < 2:
      raise DataError('batch_size: KTO on unpaired data needs at least 2 rows (the KL rows pair '
                      "each prompt with another row's completion)")
    return data, unpaired_batch
  return data, pair_batch


def make_preference_iterator(config, tok, process_index: int = 0, process_count: int = 1):
  """Pair batches, or KTO batches for a file of unpaired records (see the module docstring)."""
  data, make_batch = load(config, tok)
  row_len = config.seq_len + 1

  def make_rows(example_at, start, rows):
    return make_batch([example_at(start + i) for i in range(rows)], row_len), rows

  iterator = sft.EpochIterator(data['train'], make_rows, config.batch_size, config.seed,
                               process_index, process_count)
  iterator.report, iterator.eval_report = data['train_report'], data['eval_report']
  return iterator


def make_eval_batches(config, tok, process_index: int = 0, process_count: int = 1) -> list:
  """Held-out batches of `batch_size` pairs (or KTO rows), at most `eval_batches`; the examples
  that do not fill a last batch are left out (a set smaller than one batch is repeated to one)."""
  data, make_batch = load(config, tok)
  held = data['eval']
  if not held:
    return []
  rows = config.batch_size
  if len(held) < rows:
    held = [held[i % len(held)] for i in range(rows)]
  count = min(len(held) // rows, config.eval_batches)
  mine = slice(process_index * rows // process_count, (process_index + 1) * rows // process_count)
  return [{k: v[mine] for k, v in make_batch(held[b * rows:(b + 1) * rows],
                                             config.seq_len + 1).items()}
          for b in range(count)]
