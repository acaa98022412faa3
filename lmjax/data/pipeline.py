"""Training and evaluation batches: sources -> shuffled, sharded, mixed documents -> packed rows.

Training (grain, lazy): per source, the training documents are sliced for this process (`[i::n]`),
shuffled with a seed derived from `config.seed` (reshuffled every epoch) and repeated forever; the
sources are mixed with their weights (`MapDataset.mix`, deterministic); each document is read and
tokenized lazily in grain threads (or `data.num_workers` processes). Packing into rows (each row of a
batch from a different document, see `packing.InterleavedPacker`) happens in `TrainIterator`, whose state (grain state + offset into the current document) is JSON-serialisable.

Evaluation: all held-out documents (round-robin over sources, in listing order) are packed into
global batches, interleaved like training rows; every process packs the same rows and takes its own slice of each batch, so all
processes return the same number of batches.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Iterator

import grain
import numpy as np

from lmjax.data import packing
from lmjax.data import sources as sources_lib

_log = logging.getLogger(__name__)
_STATE_VERSION = 1
_READ_THREADS = 2
_PREFETCH_DOCS = 32


def local_batch_size(config, process_count: int) -> int:
  if config.batch_size % process_count:
    raise ValueError(f'batch_size: {config.batch_size} does not divide over '
                     f'{process_count} processes')
  return config.batch_size // process_count


def _source_seed(seed: int, source_index: int) -> int:
  return int(sources_lib.unit_hash(f'{seed}/{source_index}', 'shuffle') * 2**32)


class EncodeDocument:
  """DocRef -> int32 array `[bos] + tokens + [eos]`; empty for a bad document in skip mode (never
  None, so the stream stays index-aligned with the dataset)."""

  def __init__(self, tokenizer, text_field: str, skip_bad: bool):
    self.tokenizer = tokenizer
    self.text_field = text_field
    self.skip_bad = skip_bad

  def __call__(self, ref: sources_lib.DocRef) -> np.ndarray | None:
    try:
      text = sources_lib.read_document(ref, self.text_field)
    except sources_lib.DataError as e:
      if not self.skip_bad:
        raise
      _log.warning('skipping %s', e)
      return np.zeros((0,), np.int32)
    tok = self.tokenizer
    return np.asarray([tok.bos_id] + tok.encode(text) + [tok.eos_id], np.int32)


def train_refs_dataset(sources: list[sources_lib.Source], eval_fraction: float, seed: int,
                       process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """The infinite, shuffled, mixed stream of this process's training DocRefs."""
  parts = []
  for i, source in enumerate(sources):
    train, _ = sources_lib.split_eval(source.docs, eval_fraction)
    shard = train[process_index::process_count]
    if not shard:
      raise sources_lib.DataError(
          f'data.source: {source.spec!r} has {len(train)} training documents, too few to give '
          f'each of {process_count} processes one')
    parts.append(grain.MapDataset.source(shard).shuffle(seed=_source_seed(seed, i)).repeat())
  if len(parts) == 1:
    return parts[0]
  return grain.MapDataset.mix(parts, [s.weight for s in sources])


def eval_refs(sources: list[sources_lib.Source], eval_fraction: float) -> list[sources_lib.DocRef]:
  """All held-out documents, round-robin over the sources."""
  per_source = [sources_lib.split_eval(s.docs, eval_fraction)[1] for s in sources]
  merged = itertools.zip_longest(*per_source)
  return [ref for group in merged for ref in group if ref is not None]


class TrainIterator:
  """Infinite iterator of per-process training batches, checkpointable with get/set_state."""

  def __init__(self, docs, docs_iter, row_len: int, rows: int, process_index: int,
               process_count: int, skipped: int = 0):
    self.skipped = skipped  # bad documents dropped while listing (data.on_bad_input=skip)
    self._docs_iter = docs_iter
    self._packer = packing.InterleavedPacker(docs, docs_iter, rows, row_len)
    self._process = (process_index, process_count)

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return packing.shift_rows(*self._packer.next_rows())

  def get_state(self) -> dict[str, Any]:
    return {'version': _STATE_VERSION, 'process_index': self._process[0],
            'process_count': self._process[1], 'packer': self._packer.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get('version') != _STATE_VERSION:
      raise ValueError(f'data iterator state: unknown version {state.get("version")!r}')
    saved = (state['process_index'], state['process_count'])
    if saved != self._process:
      raise ValueError(f'data iterator state: saved for process {saved[0]} of {saved[1]}, '
                       f'restored into process {self._process[0]} of {self._process[1]}')
    self._packer.set_state(state['packer'])

  def close(self) -> None:
    close = getattr(self._docs_iter, 'close', None)
    if close:
      close()


def _ensure_absl_flags_parsed() -> None:
  """grain's worker processes read absl flags; scripts without absl.app never parse them
  (google/grain#1355), so fall back to the flags' defaults."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_train_iterator(config, tok, process_index: int = 0, process_count: int = 1,
                        sources: list[sources_lib.Source] | None = None) -> TrainIterator:
  """Per-process training batches: (batch_size // process_count, seq_len) arrays."""
  rows = local_batch_size(config, process_count)
  data = config.data
  if sources is None:
    sources = sources_lib.load_sources(data)
  refs = train_refs_dataset(sources, data.eval_fraction, config.seed, process_index, process_count)
  encode = EncodeDocument(tok, data.text_field, data.on_bad_input == 'skip')
  read_options = grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=_PREFETCH_DOCS)
  docs = refs.map(encode)
  stream = docs.to_iter_dataset(read_options)
  if data.num_workers > 0:
    _ensure_absl_flags_parsed()
    stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.num_workers))
  return TrainIterator(docs, iter(stream), config.seq_len + 1, rows, process_index, process_count,
                       sources_lib.skipped_count(sources))


def make_eval_batches(config, tok, process_index: int = 0, process_count: int = 1,
                      sources: list[sources_lib.Source] | None = None
                      ) -> list[dict[str, np.ndarray]]:
  """Up to `config.eval_batches` batches of held-out documents; the last one may be padded."""
  rows = local_batch_size(config, process_count)
  data = config.data
  if sources is None:
    sources = sources_lib.load_sources(data)
  if config.eval_batches == 0 or data.eval_fraction <= 0:
    return []
  encode = EncodeDocument(tok, data.text_field, data.on_bad_input == 'skip')
  docs = (d for d in map(encode, eval_refs(sources, data.eval_fraction)) if len(d))
  # Interleaved like training, so that every batch spans many held-out documents.
  packer = packing.InterleavedPacker(None, docs, config.batch_size, config.seq_len + 1)
  batches = []
  while len(batches) < config.eval_batches:
    tokens, segment_ids, positions = packer.next_rows()
    if not segment_ids.any():
      break
    mine = slice(process_index * rows, (process_index + 1) * rows)
    batches.append(packing.shift_rows(tokens[mine], segment_ids[mine], positions[mine]))
  return batches
