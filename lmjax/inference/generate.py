"""Batched generation over a preallocated KV cache: a jitted prefill, then a jitted decode loop.

Prompts of different lengths are left-padded; padding carries segment id 0 so no real token ever
attends it, and each row's positions start at 0 at its first real token (masks by segment id and
position, nothing is recomputed). `prefill` runs the prompts once and returns the cache; `decode`
(sampling: greedy, temperature, top-k, top-p, min-p, repetition penalty) or `beam_search` continues
it inside one `lax.while_loop`, stopping when every row has emitted a stop token or after
`max_new_tokens`. The cache is donated to `decode`, so its buffer is updated in place. Nothing in
the jitted functions touches the host, so sharded params work unchanged (GQA/MQA caches hold one
K/V per kv head).
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.inference.beam import beam_search
from lmjax.inference.sampling import SamplingConfig, choose, filter_logits, sample_tokens
from lmjax.models.transformer import ModelConfig, forward, forward_cached, init_cache

__all__ = ['SamplingConfig', 'decode', 'filter_logits', 'generate', 'generate_without_cache',
           'left_pad', 'prefill', 'sample_tokens']

_log = logging.getLogger(__name__)


def left_pad(prompts: list[list[int]], pad_id: int = 0, multiple: int = 8, width: int = 0):
  """Left-padded tokens, positions (0 at each first real token) and segment ids; the width
  rounds up to `multiple` so that similar prompt lengths share one compiled program (or is
  `width`, when given)."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError('every prompt needs at least one token')
  width = width or -(-max(len(p) for p in prompts) // multiple) * multiple
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  positions = np.zeros_like(tokens)
  segments = np.zeros_like(tokens)
  for row, prompt in enumerate(prompts):
    n = len(prompt)
    tokens[row, width - n:] = prompt
    positions[row, width - n:] = np.arange(n)
    segments[row, width - n:] = 1
  return tokens, positions, segments


@functools.partial(jax.jit, static_argnames=('model_cfg', 'max_len'))
def prefill(model_cfg: ModelConfig, params, tokens_BP, positions_BP, segments_BP, max_len: int):
  """Runs the prompts into a fresh cache of `max_len` slots: (last-token logits_BV, cache)."""
  cache = init_cache(model_cfg, tokens_BP.shape[0], max_len)
  logits_BPV, cache = forward_cached(model_cfg, params, tokens_BP, positions_BP, segments_BP,
                                     cache)
  return logits_BPV[:, -1], cache


@functools.partial(jax.jit, static_argnames=('model_cfg', 'cfg'), donate_argnames=('cache',))
def decode(model_cfg: ModelConfig, cfg: SamplingConfig, params, cache, logits_BV, next_pos_B,
           prompt_BP, prompt_segments_BP, rng):
  """Samples up to `max_new_tokens` tokens per row continuing a prefilled cache.

  `logits_BV` are the logits after each prompt's last token, `next_pos_B` the position of the first
  new token; the prompt tokens feed the repetition penalty. Returns (tokens_BN, logprobs_BN,
  finished_B, lengths_B, cache); a row's entries after its stop token are 0.
  """
  batch, n = logits_BV.shape[0], cfg.max_new_tokens
  stop_ids = jnp.asarray(cfg.stop_ids or (-1,), jnp.int32)
  track_seen = cfg.repetition_penalty != 1.0
  seen_BV = jnp.zeros((batch, model_cfg.vocab_size if track_seen else 1), bool)
  if track_seen:
    seen_BV = seen_BV.at[jnp.arange(batch)[:, None], prompt_BP].max(prompt_segments_BP > 0)

  def emit(s, logits_BV):
    """Chooses the tokens at column `t` from `logits_BV`."""
    rng, key = jax.random.split(s['rng'])
    token_B, logp_B = choose(logits_BV, cfg, key, s['seen'] if track_seen else None)
    live_B = ~s['done']
    token_B = jnp.where(live_B, token_B, 0)
    seen = s['seen'].at[jnp.arange(batch), token_B].set(True) if track_seen else s['seen']
    return dict(
        s, t=s['t'] + 1, rng=rng, token=token_B, seen=seen,
        tokens=s['tokens'].at[:, s['t']].set(token_B),
        logprobs=s['logprobs'].at[:, s['t']].set(jnp.where(live_B, logp_B, 0.0)),
        lengths=s['lengths'] + live_B.astype(jnp.int32),
        done=s['done'] | jnp.isin(token_B, stop_ids))

  def step(s):
    logits_B1V, cache = forward_cached(model_cfg, params, s['token'][:, None], s['pos'][:, None],
                                       jnp.ones((batch, 1), jnp.int32), s['cache'])
    return emit(dict(s, cache=cache, pos=s['pos'] + 1), logits_B1V[:, 0])

  state = {
      't': jnp.zeros((), jnp.int32), 'cache': cache, 'token': jnp.zeros((batch,), jnp.int32),
      'pos': next_pos_B.astype(jnp.int32), 'tokens': jnp.zeros((batch, n), jnp.int32),
      'logprobs': jnp.zeros((batch, n), jnp.float32), 'lengths': jnp.zeros((batch,), jnp.int32),
      'done': jnp.zeros((batch,), bool), 'seen': seen_BV, 'rng': rng,
  }
  state = emit(state, logits_BV)
  state = jax.lax.while_loop(lambda s: (s['t'] < n) & ~jnp.all(s['done']), step, state)
  return state['tokens'], state['logprobs'], state['done'], state['lengths'], state['cache']


def generate(model_cfg: ModelConfig, params, prompts: list[list[int]], cfg: SamplingConfig,
             seed: int = 0, pad_id: int = 0) -> dict:
  """Continues token-id prompts: sampling (`num_beams == 1`) or beam search (`num_beams > 1`).

  Returns numpy arrays: `tokens` (B, max_new_tokens; 0 after a row stops), `logprobs` (the chosen
  tokens' log-probabilities under the temperature-scaled model distribution, before penalties and
  truncation; 0 after a stop), `finished` (B,) whether the row emitted a stop token, and `lengths`
  (tokens up to and including the stop token). Beam search adds `scores` (B,): the best beam's
  length-penalised score. The same seed gives the same output.
  """
  tokens_BP, positions_BP, segments_BP = left_pad(prompts, pad_id)
  longest = max(len(p) for p in prompts) + cfg.max_new_tokens
  if longest > model_cfg.max_seq_len:
    _log.warning('generate: prompt + max_new_tokens reaches %d tokens, beyond model.max_seq_len=%d',
                 longest, model_cfg.max_seq_len)
  max_len = tokens_BP.shape[1] + cfg.max_new_tokens
  logits_BV, cache = prefill(model_cfg, params, tokens_BP, positions_BP, segments_BP,
                             max_len=max_len)
  next_pos_B = np.asarray([len(p) for p in prompts], np.int32)
  if cfg.num_beams > 1:
    return jax.device_get(beam_search(model_cfg, cfg, params, cache, logits_BV, next_pos_B))
  out = decode(model_cfg, cfg, params, cache, logits_BV, next_pos_B, tokens_BP, segments_BP,
               jax.random.key(seed))
  tokens, logprobs, finished, lengths = jax.device_get(out[:4])
  return {'tokens': tokens, 'logprobs': logprobs, 'finished': finished, 'lengths': lengths}


@functools.partial(jax.jit, static_argnames=('model_cfg', 'max_new_tokens', 'buffer_len'))
def generate_without_cache(model_cfg: ModelConfig, params, tokens_BP, positions_BP, segments_BP,
                           max_new_tokens: int, buffer_len: int = 0):
  """Greedy decoding that recomputes the full forward pass every step (no KV cache).

  The baseline of `tools/bench_generate.py`: a fixed buffer of P + max(N, buffer_len) slots (so
  one program serves every step; every step costs the same), the slots not yet written marked as
  padding. Returns the new tokens (B, N).
  """
  p = tokens_BP.shape[1]
  extra = max(max_new_tokens, buffer_len)
  pad = lambda a: jnp.pad(a, ((0, 0), (0, extra)))
  last_pos_B = jnp.max(positions_BP, axis=1)
  positions_BT = pad(positions_BP).at[:, p:].set(last_pos_B[:, None] + 1 + jnp.arange(extra))

  def step(t, carry):
    tokens_BT, segments_BT = carry
    logits_BTV = forward(model_cfg, params, tokens_BT, positions_BT, segments_BT)
    token_B = jnp.argmax(logits_BTV[:, p + t - 1], axis=-1).astype(jnp.int32)
    return tokens_BT.at[:, p + t].set(token_B), segments_BT.at[:, p + t].set(1)

  tokens_BT, _ = jax.lax.fori_loop(0, max_new_tokens, step, (pad(tokens_BP), pad(segments_BP)))
  return tokens_BT[:, p:p + max_new_tokens]
