"""Batched generation over a preallocated KV cache: one jitted prefill + `lax.while_loop` decode.

Prompts of different lengths are left-padded; padding carries segment id 0 so no real token ever
attends it, and each row's positions start at 0 at its first real token. Decoding strategies share
one entry point: greedy (temperature 0), temperature, top-k, top-p (nucleus), min-p and repetition
penalty, all applied to the logits before sampling.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.models.transformer import ModelConfig, forward, init_cache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int = 128
  temperature: float = 0.0  # 0 = greedy
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1 = off
  min_p: float = 0.0  # 0 = off
  repetition_penalty: float = 1.0  # 1 = off
  stop_ids: tuple[int, ...] = ()  # EOS and any other stop tokens


def filter_logits(logits_BV, cfg: SamplingConfig, seen_BV=None):
  """Applies repetition penalty, temperature, top-k, top-p and min-p; masked entries are -inf."""
  logits_BV = logits_BV.astype(jnp.float32)
  if cfg.repetition_penalty != 1.0 and seen_BV is not None:
    penalised = jnp.where(logits_BV > 0, logits_BV / cfg.repetition_penalty,
                          logits_BV * cfg.repetition_penalty)
    logits_BV = jnp.where(seen_BV, penalised, logits_BV)
  if cfg.temperature > 0:
    logits_BV = logits_BV / cfg.temperature
  neg_inf = -jnp.inf
  if cfg.top_k > 0:
    kth_B1 = jax.lax.top_k(logits_BV, cfg.top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, neg_inf, logits_BV)
  if cfg.top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    # the smallest logit still inside the nucleus (the first token is always kept)
    cutoff_B1 = jnp.min(jnp.where(mass_before_BV < cfg.top_p, sorted_BV, jnp.inf), axis=-1,
                        keepdims=True)
    logits_BV = jnp.where(logits_BV < cutoff_B1, neg_inf, logits_BV)
  if cfg.min_p > 0:
    probs_BV = jax.nn.softmax(logits_BV, axis=-1)
    threshold_B1 = cfg.min_p * jnp.max(probs_BV, axis=-1, keepdims=True)
    logits_BV = jnp.where(probs_BV < threshold_B1, neg_inf, logits_BV)
  return logits_BV


def _choose(logits_BV, cfg: SamplingConfig, seen_BV, rng):
  """Next tokens and their log-probabilities under the model's (temperature-scaled) distribution."""
  filtered_BV = filter_logits(logits_BV, cfg, seen_BV)
  if cfg.temperature > 0:
    tokens_B = jax.random.categorical(rng, filtered_BV, axis=-1)
  else:
    tokens_B = jnp.argmax(filtered_BV, axis=-1)
  scale = cfg.temperature if cfg.temperature > 0 else 1.0
  log_probs_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32) / scale, axis=-1)
  return tokens_B, jnp.take_along_axis(log_probs_BV, tokens_B[:, None], axis=-1)[:, 0]


def left_pad(prompts: list[list[int]], pad_id: int = 0, multiple: int = 8):
  """Left-padded tokens, positions and segment ids; the width rounds up to `multiple` so that
  similar prompt lengths share one compiled program."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError('every prompt needs at least one token')
  width = -(-max(len(p) for p in prompts) // multiple) * multiple
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  positions = np.zeros_like(tokens)
  segments = np.zeros_like(tokens)
  for row, prompt in enumerate(prompts):
    n = len(prompt)
    tokens[row, width - n:] = prompt
    positions[row, width - n:] = np.arange(n)
    segments[row, width - n:] = 1
  return tokens, positions, segments


@functools.partial(jax.jit, static_argnames=('model_cfg', 'cfg'))
def _generate(model_cfg: ModelConfig, cfg: SamplingConfig, params, tokens_BP, positions_BP,
              segments_BP, rng):
  batch, prompt_len = tokens_BP.shape
  cache = init_cache(model_cfg, batch, prompt_len + cfg.max_new_tokens)
  logits_BPV, cache = forward(model_cfg, params, tokens_BP, positions_BP, segments_BP, cache)
  seen_BV = jnp.zeros((batch, model_cfg.vocab_size), bool)
  if cfg.repetition_penalty != 1.0:
    seen_BV = seen_BV.at[jnp.arange(batch)[:, None], tokens_BP].max(segments_BP > 0)
  stop_ids = jnp.asarray(cfg.stop_ids or (-1,), jnp.int32)

  def emit(carry, logits_BV):
    """Chooses the next token from `logits_BV` and records it at column `t`."""
    t, cache, _, next_pos_B, out_BN, logp_BN, done_B, seen_BV, rng = carry
    rng, key = jax.random.split(rng)
    token_B, logp_B = _choose(logits_BV, cfg, seen_BV, key)
    token_B = jnp.where(done_B, 0, token_B)
    out_BN = out_BN.at[:, t].set(token_B)
    logp_BN = logp_BN.at[:, t].set(jnp.where(done_B, 0.0, logp_B))
    seen_BV = seen_BV.at[jnp.arange(batch), token_B].set(True)
    done_B = done_B | jnp.isin(token_B, stop_ids)
    return (t + 1, cache, token_B, next_pos_B, out_BN, logp_BN, done_B, seen_BV, rng)

  def decode(carry):
    t, cache, token_B, pos_B = carry[:4]
    logits_B1V, cache = forward(model_cfg, params, token_B[:, None], pos_B[:, None],
                                jnp.ones((batch, 1), jnp.int32), cache)
    carry = (t, cache, token_B, pos_B + 1) + carry[4:]
    return emit(carry, logits_B1V[:, 0])

  def not_done(carry):
    t, done_B = carry[0], carry[6]
    return (t < cfg.max_new_tokens) & ~jnp.all(done_B)

  n = cfg.max_new_tokens
  carry = (jnp.zeros((), jnp.int32), cache, jnp.zeros((batch,), jnp.int32),
           jnp.max(positions_BP, axis=1) + 1, jnp.zeros((batch, n), jnp.int32),
           jnp.zeros((batch, n), jnp.float32), jnp.zeros((batch,), bool), seen_BV, rng)
  carry = emit(carry, logits_BPV[:, -1])
  carry = jax.lax.while_loop(not_done, decode, carry)
  out_BN, logp_BN, done_B = carry[4], carry[5], carry[6]
  return out_BN, logp_BN, done_B


def generate(model_cfg: ModelConfig, params, prompts: list[list[int]], cfg: SamplingConfig,
             seed: int = 0, pad_id: int = 0) -> dict:
  """Samples continuations of token-id prompts.

  Returns numpy arrays: `tokens` (B, max_new_tokens; 0 after a row stops), `logprobs` (the chosen
  tokens' log-probabilities under the temperature-scaled model distribution; 0 after a stop),
  `finished` (B,) whether the row emitted a stop token, and `lengths` (tokens up to and including
  the stop token).
  """
  tokens_BP, positions_BP, segments_BP = left_pad(prompts, pad_id)
  out_BN, logp_BN, done_B = _generate(model_cfg, cfg, params, tokens_BP, positions_BP,
                                      segments_BP, jax.random.key(seed))
  out_BN, logp_BN, done_B = jax.device_get((out_BN, logp_BN, done_B))
  lengths = np.full(len(prompts), cfg.max_new_tokens)
  for row in range(len(prompts)):
    stops = np.nonzero(np.isin(out_BN[row], cfg.stop_ids))[0] if cfg.stop_ids else []
    if len(stops):
      lengths[row] = stops[0] + 1
  return {'tokens': out_BN, 'logprobs': logp_BN, 'finished': done_B, 'lengths': lengths}
