"""Beam search over a KV cache, one compiled `lax.while_loop`.

Each prompt keeps `W = num_beams` live beams (rows `b * W + w` of the cache) and a pool of up to `W`
finished hypotheses. Every step expands each live beam by every token, keeps the best
`W * (1 + len(stop_ids))` candidates by summed log-probability (enough that `W` of them are not stop
tokens), moves the ones that end in a stop token into the pool (ranked by the length-penalised
score `sum_logprob / length ** length_penalty`, length = generated tokens including the stop token),
and continues the best `W` others; the cache rows follow their parents.

A prompt is finished when its pool is full and no live beam can still beat the pool's worst score:
log-probabilities are <= 0, so a live beam's score can only fall and its best possible penalised
score is bounded (by its length at `max_new_tokens` when `length_penalty > 0`, by the next length
when it is < 0). After `max_new_tokens` the live beams join the pool and the best hypothesis wins.
With a beam at least as wide as the number of distinct prefixes this is exhaustive search.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lmjax.inference.sampling import SamplingConfig
from lmjax.models.transformer import ModelConfig, forward_cached


def repeat_rows(cache, width: int):
  """Each batch row of a KV cache repeated `width` times (row b -> rows b*width ... b*width+width-1)."""
  return {'k': jnp.repeat(cache['k'], width, axis=1), 'v': jnp.repeat(cache['v'], width, axis=1),
          'segment_ids': jnp.repeat(cache['segment_ids'], width, axis=0),
          'positions': jnp.repeat(cache['positions'], width, axis=0), 'index': cache['index']}


def take_rows(cache, rows_R):
  """The cache rows `rows_R` (a beam's new parents)."""
  return {'k': jnp.take(cache['k'], rows_R, axis=1), 'v': jnp.take(cache['v'], rows_R, axis=1),
          'segment_ids': jnp.take(cache['segment_ids'], rows_R, axis=0),
          'positions': jnp.take(cache['positions'], rows_R, axis=0), 'index': cache['index']}


def _gather(values_BC, pick_BW):
  """values[b, pick[b, w], ...] for per-row index arrays with trailing dimensions."""
  extra = values_BC.ndim - 2
  return jnp.take_along_axis(values_BC, pick_BW.reshape(pick_BW.shape + (1,) * extra), axis=1)


@functools.partial(jax.jit, static_argnames=('model_cfg', 'cfg'))
def beam_search(model_cfg: ModelConfig, cfg: SamplingConfig, params, cache, logits_BV, next_pos_B):
  """Beam search continuing a prefilled cache (`logits_BV`: the prompts' last-token logits).

  Returns the best hypothesis per prompt: tokens (B, N; 0 after its end), per-token log-probs,
  finished (ended in a stop token), lengths and its length-penalised score.
  """
  batch, vocab = logits_BV.shape
  width, n = cfg.num_beams, cfg.max_new_tokens
  num_cand = min(width * (1 + len(cfg.stop_ids)), width * vocab)
  stop_ids = jnp.asarray(cfg.stop_ids or (-1,), jnp.int32)
  neg_inf = -jnp.inf
  norm = lambda length: jnp.asarray(length, jnp.float32) ** cfg.length_penalty

  state = {
      't': jnp.zeros((), jnp.int32),
      'cache': repeat_rows(cache, width),
      'logp': jnp.broadcast_to(jax.nn.log_softmax(logits_BV.astype(jnp.float32))[:, None],
                               (batch, width, vocab)),
      'pos': next_pos_B.astype(jnp.int32),
      # the W identical beams of the prefill: only the first one may expand at step 0
      'live_score': jnp.full((batch, width), neg_inf).at[:, 0].set(0.0),
      'live_tokens': jnp.zeros((batch, width, n), jnp.int32),
      'live_logp': jnp.zeros((batch, width, n), jnp.float32),
      'fin_score': jnp.full((batch, width), neg_inf),
      'fin_tokens': jnp.zeros((batch, width, n), jnp.int32),
      'fin_logp': jnp.zeros((batch, width, n), jnp.float32),
      'fin_len': jnp.zeros((batch, width), jnp.int32),
      'done': jnp.zeros((batch,), bool),
  }

  def body(s):
    t = s['t']
    cand_BWV = s['live_score'][:, :, None] + s['logp']
    cand_score_BC, flat_BC = jax.lax.top_k(cand_BWV.reshape(batch, width * vocab), num_cand)
    parent_BC, token_BC = flat_BC // vocab, (flat_BC % vocab).astype(jnp.int32)
    token_logp_BC = jnp.take_along_axis(s['logp'].reshape(batch, -1), flat_BC, axis=1)
    tokens_BCN = _gather(s['live_tokens'], parent_BC).at[:, :, t].set(token_BC)
    logps_BCN = _gather(s['live_logp'], parent_BC).at[:, :, t].set(token_logp_BC)
    is_stop_BC = jnp.isin(token_BC, stop_ids)

    # finished hypotheses: merge the candidates that end in a stop token into the pool
    new_fin_BC = jnp.where(is_stop_BC, cand_score_BC / norm(t + 1), neg_inf)
    pool_score = jnp.concatenate([s['fin_score'], new_fin_BC], axis=1)
    fin_score_BW, pick_BW = jax.lax.top_k(pool_score, width)
    cat = lambda old, new: _gather(jnp.concatenate([old, new], axis=1), pick_BW)
    fin_len_BC = jnp.full(token_BC.shape, t + 1, jnp.int32)

    # live beams: the best candidates that do not stop; the cache rows follow their parents
    live_score_BW, keep_BW = jax.lax.top_k(jnp.where(is_stop_BC, neg_inf, cand_score_BC), width)
    rows_R = (jnp.arange(batch)[:, None] * width + _gather(parent_BC, keep_BW)).reshape(-1)
    next_token_R = _gather(token_BC, keep_BW).reshape(-1)
    pos_R = jnp.repeat(s['pos'], width)
    logits_R1V, cache = forward_cached(model_cfg, params, next_token_R[:, None], pos_R[:, None],
                                       jnp.ones((batch * width, 1), jnp.int32),
                                       take_rows(s['cache'], rows_R))
    logp_BWV = jax.nn.log_softmax(logits_R1V[:, 0].astype(jnp.float32)).reshape(
        batch, width, vocab)

    # finished when the pool is full and no live beam can reach its worst score
    best_live_B = jnp.max(live_score_BW, axis=1)
    if cfg.length_penalty > 0:
      bound_B = best_live_B / norm(n)
    elif cfg.length_penalty < 0:
      bound_B = best_live_B / norm(t + 2)
    else:
      bound_B = best_live_B
    pool_full_B = jnp.all(jnp.isfinite(fin_score_BW), axis=1)
    done_B = s['done'] | ~jnp.isfinite(best_live_B) | (
        pool_full_B & (bound_B <= jnp.min(fin_score_BW, axis=1)))
    return {
        't': t + 1, 'cache': cache, 'logp': logp_BWV, 'pos': s['pos'] + 1,
        'live_score': live_score_BW, 'live_tokens': _gather(tokens_BCN, keep_BW),
        'live_logp': _gather(logps_BCN, keep_BW),
        'fin_score': fin_score_BW, 'fin_tokens': cat(s['fin_tokens'], tokens_BCN),
        'fin_logp': cat(s['fin_logp'], logps_BCN), 'fin_len': cat(s['fin_len'], fin_len_BC),
        'done': done_B,
    }

  s = jax.lax.while_loop(lambda s: (s['t'] < n) & ~jnp.all(s['done']), body, state)
  steps = s['t']
  scores = jnp.concatenate([s['fin_score'], s['live_score'] / norm(steps)], axis=1)
  best_B1 = jnp.argmax(scores, axis=1)[:, None]
  pick = lambda fin, live: _gather(jnp.concatenate([fin, live], axis=1), best_B1)[:, 0]
  lengths_B = pick(s['fin_len'], jnp.full((batch, width), steps, jnp.int32))
  return {
      'tokens': pick(s['fin_tokens'], s['live_tokens']),
      'logprobs': pick(s['fin_logp'], s['live_logp']),
      'finished': best_B1[:, 0] < width,
      'lengths': lengths_B,
      'scores': _gather(scores, best_B1)[:, 0],
  }
