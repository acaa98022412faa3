"""Decoding options and the per-step token choice: repetition penalty, temperature, top-k, top-p
(nucleus), min-p, then greedy argmax or a categorical sample. Everything here is pure and jittable.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Static (hashable) decoding options; one compiled program per distinct value."""
  max_new_tokens: int = 128
  temperature: float = 0.0  # 0 = greedy
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1 = off
  min_p: float = 0.0  # 0 = off
  repetition_penalty: float = 1.0  # 1 = off (CTRL-style: divide positive logits, multiply negative)
  stop_ids: tuple[int, ...] = ()  # EOS and any other stop tokens
  num_beams: int = 1  # > 1 = beam search (deterministic; the sampling options must be off)
  length_penalty: float = 1.0  # beam score = sum of log-probs / (generated tokens ** length_penalty)

  def __post_init__(self):
    problems = []
    if self.max_new_tokens < 1:
      problems.append(f'max_new_tokens must be positive; got {self.max_new_tokens}')
    if self.temperature < 0:
      problems.append(f'temperature must be non-negative; got {self.temperature}')
    if self.top_k < 0:
      problems.append(f'top_k must be non-negative; got {self.top_k}')
    if not 0.0 < self.top_p <= 1.0:
      problems.append(f'top_p must be in (0, 1]; got {self.top_p}')
    if not 0.0 <= self.min_p < 1.0:
      problems.append(f'min_p must be in [0, 1); got {self.min_p}')
    if self.repetition_penalty <= 0:
      problems.append(f'repetition_penalty must be positive; got {self.repetition_penalty}')
    if self.num_beams < 1:
      problems.append(f'num_beams must be positive; got {self.num_beams}')
    if self.num_beams > 1 and (self.temperature > 0 or self.top_k or self.top_p < 1.0 or
                               self.min_p or self.repetition_penalty != 1.0):
      problems.append('num_beams > 1 (beam search) takes no sampling options: set temperature=0, '
                      'top_k=0, top_p=1, min_p=0 and repetition_penalty=1')
    if problems:
      raise ValueError('; '.join(problems))


def filter_logits(logits_BV, cfg: SamplingConfig, seen_BV=None):
  """Applies repetition penalty, temperature, top-k, top-p and min-p; removed entries are -inf.

  The order is that of the options above. Top-p keeps the smallest set of most likely tokens whose
  probability reaches `top_p` (the most likely token always stays); min-p drops the tokens whose
  probability is below `min_p` times the largest one's.
  """
  logits_BV = logits_BV.astype(jnp.float32)
  if cfg.repetition_penalty != 1.0 and seen_BV is not None:
    penalised_BV = jnp.where(logits_BV > 0, logits_BV / cfg.repetition_penalty,
                             logits_BV * cfg.repetition_penalty)
    logits_BV = jnp.where(seen_BV, penalised_BV, logits_BV)
  if cfg.temperature > 0:
    logits_BV = logits_BV / cfg.temperature
  neg_inf = -jnp.inf
  if cfg.top_k > 0 and cfg.top_k < logits_BV.shape[-1]:
    kth_B1 = jax.lax.top_k(logits_BV, cfg.top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, neg_inf, logits_BV)
  if cfg.top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    # the smallest logit still inside the nucleus (the first token is always kept)
    inside_BV = (mass_before_BV < cfg.top_p) | (jnp.arange(sorted_BV.shape[-1]) == 0)
    cutoff_B1 = jnp.min(jnp.where(inside_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < cutoff_B1, neg_inf, logits_BV)
  if cfg.min_p > 0:
    probs_BV = jax.nn.softmax(logits_BV, axis=-1)
    threshold_B1 = cfg.min_p * jnp.max(probs_BV, axis=-1, keepdims=True)
    logits_BV = jnp.where(probs_BV < threshold_B1, neg_inf, logits_BV)
  return logits_BV


def sample_tokens(logits_BV, cfg: SamplingConfig, rng, seen_BV=None):
  """One token per row: argmax of the filtered logits when `temperature` is 0, else a sample."""
  filtered_BV = filter_logits(logits_BV, cfg, seen_BV)
  if cfg.temperature > 0:
    return jax.random.categorical(rng, filtered_BV, axis=-1).astype(jnp.int32)
  return jnp.argmax(filtered_BV, axis=-1).astype(jnp.int32)


def choose(logits_BV, cfg: SamplingConfig, rng, seen_BV=None):
  """Next tokens and their log-probabilities under the temperature-scaled model distribution
  (before repetition penalty and truncation: what a policy-gradient update needs)."""
  tokens_B = sample_tokens(logits_BV, cfg, rng, seen_BV)
  scale = cfg.temperature if cfg.temperature > 0 else 1.0
  log_probs_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32) / scale, axis=-1)
  return tokens_B, jnp.take_along_axis(log_probs_BV, tokens_B[:, None], axis=-1)[:, 0]
