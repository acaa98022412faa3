"""Concatenate-then-split packing of token documents into fixed rows, and rows into batches.

Documents (already `[bos] + tokens + [eos]`) are laid end to end and cut into rows of
`seq_len + 1` tokens; a document that does not fit continues at the start of the next row. Within a
row each document piece gets its own segment id (1, 2, 3, ...) and positions that start at 0 --
also for the continuation of a document cut at the previous row's end. Restarting keeps positions
below `seq_len` (so they never exceed `model.max_seq_len`) and makes every row self-contained;
attention never crosses segment ids, so a continued piece does not see its earlier part.

Rows are then shifted: inputs = row[:-1], targets = row[1:]. The weight of a target is 1 only when
the input and target tokens belong to the same segment (not padding, not a document boundary).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np


def shift_rows(tokens: np.ndarray, segment_ids: np.ndarray,
               positions: np.ndarray) -> dict[str, np.ndarray]:
  """(rows, seq_len + 1) packed arrays -> the batch dict of (rows, seq_len) arrays."""
  seg_in, seg_out = segment_ids[:, :-1], segment_ids[:, 1:]
  return {
      'inputs': tokens[:, :-1].astype(np.int32),
      'targets': tokens[:, 1:].astype(np.int32),
      'segment_ids': seg_in.astype(np.int32),
      'positions': positions[:, :-1].astype(np.int32),
      'weights': ((seg_in == seg_out) & (seg_in > 0)).astype(np.float32),
  }


def empty_rows(num_rows: int, row_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  return tuple(np.zeros((num_rows, row_len), np.int32) for _ in range(3))


class InterleavedPacker:
  """Packs training rows so that each row of a batch reads a different document.

  Row r of every batch continues the document open in slot r; when it runs out, the slot takes the
  next document of the shared stream. A batch therefore mixes at least `num_rows` documents (a
  single stream would fill a whole batch from one long file). Documents come from `docs_iter`, a
  grain iterator over the random-access `docs` dataset, so the state is small: the iterator's
  state and, per slot, the stream index of its document and the tokens already used.
  """

  def __init__(self, docs, docs_iter, num_rows: int, row_len: int):
    self._docs = docs
    self._docs_iter = docs_iter
    self._row_len = row_len
    self._fetched = 0  # documents taken from the stream so far
    self.exhausted = False
    self._slots: list[list[Any]] = [[None, -1, 0] for _ in range(num_rows)]  # doc, index, offset

  def _refill(self, slot: list[Any]) -> bool:
    try:
      slot[0] = np.asarray(next(self._docs_iter), np.int32)
    except StopIteration:  # a finite stream (evaluation) ran out: the rest stays padding
      self.exhausted = True
      return False
    slot[1], slot[2] = self._fetched, 0
    self._fetched += 1
    return True

  def next_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tokens, segment_ids, positions = empty_rows(len(self._slots), self._row_len)
    for r, slot in enumerate(self._slots):
      fill, segment = 0, 0
      while fill < self._row_len:
        if slot[0] is None or slot[2] >= len(slot[0]):
          if self.exhausted or not self._refill(slot):
            break
          continue
        doc, _, offset = slot
        take = min(len(doc) - offset, self._row_len - fill)
        segment += 1
        tokens[r, fill:fill + take] = doc[offset:offset + take]
        segment_ids[r, fill:fill + take] = segment
        positions[r, fill:fill + take] = np.arange(take)
        fill += take
        slot[2] += take
    return tokens, segment_ids, positions

  def get_state(self) -> dict[str, Any]:
    return {'docs': self._docs_iter.get_state(), 'fetched': self._fetched,
            'slots': [[int(index), int(offset)] for _, index, offset in self._slots]}

  def set_state(self, state: dict[str, Any]) -> None:
    if len(state['slots']) != len(self._slots):
      raise ValueError(f'data iterator state: saved with {len(state["slots"])} rows per batch, '
                       f'restored with {len(self._slots)}')
    self._docs_iter.set_state(state['docs'])
    self._fetched = int(state['fetched'])
    self._slots = [[None if index < 0 else np.asarray(self._docs[index], np.int32), index, offset]
                   for index, offset in state['slots']]
