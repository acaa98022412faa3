"""Per-token log-probabilities of given token sequences (scoring, perplexity, multiple choice).

Sequences are right-padded into fixed-shape batches (lengths rounded up to a bucket, rows padded to
`batch_size`) so that a handful of programs serve any input; padding has segment id 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.models.transformer import ModelConfig, forward


@functools.partial(jax.jit, static_argnames=('model_cfg',))
def next_token_logprobs(model_cfg: ModelConfig, params, tokens_BL, positions_BL, segments_BL):
  """log p(tokens[:, t + 1] | tokens[:, :t + 1]) for t < L - 1, shape (B, L - 1); 0 where the
  target is padding or starts another segment."""
  logits_BLV, _ = forward(model_cfg, params, tokens_BL, positions_BL, segments_BL)
  logits_BLV = logits_BLV[:, :-1].astype(jnp.float32)
  target_BL = tokens_BL[:, 1:]
  target_logit_BL = jnp.take_along_axis(logits_BLV, target_BL[:, :, None], axis=-1)[:, :, 0]
  logp_BL = target_logit_BL - jax.nn.logsumexp(logits_BLV, axis=-1)
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
