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


class RowPacker:
  """Packs documents from `docs` (an iterator of 1-D int arrays) into rows of `row_len` tokens.

  If `docs` has `get_state`/`set_state` (a grain iterator), the packer is checkpointable: its state
  is the iterator state *before* the partly used document plus how many of its tokens were used.
  """

  def __init__(self, docs: Iterator[np.ndarray], row_len: int):
    self._docs = docs
    self._row_len = row_len
    self._doc: np.ndarray | None = None
    self._offset = 0
    self._doc_state: Any = None
    self.exhausted = False

  def _next_doc(self) -> bool:
    get_state = getattr(self._docs, 'get_state', None)
    self._doc_state = get_state() if get_state else None
    try:
      self._doc = np.asarray(next(self._docs), np.int32)
    except StopIteration:
      self._doc, self.exhausted = None, True
      return False
    self._offset = 0
    return True

  def fill_row(self, tokens: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray) -> int:
    """Fills one row in place (zeros past the end of the documents); returns tokens used."""
    fill, segment = 0, 0
    while fill < self._row_len:
      if self._doc is None or self._offset >= len(self._doc):
        if self.exhausted or not self._next_doc():
          break
        if not len(self._doc):
          continue
      take = min(len(self._doc) - self._offset, self._row_len - fill)
      segment += 1
      tokens[fill:fill + take] = self._doc[self._offset:self._offset + take]
      segment_ids[fill:fill + take] = segment
      positions[fill:fill + take] = np.arange(take)
      fill += take
      self._offset += take
    return fill

  def next_rows(self, num_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """`num_rows` packed rows and the number of them that hold any token."""
    tokens, segment_ids, positions = empty_rows(num_rows, self._row_len)
    used = 0
    for r in range(num_rows):
      if self.fill_row(tokens[r], segment_ids[r], positions[r]) == 0:
        break
      used += 1
    return tokens, segment_ids, positions, used

  def get_state(self) -> dict[str, Any]:
    if self._doc is not None and self._offset < len(self._doc):
      return {'docs': self._doc_state, 'offset': int(self._offset), 'in_doc': True}
    return {'docs': self._docs.get_state(), 'offset': 0, 'in_doc': False}

  def set_state(self, state: dict[str, Any]) -> None:
    self._docs.set_state(state['docs'])
    self._doc, self._offset, self.exhausted = None, 0, False
    if state['in_doc']:
      if not self._next_doc():
        raise ValueError('data iterator state points past the end of the data')
      self._offset = int(state['offset'])


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
    self._slots: list[list[Any]] = [[None, -1, 0] for _ in range(num_rows)]  # doc, index, offset

  def _refill(self, slot: list[Any]) -> None:
    slot[0] = np.asarray(next(self._docs_iter), np.int32)
    slot[1], slot[2] = self._fetched, 0
    self._fetched += 1

  def next_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tokens, segment_ids, positions = empty_rows(len(self._slots), self._row_len)
    for r, slot in enumerate(self._slots):
      fill, segment = 0, 0
      while fill < self._row_len:
        if slot[0] is None or slot[2] >= len(slot[0]):
          self._refill(slot)
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
