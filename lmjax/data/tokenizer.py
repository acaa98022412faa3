"""SentencePiece tokenizer that round-trips source code exactly, trained on the corpus and cached.

Trainer settings keep text byte-exact: identity normalisation, no whitespace collapsing, no dummy
prefix, whitespace-only pieces allowed, byte fallback for any character outside the vocabulary, and
multi-line chunks fed through `sentence_iterator` so newlines are part of the training text.
SentencePiece uses U+2581 ('▁') for a space, so a literal U+2581 in the text is escaped before
encoding and restored after decoding (`_escape` / `_unescape`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import time

import sentencepiece as spm

from lmjax.data import sources as sources_lib
from lmjax.paths import cache_dir

_log = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SAMPLE_BYTES = 4_000_000  # training text drawn from the corpus, deterministically
DOC_SAMPLE_CAP = 64_000  # characters taken from any one document
CHUNK_CHARS = 4_000  # one training "sentence": whole lines up to this many characters

TRAINER_SETTINGS = dict(
    model_type='bpe',
    normalization_rule_name='identity',
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,
    split_by_whitespace=False,
    split_digits=True,
    byte_fallback=True,
    character_coverage=0.9995,
    max_sentence_length=4 * CHUNK_CHARS + 16,
    input_sentence_size=0,
    hard_vocab_limit=False,
    pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
)

_SPACE_MARK = '\u2581'
_ESCAPE = '\U000F0000'  # a private-use character


def _escape(text: str) -> str:
  if _SPACE_MARK not in text and _ESCAPE not in text:
    return text
  return text.replace(_ESCAPE, _ESCAPE + _ESCAPE).replace(_SPACE_MARK, _ESCAPE + '_')


def _unescape(text: str) -> str:
  if _ESCAPE not in text:
    return text
  out, i = [], 0
  while i < len(text):
    ch = text[i]
    if ch == _ESCAPE and i + 1 < len(text):
      out.append(_ESCAPE if text[i + 1] == _ESCAPE else _SPACE_MARK)
      i += 2
    else:
      out.append(ch)
      i += 1
  return ''.join(out)


class Tokenizer:
  """A SentencePiece model; picklable (it travels to data-loading worker processes)."""

  def __init__(self, model_proto: bytes, path: str = ''):
    self.path = path
    self._proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    for name, piece_id in (('bos', self._sp.bos_id()), ('eos', self._sp.eos_id())):
      if piece_id < 0:
        raise sources_lib.DataError(f'data.tokenizer: {path or "model"} has no {name} piece')

  def __getstate__(self):
    return {'model_proto': self._proto, 'path': self.path}

  def __setstate__(self, state):
    self.__init__(state['model_proto'], state['path'])

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def pad_id(self) -> int:
    return PAD_ID  # padding positions hold 0 and always have weight 0

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(_escape(text), out_type=int)

  def decode(self, ids) -> str:
    return _unescape(self._sp.decode([int(i) for i in ids]))


def _text_chunks(text: str):
  """Whole lines grouped into chunks of at most CHUNK_CHARS characters (long lines are cut)."""
  chunk = ''
  for line in text.splitlines(keepends=True):
    while len(line) > CHUNK_CHARS:
      if chunk:
        yield chunk
        chunk = ''
      yield line[:CHUNK_CHARS]
      line = line[CHUNK_CHARS:]
    if len(chunk) + len(line) > CHUNK_CHARS:
      yield chunk
      chunk = ''
    chunk += line
  if chunk:
    yield chunk


def sample_training_texts(train_sources: list[sources_lib.Source], text_field: str,
                          budget_bytes: int = SAMPLE_BYTES) -> list[str]:
  """Texts for tokenizer training: documents in hash order, each source's share by its weight."""
  total_weight = sum(s.weight for s in train_sources)
  texts = []
  for source in train_sources:
    budget = budget_bytes * source.weight / total_weight
    for ref in sorted(source.docs, key=lambda d: sources_lib.unit_hash(d.key, 'tokenizer')):
      if budget <= 0:
        break
      text = sources_lib.read_document(ref, text_field)[:DOC_SAMPLE_CAP]
      texts.append(text)
      budget -= len(text.encode('utf-8'))
  return texts


