"""PEFT methods that act inside the forward pass: bottleneck adapters, prefix tuning, prompt tuning
and P-tuning.

Unlike the low-rank methods of `lmjax.peft.lora` they add computation rather than a weight delta,
so they cannot be merged into the base weights. Their trainable leaves live in the post-training
tree under `params['trainable']['adapters']` (layouts below, N = num_layers, P =
`peft.num_virtual_tokens`, r = `peft.adapter_dim`, E = `peft.encoder_dim` or d_model);
`model_peft` turns them into the `peft` pytree `Transformer` reads (see
`lmjax.models.transformer`), which is None-by-default there: the base params tree never changes.
  bottleneck  {'attn'|'mlp': {'down': (N, D, r), 'down_b': (N, r), 'up': (N, r, D),
              'up_b': (N, D)}}: h + up(gelu(down(h))) on the attention and MLP outputs of each
              block; `up`/`up_b` start at zero, so the model starts unchanged.
  prefix      {'k', 'v': (N, P, K, Dh)}: per-layer keys/values every non-padding query attends
              (each packed document sees the whole prefix, never another document). Initialised
              to the base model's own keys/values of P random vocabulary tokens.
  prompt      {'embeddings': (P, D)}: virtual-token embeddings before the input, initialised from
              P random vocabulary embeddings.
  p_tuning    {'seeds': (P, D), 'w1': (D, E), 'b1': (E,), 'w2': (E, D), 'b2': (D,)}: the virtual
              tokens are seeds + MLP(seeds) (a residual prompt encoder: with w2 = 0 it starts as
              prompt tuning from the seeds).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lmjax.config import PEFT_IN_MODEL

METHODS = PEFT_IN_MODEL


def is_hook_method(method: str) -> bool:
  return method in METHODS


def _uniform(key, shape, fan_in):
  bound = 1.0 / math.sqrt(fan_in)  # kaiming-uniform with a = sqrt(5), as nn.Linear
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _random_tokens(cfg, model_cfg, rng):
  # ids >= 1 when the vocabulary allows: 0 is often padding
  low = 1 if model_cfg.vocab_size > 1 else 0
  return jax.random.randint(rng, (cfg.num_virtual_tokens,), low, model_cfg.vocab_size)


def init_leaves(cfg, model_cfg, params, rng) -> dict:
  """Fresh trainable leaves of `cfg.method` for a model of `model_cfg` with base `params`
  (plain arrays, used for the vocabulary-based initialisations)."""
  n, d = model_cfg.num_layers, model_cfg.d_model
  k_init, k_tokens = jax.random.split(rng)
  if cfg.method == 'bottleneck':
    r = cfg.adapter_dim
    keys = jax.random.split(k_init, 2)
    return {name: {'down': _uniform(key, (n, d, r), d), 'down_b': jnp.zeros((n, r), jnp.float32),
                   'up': jnp.zeros((n, r, d), jnp.float32),
                   'up_b': jnp.zeros((n, d), jnp.float32)}
            for name, key in zip(('attn', 'mlp'), keys)}
  tokens_P = _random_tokens(cfg, model_cfg, k_tokens)
  embeddings_PD = jnp.take(params['embed'], tokens_P, axis=0).astype(jnp.float32)
  if cfg.method == 'prefix':
    from lmjax.models.transformer import forward_cached, init_cache  # pylint: disable=g-import-not-at-top
    num = cfg.num_virtual_tokens
    positions = jnp.arange(num, dtype=jnp.int32)[None]
    cache = init_cache(model_cfg, 1, num, jnp.float32)
    _, cache = forward_cached(model_cfg, params, tokens_P[None], positions,
                              jnp.ones_like(positions), cache)
    return {'k': cache['k'][:, 0], 'v': cache['v'][:, 0]}  # (N, P, K, Dh)
  if cfg.method == 'prompt':
    return {'embeddings': embeddings_PD}
  if cfg.method == 'p_tuning':
    e = cfg.encoder_dim or d
    return {'seeds': embeddings_PD, 'w1': _uniform(k_init, (d, e), d),
            'b1': jnp.zeros((e,), jnp.float32), 'w2': jnp.zeros((e, d), jnp.float32),
            'b2': jnp.zeros((d,), jnp.float32)}
  raise ValueError(f'peft.method: {cfg.method!r} is not an in-model PEFT method {METHODS}')


def prompt_encoder(leaves) -> jnp.ndarray:
  """P-tuning's virtual tokens (P, D): seeds + w2 gelu(w1 seeds + b1) + b2."""
  seeds = leaves['seeds'].astype(jnp.float32)
  hidden = jax.nn.gelu(seeds @ leaves['w1'] + leaves['b1'])
  return seeds + hidden @ leaves['w2'] + leaves['b2']


def model_peft(cfg, leaves):
  """The `peft` pytree `Transformer` reads, from the method's leaves (None when disabled)."""
  if not is_hook_method(cfg.method) or not leaves:
    return None
  if cfg.method == 'bottleneck':
    return {'layers': {'adapter': leaves}}
  if cfg.method == 'prefix':
    return {'layers': {'prefix': {'k': leaves['k'], 'v': leaves['v']}}}
  if cfg.method == 'prompt':
    return {'prompt': leaves['embeddings']}
  return {'prompt': prompt_encoder(leaves)}


def merge_error(method: str) -> ValueError:
  return ValueError(
      f'peft.method={method!r} adds computation to the forward pass (not a weight delta) and '
      'cannot be merged into the base weights; export it with `lmjax peft save` instead')
