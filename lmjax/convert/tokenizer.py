"""Hugging Face `tokenizer.json` tokenizers behind the lmjax tokenizer interface.

`lmjax.data.tokenizer.load_tokenizer(path)` picks by file type: a `.json` file gives an
`HFTokenizer` (through `load_hf_tokenizer`, needs the `tokenizers` package), anything else is a
SentencePiece model.
Both expose `encode(text) -> list[int]` (no special tokens added), `decode(ids) -> str`,
`vocab_size`, `bos_id`, `eos_id`, `pad_id`, and both pickle (for data-loading workers).

Special tokens come from `tokenizer_config.json` next to `tokenizer.json` when present
(`bos_token`, `eos_token`, `pad_token`), else from well-known token strings.
"""

from __future__ import annotations

import json
import os

from lmjax.data import sources as sources_lib

_KNOWN_BOS = ('<s>', '<|begin_of_text|>', '<bos>', '<|startoftext|>')
_KNOWN_EOS = ('</s>', '<|end_of_text|>', '<|endoftext|>', '<eos>', '<|eot_id|>')
_KNOWN_PAD = ('<pad>', '<|pad|>', '<|finetune_right_pad_id|>')


def _token_text(value):
  return value.get('content') if isinstance(value, dict) else value


class HFTokenizer:
  """A `tokenizers.Tokenizer` loaded from `tokenizer.json`."""

  def __init__(self, json_text: str, path: str = '', special_tokens: dict | None = None):
    from tokenizers import Tokenizer as _Tokenizer  # pylint: disable=g-import-not-at-top
    self.path = path
    self._json = json_text
    self._special = dict(special_tokens or {})
    self._tok = _Tokenizer.from_str(json_text)
    self._bos = self._find('bos_token', _KNOWN_BOS)
    self._eos = self._find('eos_token', _KNOWN_EOS)
    self._pad = self._find('pad_token', _KNOWN_PAD)
    if self._eos is None:
      raise sources_lib.DataError(f'data.tokenizer: {path or "tokenizer.json"} has no eos token '
                                  '(set eos_token in tokenizer_config.json)')

  def _find(self, key, known):
    text = _token_text(self._special.get(key))
    candidates = (text,) if text else known
    for token in candidates:
      token_id = self._tok.token_to_id(token) if token else None
      if token_id is not None:
        return token_id
    return None

  def __getstate__(self):
    return {'json_text': self._json, 'path': self.path, 'special_tokens': self._special}

  def __setstate__(self, state):
    self.__init__(**state)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def bos_id(self) -> int:
    """The BOS token; models without one (e.g. Qwen) use EOS as the document separator."""
    return self._eos if self._bos is None else self._bos

  @property
  def eos_id(self) -> int:
    return self._eos

  @property
  def pad_id(self) -> int:
    """The pad token if the tokenizer has one, else 0 (lmjax gives padding weight 0 anyway)."""
    return 0 if self._pad is None else self._pad

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_hf_tokenizer(path: str, vocab_size: int | None = None) -> HFTokenizer:
  if not os.path.isfile(path):
    raise sources_lib.DataError(f'data.tokenizer: no such tokenizer file: {path!r}')
  with open(path, encoding='utf-8') as f:
    json_text = f.read()
  special = {}
  config_path = os.path.join(os.path.dirname(path), 'tokenizer_config.json')
  if os.path.isfile(config_path):
    with open(config_path, encoding='utf-8') as f:
      special = {k: v for k, v in json.load(f).items()
                 if k in ('bos_token', 'eos_token', 'pad_token') and v}
  try:
    tok = HFTokenizer(json_text, path, special)
  except Exception as e:  # tokenizers raises its own exception type on a bad file
    if isinstance(e, sources_lib.DataError):
      raise
    raise sources_lib.DataError(f'data.tokenizer: {path!r} is not a tokenizer.json: {e}') from None
  if vocab_size is not None and tok.vocab_size > vocab_size:
    raise sources_lib.DataError(f'data.tokenizer: {path!r} has {tok.vocab_size} tokens, more than '
                                f'model.vocab_size={vocab_size}')
  return tok
