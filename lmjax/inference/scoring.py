"""Per-token log-probabilities of given token sequences (scoring, perplexity, multiple choice).

Sequences are right-padded into fixed-shape batches (lengths rounded up to a bucket, rows padded to
`batch_size`) so that a handful of programs serve any input; padding has segment id 0.

`score_jsonl` scores the records of a JSONL file with a workdir's model (`lmjax score`): each
record has `text` (encoded as `[bos] + encode(text)`) or `tokens` (a list of ids, used as given).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import losses
from lmjax.data.jsonl import read_jsonl
from lmjax.data.sources import DataError
from lmjax.models.transformer import ModelConfig, forward


@functools.partial(jax.jit, static_argnames=('model_cfg',))
def next_token_logprobs(model_cfg: ModelConfig, params, tokens_BL, positions_BL, segments_BL):
  """log p(tokens[:, t + 1] | tokens[:, :t + 1]) for t < L - 1, shape (B, L - 1); 0 where the
  target is padding or starts another segment."""
  logits_BLV = forward(model_cfg, params, tokens_BL, positions_BL, segments_BL)
  logp_BL = losses.token_log_probs(logits_BLV[:, :-1], tokens_BL[:, 1:])
  valid_BL = (segments_BL[:, 1:] == segments_BL[:, :-1]) & (segments_BL[:, 1:] > 0)
  return jnp.where(valid_BL, logp_BL, 0.0)


def _bucket(length: int, bucket: int) -> int:
  return -(-length // bucket) * bucket


def score_sequences(model_cfg: ModelConfig, params, sequences: list[list[int]],
                    batch_size: int = 8, bucket: int = 64) -> list[np.ndarray]:
  """For each sequence, the log-probabilities of its tokens after the first (length n - 1), in
  the input order. Similar lengths are batched together; each sequence is its own segment."""
  too_long = [i for i, s in enumerate(sequences) if len(s) > model_cfg.max_seq_len]
  if too_long:
    raise ValueError(f'sequence {too_long[0]} has {len(sequences[too_long[0]])} tokens, more than '
                     f'model.max_seq_len={model_cfg.max_seq_len}')
  results: list[np.ndarray | None] = [None] * len(sequences)
  for i, seq in enumerate(sequences):
    if len(seq) < 2:
      results[i] = np.zeros((0,), np.float32)
  order = sorted((i for i, s in enumerate(sequences) if len(s) >= 2),
                 key=lambda i: len(sequences[i]))
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    width = min(_bucket(max(len(sequences[i]) for i in rows), bucket), model_cfg.max_seq_len)
    tokens = np.zeros((batch_size, width), np.int32)
    segments = np.zeros_like(tokens)
    for r, i in enumerate(rows):
      tokens[r, :len(sequences[i])] = sequences[i]
      segments[r, :len(sequences[i])] = 1
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape)
    logp = np.asarray(jax.device_get(next_token_logprobs(model_cfg, params, tokens, positions,
                                                         segments)))
    for r, i in enumerate(rows):
      results[i] = logp[r, :len(sequences[i]) - 1]
  return results


def record_tokens(record, tokenizer, vocab_size: int) -> list[int]:
  """The token ids of one `score_jsonl` record: its `tokens`, or `[bos] + encode(text)`."""
  if isinstance(record, dict) and isinstance(record.get('tokens'), list):
    ids = record['tokens']
    if not all(isinstance(t, int) and 0 <= t < vocab_size for t in ids):
      raise DataError(f'"tokens" must be ids in [0, {vocab_size})')
    return list(ids)
  if isinstance(record, dict) and isinstance(record.get('text'), str):
    return [tokenizer.bos_id] + tokenizer.encode(record['text'])
  raise DataError('needs "text" (str) or "tokens" (list of ids)')


def score_jsonl(workdir: str, config, path: str, batch_size: int = 8) -> list[dict]:
  """Each record of the JSONL file `path`, with `tokens`, `logprobs` (log p of each token after
  the first, given the ones before it) and `sum_logprob` added, scored by the workdir's model.
  A bad record or a sequence too long for the model is a DataError naming the file."""
  from lmjax import data as data_lib  # pylint: disable=g-import-not-at-top
  from lmjax.tasks import load_model  # pylint: disable=g-import-not-at-top
  vocab_size = config.model.vocab_size
  tokenizer = []  # loaded at the first text record: token-id input needs no tokenizer

  class _Lazy:
    def __getattr__(self, name):
      if not tokenizer:
        tokenizer.append(data_lib.load_or_train_tokenizer(config.data, vocab_size))
      return getattr(tokenizer[0], name)

  pairs = read_jsonl(path, encode=lambda r: (r, record_tokens(r, _Lazy(), vocab_size)))
  model_cfg, params = load_model(workdir, config)
  try:
    logps = score_sequences(model_cfg, params, [ids for _, ids in pairs], batch_size)
  except ValueError as e:
    raise DataError(f'{path}: {e}') from None
  out = []
  for (record, ids), logp in zip(pairs, logps):
    values = [float(x) for x in logp]
    out.append({**record, 'tokens': ids, 'logprobs': values, 'sum_logprob': float(sum(values))})
  return out
