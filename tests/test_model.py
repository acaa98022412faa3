"""Model properties: causality, document isolation, scan/remat equivalence, attention masks."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.models import attention as attention_lib
from lmjax.models.transformer import ModelConfig, forward, init_params

CFG = ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=48)


def _params(cfg=CFG, seed=0):
  return nn.unbox(init_params(cfg, jax.random.key(seed)))


def _inputs(batch=2, length=12, seed=1, vocab=64):
  tokens = jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab)
  positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
  return tokens, positions, jnp.ones((batch, length), jnp.int32)


def test_future_tokens_never_reach_past_logits():
  params = _params()
  tokens, positions, segments = _inputs()
  t = 6
  # past tokens use ids < 32, future ones ids >= 32: the future's embedding rows get no gradient
  tokens = jnp.concatenate([tokens[:, :t] % 32, 32 + tokens[:, t:] % 32], axis=1)

  def past_logits(p):
    return forward(CFG, p, tokens, positions, segments)[0][:, :t].sum()

  grad_embed = jax.grad(past_logits)(params)['embed']
  assert np.abs(grad_embed[:32]).max() > 0
  np.testing.assert_array_equal(grad_embed[32:], 0.0)
  changed = tokens.at[:, t:].set((tokens[:, t:] + 7) % 64)
  np.testing.assert_array_equal(forward(CFG, params, tokens, positions, segments)[0][:, :t],
                                forward(CFG, params, changed, positions, segments)[0][:, :t])


def test_packed_documents_are_isolated():
  params = _params()
  doc1 = jnp.array([5, 9, 2, 7, 1])
  doc2 = jnp.array([3, 3, 8, 4, 6, 10, 11])
  tokens = jnp.concatenate([doc1, doc2])[None]
  positions = jnp.concatenate([jnp.arange(5), jnp.arange(7)])[None]
  segments = jnp.concatenate([jnp.ones(5, jnp.int32), 2 * jnp.ones(7, jnp.int32)])[None]
  packed = forward(CFG, params, tokens, positions, segments)[0][0]
  other = forward(CFG, params, tokens.at[0, 5:].set(0), positions, segments)[0][0]
  np.testing.assert_array_equal(packed[:5], other[:5])
  alone = forward(CFG, params, doc2[None], jnp.arange(7)[None], jnp.ones((1, 7), jnp.int32))[0][0]
  np.testing.assert_allclose(packed[5:], alone, atol=1e-5)


def _stack_layers(params, num_layers):
  layers = [params.pop(f'layers_{i}') for i in range(num_layers)]
  return dict(params, layers=jax.tree.map(lambda *x: jnp.stack(x), *layers))


@pytest.mark.parametrize('remat', ['none', 'full'])
def test_scan_equals_unrolled_values_and_grads(remat):
  params = _params()
  scan_cfg = dataclasses.replace(CFG, scan_layers=True, remat=remat)
  scan_params = _stack_layers(dict(params), CFG.num_layers)
  tokens, positions, segments = _inputs()
  loss = lambda cfg: lambda p: jnp.mean(forward(cfg, p, tokens, positions, segments)[0] ** 2)
  value, grads = jax.value_and_grad(loss(CFG))(params)
  scan_value, scan_grads = jax.value_and_grad(loss(scan_cfg))(scan_params)
  np.testing.assert_allclose(value, scan_value, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               _stack_layers(dict(grads), CFG.num_layers), scan_grads)


@pytest.mark.parametrize('remat', ['full', 'dots', 'dots_saveable', 'minimal'])
def test_remat_equals_no_remat(remat):
  params = _params()
  tokens, positions, segments = _inputs()
  loss = lambda cfg: lambda p: jnp.mean(forward(cfg, p, tokens, positions, segments)[0] ** 2)
  value, grads = jax.value_and_grad(loss(CFG))(params)
  remat_value, remat_grads = jax.value_and_grad(loss(dataclasses.replace(CFG, remat=remat)))(params)
  np.testing.assert_allclose(value, remat_value, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads,
               remat_grads)


def _naive_attention(q, k, v, mask):
  """Repeats K/V per query head and loops over nothing clever: an independent reference."""
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  scores = np.einsum('blhd,bshd->bhls', q, k) / np.sqrt(q.shape[-1])
  scores = np.where(mask[:, None], scores, -np.inf)
  peak = np.max(np.where(np.isfinite(scores), scores, -1e30), axis=-1, keepdims=True)
  weights = np.where(mask[:, None], np.exp(scores - peak), 0.0)
  weights = weights / np.maximum(weights.sum(-1, keepdims=True), 1e-30)
  return np.einsum('bhls,bshd->blhd', weights, v)


@pytest.mark.parametrize('heads,kv_heads,window', [(4, 4, 0), (4, 2, 0), (4, 1, 3), (2, 2, 5)])
def test_xla_attention_matches_naive(heads, kv_heads, window):
  rng = np.random.default_rng(0)
  b, length, dh = 2, 10, 8
  q = rng.normal(size=(b, length, heads, dh)).astype(np.float32)
  k = rng.normal(size=(b, length, kv_heads, dh)).astype(np.float32)
  v = rng.normal(size=(b, length, kv_heads, dh)).astype(np.float32)
  segments = np.array([[1] * 4 + [2] * 6, [0] * 3 + [1] * 7], np.int32)
  positions = np.array([list(range(4)) + list(range(6)), list(range(3)) + list(range(7))], np.int32)
  out = attention_lib.attention(q, k, v, segment_ids_BL=segments, positions_BL=positions,
                                sliding_window=window)
  i, j = np.arange(length)[:, None], np.arange(length)[None]
  mask = (segments[:, :, None] == segments[:, None, :]) & (j <= i)
  if window:
    mask &= (positions[:, :, None] - positions[:, None, :]) < window
  np.testing.assert_allclose(out, _naive_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_fully_masked_query_outputs_zero():
  q = jnp.ones((1, 2, 1, 4))
  k = v = jnp.ones((1, 3, 1, 4))
  mask = jnp.array([[[True, True, False], [False, False, False]]])
  out = attention_lib.xla_attention(q, k, v, mask)
  np.testing.assert_array_equal(out[0, 1], 0.0)
  assert np.all(np.isfinite(jax.grad(lambda q: attention_lib.xla_attention(q, k, v, mask).sum())(q)))


def test_tied_embeddings_share_the_table():
  cfg = dataclasses.replace(CFG, tie_embeddings=True)
  params = _params(cfg)
  assert 'lm_head' not in params
  tokens, positions, segments = _inputs()
  logits = forward(cfg, params, tokens, positions, segments)[0]
  hidden_grad = jax.grad(lambda p: forward(cfg, p, tokens, positions, segments)[0].sum())(params)
  assert logits.shape == (2, 12, 64) and np.abs(hidden_grad['embed']).max() > 0


def test_bfloat16_compute_stays_close_to_float32():
  params = _params()
  tokens, positions, segments = _inputs()
  ref = forward(CFG, params, tokens, positions, segments)[0]
  low = forward(dataclasses.replace(CFG, dtype=jnp.bfloat16), params, tokens, positions, segments)[0]
  assert low.dtype == jnp.float32
  np.testing.assert_allclose(low, ref, atol=0.05)
