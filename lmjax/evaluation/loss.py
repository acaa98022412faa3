"""Held-out loss and perplexity (shared with the training loop) and bits per byte of documents.

Document-level perplexity and bits per byte (`text_perplexity`): each document is encoded as
`[bos] + tokens` (no EOS: the evaluated text is exactly the document) and cut into windows of
`window + 1` tokens that overlap by one token, so every token after BOS is predicted exactly once,
from the context inside its window (positions restart at 0 per window, as in training).
`bits_per_byte = total NLL (nats) / ln 2 / total UTF-8 bytes of the documents`: it does not depend
on the tokenizer. `loss` is the mean NLL per predicted token and `perplexity = exp(loss)`.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from lmjax.inference.scoring import score_sequences


def held_out_loss(eval_fn, params, batches, to_device=lambda batch: batch) -> dict:
  """Token-weighted mean loss, perplexity = exp(loss), and the token count over `batches`.

  `eval_fn(params, batch)` returns the sums {'nll', 'weight'}; `to_device` places a host batch.
  """
  nll = weight = 0.0
  for batch in batches:
    sums = jax.device_get(eval_fn(params, to_device(batch)))
    nll += float(sums['nll'])
    weight += float(sums['weight'])
  loss = nll / max(weight, 1.0)
  return {'loss': loss, 'perplexity': float(np.exp(loss)), 'tokens': weight}


def text_windows(ids: list[int], window: int) -> list[list[int]]:
  """Windows of `window + 1` tokens overlapping by one: each token after the first is a target in
  exactly one window."""
  return [ids[start:start + window + 1] for start in range(0, max(len(ids) - 1, 0), window)]


def text_perplexity(model_cfg, params, tokenizer, texts: list[str], window: int,
                    batch_size: int = 8) -> dict:
  """Loss, perplexity and bits per byte of `texts` (see the module docstring)."""
  window = min(window, model_cfg.max_seq_len - 1)
  sequences, num_bytes = [], 0
  for text in texts:
    num_bytes += len(text.encode('utf-8'))
    sequences.extend(text_windows([tokenizer.bos_id] + tokenizer.encode(text), window))
  logps = score_sequences(model_cfg, params, sequences, batch_size, bucket=window + 1)
  nll = -sum(float(np.sum(lp, dtype=np.float64)) for lp in logps)
  tokens = sum(len(lp) for lp in logps)
  loss = nll / max(tokens, 1)
  return {'loss': loss, 'perplexity': math.exp(loss), 'bits_per_byte': nll / math.log(2) /
          max(num_bytes, 1), 'tokens': tokens, 'bytes': num_bytes, 'documents': len(texts)}
