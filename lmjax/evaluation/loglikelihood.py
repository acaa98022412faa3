"""Log-likelihoods of continuations given contexts, in a few fixed shapes (what lm-eval's
`loglikelihood` asks of a model, and what built-in multiple choice needs).

A request is a pair of token lists (context, continuation). As in lm-eval's Hugging Face backend,
a pair longer than `max_length + 1` tokens loses tokens from the left; the model reads
`(context + continuation)[:-1]` and the continuation's log-probability is the sum over its tokens;
`is_greedy` says whether each continuation token is the argmax at its position.

Batches always have `rows` rows (padded with empty rows) and a width from `length_buckets`, so
one program serves every request of a bucket: at most one compile per bucket. With a mesh the
rows are split over its batch axes (the params stay as they are placed).
"""

from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmjax import losses
from lmjax.models.transformer import ModelConfig, forward


def length_buckets(max_length: int, smallest: int = 16) -> tuple[int, ...]:
  """Widths 16, 24, 32, 48, 64, 96, ... (powers of two and 1.5x them) below `max_length`, then
  `max_length` itself: padding adds at most half a row (a third past the smallest widths)."""
  widths, width = set(), smallest
  while width < max_length:
    widths.update((width, width * 3 // 2))
    width *= 2
  return tuple(sorted(w for w in widths if w < max_length)) + (max_length,)


def bucket_width(length: int, buckets: tuple[int, ...]) -> int:
  """The smallest bucket that holds `length` tokens."""
  for width in buckets:
    if width >= length:
      return width
  raise ValueError(f'{length} tokens exceed the largest bucket ({buckets[-1]})')


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """(context tokens, continuation tokens) as lm-eval's Hugging Face backend splits them: the
  context's trailing spaces move to the continuation, `[bos] + encode(context + continuation)` is
  encoded once and split after the context's own tokens; an empty context is `[bos]`."""
  if not context:
    return [tokenizer.bos_id], list(tokenizer.encode(continuation))
  stripped = context.rstrip()
  context, continuation = stripped, context[len(stripped):] + continuation
  whole = [tokenizer.bos_id] + list(tokenizer.encode(context + continuation))
  n = 1 + len(tokenizer.encode(context))
  return whole[:n], whole[n:]


@functools.partial(jax.jit, static_argnames=('model_cfg',))
def token_scores(model_cfg: ModelConfig, params, inputs_BL, targets_BL, segments_BL):
  """(log p(target | inputs up to it), whether the target is the argmax), both (B, L)."""
  positions_BL = jnp.broadcast_to(jnp.arange(inputs_BL.shape[1], dtype=jnp.int32),
                                  inputs_BL.shape)
  logits_BLV = forward(model_cfg, params, inputs_BL, positions_BL, segments_BL)
  logp_BL = losses.token_log_probs(logits_BLV, targets_BL)
  greedy_BL = jnp.argmax(logits_BLV, axis=-1) == targets_BL
  return logp_BL, greedy_BL


class Scorer:
  """Scores (context, continuation) token pairs with fixed-shape batches.

  `mesh` (optional): the params are laid out on it (by `rules`, the logical-axis rules) and each
  batch's rows are split over its batch axes; `rows` rounds up to a multiple of their size.
  """

  def __init__(self, model_cfg: ModelConfig, params, rows: int = 16, max_length: int = 0,
               mesh=None, rules=()):
    self.model_cfg, self.params, self.mesh, self.rules = model_cfg, params, mesh, tuple(rules)
    self.max_length = max_length or model_cfg.max_seq_len
    shards = 1
    if mesh is not None:
      from lmjax.parallel.mesh import BATCH_AXES  # pylint: disable=g-import-not-at-top
      shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    self.rows = -(-max(rows, 1) // shards) * shards
    self.buckets = length_buckets(self.max_length)

  def context(self):
    """Where programs over the params run: the mesh and its logical-axis rules, if any."""
    if self.mesh is None:
      return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(list(self.rules)))
    return stack

  def place(self, array):
    """A host batch (rows first) on the device(s): its rows split over the mesh's batch axes."""
    if self.mesh is None:
      return array
    from lmjax.parallel.mesh import batch_sharding  # pylint: disable=g-import-not-at-top
    return jax.device_put(array, batch_sharding(self.mesh))

  def rows_scores(self, rows: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per token sequence (2 <= length <= max_length + 1): (log-probs, greedy flags) of its
    tokens after the first, float64 / bool, in the input order."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out: list = [None] * len(rows)
    for start in range(0, len(order), self.rows):
      chunk = order[start:start + self.rows]
      width = bucket_width(max(len(rows[i]) for i in chunk) - 1, self.buckets)
      inputs = np.zeros((self.rows, width), np.int32)
      targets = np.zeros_like(inputs)
      segments = np.zeros_like(inputs)
      for r, i in enumerate(chunk):
        n = len(rows[i]) - 1
        inputs[r, :n], targets[r, :n], segments[r, :n] = rows[i][:-1], rows[i][1:], 1
      with self.context():
        logp, greedy = token_scores(self.model_cfg, self.params, self.place(inputs),
                                    self.place(targets), self.place(segments))
      logp, greedy = jax.device_get((logp, greedy))
      for r, i in enumerate(chunk):
        n = len(rows[i]) - 1
        out[i] = (np.asarray(logp[r, :n], np.float64), np.asarray(greedy[r, :n]))
    return out

  def loglikelihoods(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(sum of the continuation's log-probs, whether it is the greedy continuation) per
    (context, continuation) pair; the context must not be empty, nor the continuation."""
    rows = []
    for context, continuation in pairs:
      if not context or not continuation:
        raise ValueError('a request needs a context and a continuation of at least one token')
      rows.append((list(context) + list(continuation))[-(self.max_length + 1):])
    results = []
    for (_, continuation), (logp, greedy) in zip(pairs, self.rows_scores(rows)):
      n = min(len(continuation), len(logp))
      results.append((float(np.sum(logp[-n:])), bool(np.all(greedy[-n:]))))
    return results

  def compiles(self) -> int:
    """Programs compiled so far for scoring (all shapes, all models of this process)."""
    return token_scores._cache_size()  # pylint: disable=protected-access