def _cache_key(texts: list[str], vocab_size: int) -> str:
  h = hashlib.sha256()
  settings = dict(TRAINER_SETTINGS, vocab_size=vocab_size, chunk_chars=CHUNK_CHARS, escape=1)
  h.update(json.dumps(settings, sort_keys=True).encode())
  for text in texts:
    data = text.encode('utf-8')
    h.update(len(data).to_bytes(8, 'little'))
    h.update(data)
  return h.hexdigest()[:24]


def train_model(texts: list[str], vocab_size: int) -> bytes:
  """Trains a SentencePiece model on `texts`; returns the serialized model."""
  writer = io.BytesIO()
  chunks = (_escape(c) for t in texts for c in _text_chunks(t))
  try:
    spm.SentencePieceTrainer.train(sentence_iterator=chunks, model_writer=writer,
                                   vocab_size=vocab_size, num_threads=2, minloglevel=2,
                                   **TRAINER_SETTINGS)
  except RuntimeError as e:
    raise sources_lib.DataError(f'model.vocab_size={vocab_size}: tokenizer training failed '
                                f'(byte fallback needs > 256 + distinct characters): {e}') from None
  return writer.getvalue()


def write_atomically(path: str, data: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def load_tokenizer(path: str, vocab_size: int | None = None) -> Tokenizer:
  """Loads a SentencePiece `.model`, or a Hugging Face `tokenizer.json` (through the `tokenizers`
  package); errors name `data.tokenizer` and the path."""
  if path.endswith('.json'):
    from lmjax.convert.tokenizer import load_hf_tokenizer  # pylint: disable=g-import-not-at-top
    return load_hf_tokenizer(path, vocab_size)
  if not os.path.isfile(path):
    raise sources_lib.DataError(f'data.tokenizer: no such SentencePiece model: {path!r}')
  with open(path, 'rb') as f:
    proto = f.read()
  try:
    tok = Tokenizer(proto, path)
  except RuntimeError as e:
    raise sources_lib.DataError(
        f'data.tokenizer: {path!r} is not a SentencePiece model: {e}') from None
  if vocab_size is not None and tok.vocab_size > vocab_size:
    raise sources_lib.DataError(f'data.tokenizer: {path!r} has {tok.vocab_size} pieces, more than '
                                f'model.vocab_size={vocab_size}')
  return tok


def train_sources(data_config) -> list[sources_lib.Source]:
  """The sources with their held-out documents removed (the tokenizer never sees eval text)."""
  result = []
  for source in sources_lib.load_sources(data_config):
    train, _ = sources_lib.split_eval(source.docs, data_config.eval_fraction)
    result.append(sources_lib.Source(source.spec, source.weight, train, source.skipped))
  return result


def train_or_load_cached(texts: list[str], vocab_size: int) -> Tokenizer:
  """The cached model for exactly these texts and settings, training it on a miss."""
  path = cache_dir('tokenizers', f'{_cache_key(texts, vocab_size)}.model')
  if os.path.isfile(path):
    return load_tokenizer(path, vocab_size)
  start = time.time()
  proto = train_model(texts, vocab_size)
  write_atomically(path, proto)
  _log.info('trained tokenizer (vocab %d) in %.1fs: %s', vocab_size, time.time() - start, path)
  return Tokenizer(proto, path)


def load_or_train_tokenizer(data_config, vocab_size: int) -> Tokenizer:
  """`data.tokenizer` if set, else a model trained on the training documents (cached)."""
  if data_config.tokenizer:
    return load_tokenizer(data_config.tokenizer, vocab_size)
  texts = sample_training_texts(train_sources(data_config), data_config.text_field)
  return train_or_load_cached(texts, vocab_size)


def bytes_per_token(tok: Tokenizer, texts: list[str]) -> float:
  n_bytes = sum(len(t.encode('utf-8')) for t in texts)
  n_tokens = sum(len(tok.encode(t)) for t in texts)
  return n_bytes / max(n_tokens, 1)
