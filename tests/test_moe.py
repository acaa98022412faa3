"""Mixture of experts (`lmjax.models.moe`): the layer against independent references, routing
losses against closed forms, dispatch paths against each other, the decoder with MoE layers."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import config as config_lib
from lmjax.models import moe as moe_lib
from lmjax.models.layers import MLP
from lmjax.models.moe import MoE, MoeConfig
from lmjax.models import transformer
from lmjax.models.transformer import ModelConfig, init_cache, init_params

D, F = 16, 24
forward = jax.jit(transformer.forward, static_argnums=0)
forward_moe = jax.jit(transformer.forward_moe, static_argnums=0)
forward_cached = jax.jit(transformer.forward_cached, static_argnums=0)


def _layer(moe, dtype=jnp.float32):
  return MoE(moe, D, F, 0.3, 0.3, dtype, jnp.float32)


def _init(moe, x_TD, seed=0):
  return nn.unbox(jax.jit(_layer(moe).init)(jax.random.key(seed), x_TD)['params'])


def _params(cfg):
  return nn.unbox(jax.jit(lambda key: init_params(cfg, key))(jax.random.key(0)))


def _x(tokens=12, seed=1):
  return jax.random.normal(jax.random.key(seed), (tokens, D))


def _silu(x):
  return x / (1 + np.exp(-x))


def _numpy_moe(moe, p, x_TD):
  """A per-token loop over experts in numpy (softmax_topk router)."""
  x = np.asarray(x_TD, np.float64)
  logits = x @ np.asarray(p['router'], np.float64)
  out = np.zeros_like(x)
  for t in range(x.shape[0]):
    probs = np.exp(logits[t] - logits[t].max())
    probs /= probs.sum()
    top = np.argsort(-probs)[:moe.experts_per_token]
    w = probs[top] / (probs[top].sum() if moe.renormalize else 1.0)
    for weight, e in zip(w, top):
      g, u, dn = (np.asarray(p[n][e], np.float64) for n in ('gate', 'up', 'down'))
      out[t] += weight * ((_silu(x[t] @ g) * (x[t] @ u)) @ dn)
    if moe.num_shared_experts:
      s = {n: np.asarray(p['shared'][n], np.float64) for n in ('gate', 'up', 'down')}
      out[t] += (_silu(x[t] @ s['gate']) * (x[t] @ s['up'])) @ s['down']
  return out


def test_one_expert_top1_is_the_dense_swiglu_values_and_grads():
  moe = MoeConfig(num_experts=1, experts_per_token=1)
  x = _x()
  p = _init(moe, x)
  dense = {'gate': p['gate'][0], 'up': p['up'][0], 'down': p['down'][0]}
  mlp = MLP(D, F, 0.3, 0.3, jnp.float32, jnp.float32)
  for dispatch in ('dropless', 'capacity'):
    m = dataclasses.replace(moe, dispatch=dispatch)
    y_moe = jax.jit(_layer(m).apply)({'params': p}, x)
    y_dense = mlp.apply({'params': dense}, x)
    np.testing.assert_allclose(y_moe, y_dense, atol=1e-6)
    g_moe = jax.jit(jax.grad(lambda q: jnp.sum(jnp.sin(_layer(m).apply({'params': q}, x)))))(p)
    g_dense = jax.jit(jax.grad(lambda q: jnp.sum(jnp.sin(mlp.apply({'params': q}, x)))))(dense)
    for name in ('gate', 'up', 'down'):
      np.testing.assert_allclose(g_moe[name][0], g_dense[name], atol=1e-6)
    np.testing.assert_allclose(g_moe['router'], 0.0, atol=1e-6)  # one expert: weight is 1


@pytest.mark.parametrize('shared, dispatch', [(0, 'dropless'), (2, 'dropless'), (2, 'capacity')])
def test_top2_of_4_equals_a_numpy_loop(shared, dispatch):
  moe = MoeConfig(num_experts=4, experts_per_token=2, num_shared_experts=shared,
                  dispatch=dispatch, capacity_factor=4.0)
  x = _x(20)
  p = _init(moe, x)
  y = jax.jit(_layer(moe).apply)({'params': p}, x)
  np.testing.assert_allclose(y, _numpy_moe(moe, p, x), atol=2e-5)


def test_router_variants():
  logits = jnp.array([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 1.0]])
  soft = jax.nn.softmax(logits, -1)
  w, e, _ = moe_lib.route(MoeConfig(num_experts=4, renormalize=False), logits)
  np.testing.assert_array_equal(e, [[0, 1], [1, 2]])
  np.testing.assert_allclose(w, [[soft[0, 0], soft[0, 1]], [soft[1, 1], soft[1, 2]]], rtol=1e-6)
  w2, _, _ = moe_lib.route(MoeConfig(num_experts=4, router='topk_softmax'), logits)
  np.testing.assert_allclose(w2[0], jax.nn.softmax(jnp.array([2.0, 1.0])), rtol=1e-6)
  w3, _, _ = moe_lib.route(MoeConfig(num_experts=4), logits)  # renormalised = topk_softmax
  np.testing.assert_allclose(w3, w2, rtol=1e-6)
  # sigmoid: the bias picks experts but never weighs them
  bias = jnp.array([0.0, 0.0, 0.0, 10.0])
  w4, e4, _ = moe_lib.route(MoeConfig(num_experts=4, router='sigmoid', renormalize=False),
                            logits, bias)
  np.testing.assert_array_equal(e4[:, 0], [3, 3])
  np.testing.assert_allclose(w4[0], jax.nn.sigmoid(jnp.array([-1.0, 2.0])), rtol=1e-6)


def test_dropless_equals_capacity_when_nothing_drops_and_drops_are_counted():
  x = _x(32)
  base = MoeConfig(num_experts=4, experts_per_token=2)
  p = _init(base, x)
  run = lambda m: jax.jit(lambda q: _layer(m).apply({'params': q}, x, mutable=['moe']))(p)
  y_dl, _ = run(base)
  # factor E / K: C = T, the most one expert can receive
  y_cap, stats = run(dataclasses.replace(base, dispatch='capacity', capacity_factor=2.0))
  np.testing.assert_allclose(y_cap, y_dl, atol=1e-6)
  assert float(stats['moe']['dropped'][0]) == 0.0
  y_small, stats = run(dataclasses.replace(base, dispatch='capacity', capacity_factor=0.5))
  # independent count: slot-major order, each expert keeps its first C = 8 assignments
  _, experts_TK, _ = moe_lib.route(base, x @ p['router'])
  seen, dropped = {}, 0
  for e in np.asarray(experts_TK).T.reshape(-1):
    seen[e] = seen.get(e, 0) + 1
    dropped += seen[e] > moe_lib.capacity(dataclasses.replace(base, capacity_factor=0.5), 32)
  assert dropped > 0
  np.testing.assert_allclose(stats['moe']['dropped'][0], dropped / 64, rtol=1e-6)
  assert not np.allclose(y_small, y_dl, atol=1e-4)


def test_aux_and_z_loss_closed_forms():
  # 4 tokens, 2 experts, top-1: tokens 0, 1, 2 choose expert 0, token 3 expert 1
  probs = jnp.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
  experts = jnp.array([[0], [0], [0], [1]])
  # E * sum_e f_e P_e = 2 * (0.75 * 0.65 + 0.25 * 0.35)
  np.testing.assert_allclose(moe_lib.load_balancing_loss(probs, experts),
                             2 * (0.75 * 0.65 + 0.25 * 0.35), rtol=1e-6)
  balanced = jnp.full((4, 2), 0.5)
  np.testing.assert_allclose(moe_lib.load_balancing_loss(balanced, jnp.array([[0], [1]] * 2)),
                             1.0, rtol=1e-6)
  collapsed = moe_lib.load_balancing_loss(jnp.array([[1.0, 0.0]] * 4), jnp.zeros((4, 1), int))
  np.testing.assert_allclose(collapsed, 2.0, rtol=1e-6)  # the maximum, E
  # balanced routing is the minimum over random top-1 routings
  logits = jax.random.normal(jax.random.key(0), (64, 200, 4)) * 2
  for l in logits[:16]:
    p = jax.nn.softmax(l, -1)
    assert moe_lib.load_balancing_loss(p, jnp.argmax(p, -1)[:, None]) >= 1.0 - 1e-6
  logits = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
  lse = np.log(np.exp([1.0, 2.0, 3.0]).sum()), np.log(3.0)
  np.testing.assert_allclose(moe_lib.router_z_loss(logits), (lse[0]**2 + lse[1]**2) / 2,
                             rtol=1e-6)


def _model(num_layers=2, **moe):
  return ModelConfig(vocab_size=64, num_layers=num_layers, d_model=32, num_heads=4, num_kv_heads=2,
                     head_dim=8, mlp_dim=48, max_seq_len=64,
                     moe=MoeConfig(**dict(dict(num_experts=4, experts_per_token=2,
                                               expert_mlp_dim=16), **moe)))


def _batch(b=2, length=8, seed=0):
  tokens = jax.random.randint(jax.random.key(seed), (b, length), 0, 64)
  positions = jnp.broadcast_to(jnp.arange(length), (b, length))
  return tokens, positions, jnp.ones_like(tokens)


def test_interleaved_layers_and_scan_remat_equal_unrolled():
  layers = [moe_lib.is_moe_layer(MoeConfig(num_experts=2, first_k_dense=1, moe_every=2), i)
            for i in range(6)]
  assert layers == [False, True, False, True, False, True]
  cfg = _model(first_k_dense=1)  # layers: dense, moe
  p = _params(cfg)
  assert 'mlp' in p['layers_0'] and 'moe' in p['layers_1'] and 'mlp' not in p['layers_1']
  args = _batch()
  logits, stats = forward_moe(cfg, p, *args)
  np.testing.assert_allclose(logits, forward(cfg, p, *args), atol=1e-6)
  sums = moe_lib.loss_sums(cfg.moe, stats, 1.0)
  assert set(k for k in sums if k.startswith('moe_load')) == {'moe_load_max_l1'}
  uniform = _model()
  p = _params(uniform)
  stacked = {'layers': jax.tree.map(lambda *a: jnp.stack(a), *[p[f'layers_{i}'] for i in range(2)]),
             **{k: v for k, v in p.items() if not k.startswith('layers_')}}
  scan = dataclasses.replace(uniform, scan_layers=True, remat='full')

  def loss(c):
    def value(q):
      logits, stats = forward_moe(c, q, *args)
      return jnp.sum(logits ** 2) + moe_lib.loss_sums(c.moe, stats, 1.0)['loss']
    return jax.jit(jax.value_and_grad(value))

  value_scan, g_scan = loss(scan)(stacked)
  value, g = loss(uniform)(p)
  np.testing.assert_allclose(value_scan, value, rtol=1e-6)
  np.testing.assert_allclose(g_scan['layers']['moe']['router'][1], g['layers_1']['moe']['router'],
                             atol=1e-6)
  np.testing.assert_allclose(g_scan['layers']['moe']['down'][0], g['layers_0']['moe']['down'],
                             atol=1e-6)


def test_kv_cache_decoding_equals_the_full_forward():
  cfg = _model(dispatch='capacity', capacity_factor=1.0)  # decoding is always dropless
  p = _params(cfg)
  tokens, positions, segments = _batch(b=2, length=6)
  full = forward(dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, dispatch='dropless')),
                 p, tokens, positions, segments)
  cache = init_cache(cfg, 2, 8)
  logits, cache = forward_cached(cfg, p, tokens[:, :4], positions[:, :4], segments[:, :4], cache)
  steps = [logits]
  for i in (4, 5):
    logits, cache = forward_cached(cfg, p, tokens[:, i:i + 1], positions[:, i:i + 1],
                                   segments[:, i:i + 1], cache)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=2e-5)


def test_sigmoid_bias_moves_against_the_load():
  cfg = _model(router='sigmoid', bias_update_rate=1.0)
  p = _params(cfg)
  args = _batch(b=4, length=16)
  g = jax.jit(jax.grad(
      lambda q: moe_lib.loss_sums(cfg.moe, forward_moe(cfg, q, *args)[1], 1.0)['loss']))(p)
  stats = moe_lib.layer_stats(forward_moe(cfg, p, *args)[1])
  np.testing.assert_allclose(g['layers_0']['moe']['router_bias'], stats['load'][0] - 0.25,
                             atol=1e-6)


@pytest.mark.parametrize('override, message', [
    ('model.moe.experts_per_token=9', 'model.moe.experts_per_token: must be in [1, '),
    ('mesh.expert=3', 'mesh.expert: 3 does not divide model.moe.num_experts=8'),
])
def test_bad_moe_configs(override, message):
  config = config_lib.load_config('moe_tiny')
  config.sharding = 'ep'
  config.mesh.data, config.batch_size = 1, 6
  config_lib.apply_overrides(config, [override])
  from lmjax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  with pytest.raises(config_lib.ConfigError, match=message.replace('[', r'\[')):
    mesh_lib.validate(config, 3 if 'expert=3' in override else 1)


def test_moe_keys_on_a_dense_config():
  config = config_lib.load_config('tiny')
  config_lib.apply_overrides(config, ['model.moe.experts_per_token=4'])
  with pytest.raises(config_lib.ConfigError, match='model.moe.experts_per_token: set on a dense'):
    config_lib.validate(config)


def test_total_and_active_parameter_counts_and_flops():
  from lmjax.scaling import flops  # pylint: disable=import-outside-toplevel
  cfg = _model(3, num_shared_experts=1, first_k_dense=1, router='sigmoid', bias_update_rate=0.1)
  shapes = jax.eval_shape(lambda: nn.unbox(init_params(cfg, jax.random.key(0))))
  assert flops.param_counts(cfg)['total'] == sum(x.size for x in jax.tree.leaves(shapes))
  unchosen = 2 * 3 * 32 * 16 * (4 - 2)  # two MoE layers x 3 matrices x D x F x (E - K)
  counts = flops.param_counts(cfg)
  assert counts['active'] == counts['total'] - unchosen
  dense = dataclasses.replace(cfg, moe=MoeConfig())
  f, f_dense = flops.flops_per_token(cfg, 8), flops.flops_per_token(dense, 8)
  # per MoE layer instead of the dense MLP: router + K experts + 1 shared expert, 3 x 2 FLOPs each
  per_layer = 32 * 4 + 3 * 32 * 16 * (2 + 1) - 3 * 32 * 48
  assert f['total'] - f_dense['total'] == 6 * 2 * per_layer


def test_lora_on_expert_weights_is_refused():
  config = config_lib.load_config('moe_tiny')
  config_lib.apply_overrides(config, ['peft.method=lora', 'peft.targets=moe/(gate|up)$'])
  with pytest.raises(config_lib.ConfigError, match='peft.targets: .* names MoE weights'):
    config_lib.validate(config)


def test_mixtral_8x7b_preset_counts_match_the_published_sizes():
  from lmjax.scaling import flops  # pylint: disable=import-outside-toplevel
  counts = flops.param_counts(config_lib.load_config('mixtral_8x7b').model)
  assert counts['total'] == 46_702_792_704  # "46.7B total, 12.9B active" (Mixtral paper)
  assert counts['active'] == 12_879_925_248


def test_beam_search_log_probs_equal_the_full_forward():
  from lmjax.inference.generate import generate  # pylint: disable=import-outside-toplevel
  from lmjax.inference.sampling import SamplingConfig  # pylint: disable=import-outside-toplevel
  cfg = _model()
  p = _params(cfg)
  prompts = [[5, 9, 2, 7], [3]]
  out = generate(cfg, p, prompts, SamplingConfig(max_new_tokens=4, num_beams=3))
  for row, prompt in enumerate(prompts):
    full = np.asarray([prompt + list(out['tokens'][row])], np.int32)
    logits = forward(cfg, p, full, np.arange(full.shape[1])[None], np.ones_like(full))
    logp = np.asarray(jax.nn.log_softmax(logits[0], -1))
    expected = [logp[len(prompt) - 1 + i, t] for i, t in enumerate(out['tokens'][row])]
    np.testing.assert_allclose(out['logprobs'][row], expected, atol=2e-5)
