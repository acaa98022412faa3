"""PEFT as pytree transforms: LoRA/DoRA/VeRA/LoRA-FA, merge/unmerge, freezing, LoRA+, save/load."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from lmjax import tasks
from lmjax import workdir as workdir_lib
from lmjax.config import base_config
from lmjax.models.transformer import ModelConfig, init_params
from lmjax.models.transformer import forward as _forward
from lmjax.peft import lora
from lmjax.tasks import params as params_lib
from lmjax.train import step as step_lib
from lmjax.train.state import init_state

forward = jax.jit(_forward, static_argnums=0)
CFG = ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=64, max_seq_len=64)


def _inputs(batch=2, length=8, seed=0):
  tokens = jax.random.randint(jax.random.key(seed), (batch, length), 1, CFG.vocab_size)
  positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
  return tokens, positions, jnp.ones_like(tokens)


def _base(cfg=CFG):
  return nn.unbox(init_params(cfg, jax.random.key(0)))


def _randomise_b(adapters, scale=0.05):
  leaves, treedef = jax.tree.flatten_with_path(adapters)
  out = []
  for i, (path, x) in enumerate(leaves):
    name = path[-1].key
    out.append(x + scale * jax.random.normal(jax.random.key(i), x.shape) if name in 'bdm' else x)
  return jax.tree.unflatten(treedef, out)


@pytest.mark.parametrize('method', ['lora', 'dora', 'vera', 'lora_fa'])
def test_fresh_adapters_leave_the_model_unchanged(method):
  base = _base()
  cfg = lora.PeftConfig(method=method, rank=4)
  adapters = lora.init_adapters(cfg, base, jax.random.key(1))
  want = forward(CFG, base, *_inputs())
  got = forward(CFG, lora.effective_params(cfg, base, adapters), *_inputs())
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert len(lora.target_paths(cfg, base)) == CFG.num_layers * 7  # q k v o gate up down


def test_targets_and_shapes():
  base = _base()
  cfg = lora.PeftConfig(method='lora', rank=4, targets='qv')
  adapters = lora.init_adapters(cfg, base, jax.random.key(1))
  flat = traverse_util.flatten_dict(adapters)
  assert flat[('layers_0', 'attn', 'q', 'a')].shape == (32, 4)
  assert flat[('layers_0', 'attn', 'q', 'b')].shape == (4, 4 * 8)
  assert {p[2] for p in flat} == {'q', 'v'}
  a = np.asarray(flat[('layers_0', 'attn', 'q', 'a')])
  assert np.abs(a).max() <= 1 / np.sqrt(32) and np.abs(a).max() > 0  # kaiming-uniform bound
  assert not np.any(np.asarray(flat[('layers_0', 'attn', 'q', 'b')]))
  assert lora.PeftConfig(rank=4, alpha=8.0).scale == 2.0
  assert lora.PeftConfig(rank=4, alpha=8.0, rslora=True).scale == 4.0


@pytest.mark.parametrize('method', ['lora', 'vera', 'lora_fa'])
def test_merge_forward_and_unmerge(method):
  base = _base()
  cfg = lora.PeftConfig(method=method, rank=4)
  adapters = _randomise_b(lora.init_adapters(cfg, base, jax.random.key(1)))
  effective = lora.effective_params(cfg, base, adapters)
  merged = lora.merge(cfg, base, adapters)
  assert jax.tree.structure(merged) == jax.tree.structure(base)  # a plain, exportable tree
  np.testing.assert_allclose(forward(CFG, merged, *_inputs()),
                             forward(CFG, effective, *_inputs()), atol=1e-5)
  assert not np.allclose(merged['layers_0']['attn']['q'], base['layers_0']['attn']['q'])
  restored = lora.unmerge(cfg, merged, adapters)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(base)):
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_scan_layers_lora_and_dora():
  cfg = CFG.__class__(**{**CFG.__dict__, 'scan_layers': True})
  base = _base(cfg)
  for method in ('lora', 'dora'):
    peft = lora.PeftConfig(method=method, rank=4)
    adapters = lora.init_adapters(peft, base, jax.random.key(1), stacked=True)
    assert adapters['layers']['attn']['o']['a'].shape == (2, 32, 4)  # (layers, H*Dh, r)
    got = forward(cfg, lora.effective_params(peft, base, adapters, stacked=True), *_inputs())
    np.testing.assert_allclose(got, forward(cfg, base, *_inputs()), atol=1e-6)


@pytest.mark.parametrize('method', ['lora', 'dora', 'vera', 'lora_fa'])
@pytest.mark.parametrize('scan', [False, True])
def test_attached_factors_equal_the_adapted_weights(method, scan):
  # `attach` (factors applied inside each layer) == the model read with `effective_params`:
  # logits and adapter gradients, with dropout, a bfloat16 base and the output head adapted.
  cfg = CFG.__class__(**{**CFG.__dict__, 'scan_layers': scan})
  base = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _base(cfg))
  peft = lora.PeftConfig(method=method, rank=4, dropout=0.25,
                         targets=r'attn/(q|k|v|o)$|mlp/(gate|up|down)$|lm_head')
  adapters = _randomise_b(lora.init_adapters(peft, _base(cfg), jax.random.key(1), stacked=scan))
  assert 'lm_head' in adapters
  rng = jax.random.key(5)

  def loss(adapt, adapters):
    logits = _forward(cfg, adapt(peft, base, adapters, rng, scan), *_inputs())
    return jnp.mean(jax.nn.log_softmax(logits)[..., 3]), logits

  (want, want_logits), want_grads = jax.value_and_grad(
      lambda a: loss(lora.effective_params, a), has_aux=True)(adapters)
  (got, got_logits), got_grads = jax.value_and_grad(
      lambda a: loss(lora.attach, a), has_aux=True)(adapters)
  attached = traverse_util.flatten_dict(lora.attach(peft, base, adapters, rng, scan))
  assert any(len(p) > 1 and p[-2] == 'q_lora' for p in attached)
  assert ('lm_head_lora', 'a') in attached
  np.testing.assert_allclose(got_logits, want_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
  assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(got_grads))


def _config(**peft):
  c = base_config()
  c.task = 'sft'
  c.post.train_file = 'unused.jsonl'
  c.steps = 10
  c.model.vocab_size, c.model.num_layers, c.model.d_model = 64, 2, 32
  c.model.num_heads, c.model.num_kv_heads, c.model.mlp_dim = 4, 2, 64
  c.model.dtype = 'float32'
  c.optimizer.warmup_steps = 0
  c.optimizer.schedule = 'constant'
  c.optimizer.learning_rate = 1e-2
  for k, v in peft.items():
    c.peft[k] = v
  return c


def _sft_batch(batch=2, length=8):
  tokens, positions, segments = _inputs(batch, length + 1)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'positions': positions[:, :-1],
          'segment_ids': segments[:, :-1], 'weights': jnp.ones((batch, length))}


def _train(config, steps=3):
  task = tasks.from_config(config)
  tx, schedule = task.optimizer(config)
  state = init_state(task, tx, 0)
  state = state.replace(params=nn.unbox(state.params))
  first = state
  fn = jax.jit(lambda s, b: step_lib.train_step(task, tx, schedule, s, b))
  for _ in range(steps):
    state, metrics = fn(state, _sft_batch())
  return first, state, metrics


@pytest.mark.parametrize('method', ['dora', 'lora_fa'])
def test_only_adapters_train(method):
  first, state, metrics = _train(_config(method=method, rank=4))
  assert np.isfinite(float(metrics['loss']))
  assert set(state.params['trainable']) == {'adapters'}
  for got, want in zip(jax.tree.leaves(state.params['frozen']),
                       jax.tree.leaves(first.params['frozen'])):
    np.testing.assert_array_equal(got, want)  # the frozen base never moves
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params['trainable'],
                         first.params['trainable'])
  assert all(jax.tree.leaves(changed))
  # optimizer state only for trainable leaves: its parameter-shaped leaves are adapter-sized
  trainable_sizes = sum(x.size for x in jax.tree.leaves(state.params['trainable']))
  opt_sizes = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
  assert opt_sizes == 2 * trainable_sizes  # Adam's two moments
  if method == 'lora_fa':  # A is frozen: only B trains
    flat = traverse_util.flatten_dict(state.params['trainable'])
    assert all(p[-1] == 'b' for p in flat)


def test_freezing_by_name_and_bitfit():
  _, state, _ = _train(_config(freeze_patterns='embed|layers_0/'), steps=1)
  trainable = traverse_util.flatten_dict(state.params['trainable']['model'])
  frozen = traverse_util.flatten_dict(state.params['frozen']['model'])
  assert ('embed',) in frozen and ('layers_0', 'attn', 'q') in frozen
  assert ('layers_1', 'attn', 'q') in trainable and ('lm_head',) in trainable
  _, state, _ = _train(_config(method='lora', rank=4, train_patterns='scale$'), steps=1)
  trainable = traverse_util.flatten_dict(state.params['trainable']['model'])
  assert trainable and all(p[-1] == 'scale' for p in trainable)


def test_bfloat16_frozen_base():
  first, state, metrics = _train(_config(method='lora', rank=4, base_dtype='bfloat16'), steps=2)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state.params['frozen']))
  assert np.isfinite(float(metrics['loss']))


def test_lora_plus_scales_b_updates():
  config = _config(method='lora', rank=4)
  task = tasks.from_config(config)
  params = nn.unbox(params_lib.build_params(task, init_params(task.model, jax.random.key(0)),
                                            jax.random.key(1)))
  grads = jax.tree.map(jnp.ones_like, params['trainable'])
  updates = {}
  for ratio in (1.0, 4.0):
    config.peft.lora_plus_ratio = ratio
    task = tasks.from_config(config)
    tx, _ = task.optimizer(config)
    updates[ratio] = traverse_util.flatten_dict(
        tx.update(grads, tx.init(params['trainable']), params['trainable'])[0])
  for path, u in updates[4.0].items():
    want = updates[1.0][path] * (4.0 if path[-1] == 'b' else 1.0)
    np.testing.assert_allclose(u, want, rtol=1e-6)
    assert np.any(u != 0)


def test_adapters_save_load_roundtrip(tmp_path):
  config = _config(method='lora', rank=4)
  task = tasks.from_config(config)
  params = nn.unbox(params_lib.build_params(task, init_params(task.model, jax.random.key(0)),
                                            jax.random.key(1)))
  params['trainable']['adapters'] = _randomise_b(params['trainable']['adapters'])
  workdir_lib.save_adapters(str(tmp_path), task.peft,
                            {'adapters': params_lib.adapters_of(params)})
  peft_dict, small = workdir_lib.load_adapters(str(tmp_path))
  peft_cfg = lora.PeftConfig(**peft_dict)
  assert peft_cfg == task.peft
  for got, want in zip(jax.tree.leaves(small['adapters']),
                       jax.tree.leaves(params['trainable']['adapters'])):
    np.testing.assert_array_equal(got, want)
  merged = lora.merge(peft_cfg, params['frozen']['model'], small['adapters'])
  np.testing.assert_allclose(merged['layers_1']['mlp']['down'],
                             params_lib.merged_model_params(task, params)['layers_1']['mlp']['down'])


# ---------------------------------------------------------------------------------------------
# In-model methods (lmjax.peft.hooks): bottleneck adapters, prefix / prompt / P-tuning
# ---------------------------------------------------------------------------------------------

from lmjax.peft import hooks  # pylint: disable=g-import-not-at-top,wrong-import-position

HOOK_METHODS = ('bottleneck', 'prefix', 'prompt', 'p_tuning')


def _hook_cfg(method, **kw):
  return lora.PeftConfig(method=method, num_virtual_tokens=3, adapter_dim=4, encoder_dim=16, **kw)


def _perturb(leaves, scale=0.1):
  """Every leaf moved by noise (so zero-initialised up-projections matter)."""
  flat, treedef = jax.tree.flatten(leaves)
  return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(jax.random.key(i), x.shape)
                                      for i, x in enumerate(flat)])


@pytest.mark.parametrize('scan', [False, True])
def test_bottleneck_starts_exactly_at_the_base_model(scan):
  cfg = CFG.__class__(**{**CFG.__dict__, 'scan_layers': scan})
  base = _base(cfg)
  peft_cfg = _hook_cfg('bottleneck')
  leaves = hooks.init_leaves(peft_cfg, cfg, base, jax.random.key(1))
  assert leaves['attn']['down'].shape == (2, 32, 4) and leaves['mlp']['up'].shape == (2, 4, 32)
  want = forward(cfg, base, *_inputs())
  np.testing.assert_array_equal(
      forward(cfg, base, *_inputs(), peft=hooks.model_peft(peft_cfg, leaves)), want)
  moved = forward(cfg, base, *_inputs(), peft=hooks.model_peft(peft_cfg, _perturb(leaves)))
  assert not np.allclose(moved, want, atol=1e-4)


def test_prompt_tuning_is_virtual_tokens_before_the_input():
  base = _base()
  tokens, positions, segments = _inputs()
  ids = jnp.array([5, 9, 11])
  got = forward(CFG, base, tokens, positions, segments, peft={'prompt': base['embed'][ids]})
  full = jnp.concatenate([jnp.broadcast_to(ids, (2, 3)), tokens], axis=1)
  full_positions = jnp.broadcast_to(jnp.arange(11), (2, 11))
  want = forward(CFG, base, full, full_positions, jnp.ones_like(full))[:, 3:]
  np.testing.assert_allclose(got, want, atol=1e-5)
  # P-tuning starts as prompt tuning from its seeds (zero second layer), then the encoder counts
  p_cfg = _hook_cfg('p_tuning')
  leaves = hooks.init_leaves(p_cfg, CFG, base, jax.random.key(2))
  np.testing.assert_array_equal(hooks.prompt_encoder(leaves), leaves['seeds'])
  assert leaves['w1'].shape == (32, 16)
  moved = dict(leaves, w2=leaves['w2'] + 0.1)
  assert not np.allclose(hooks.model_peft(p_cfg, moved)['prompt'], leaves['seeds'])


def test_prefix_tuning_init_is_the_prompt_of_the_same_tokens():
  """Prefix keys/values start as the base model's own for P vocabulary tokens: with the real
  tokens' positions moved up by P that is exactly prompt tuning with those tokens."""
  base = _base()
  tokens, positions, segments = _inputs()
  prefix = hooks.init_leaves(_hook_cfg('prefix'), CFG, base, jax.random.key(3))
  prompt = hooks.init_leaves(_hook_cfg('prompt'), CFG, base, jax.random.key(3))
  assert prefix['k'].shape == (2, 3, 2, 8)  # (layers, P, kv heads, head dim)
  got = forward(CFG, base, tokens, positions + 3, segments,
                peft=hooks.model_peft(_hook_cfg('prefix'), prefix))
  want = forward(CFG, base, tokens, positions, segments,
                 peft=hooks.model_peft(_hook_cfg('prompt'), prompt))
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert not np.allclose(got, forward(CFG, base, tokens, positions, segments), atol=1e-3)


@pytest.mark.parametrize('method', ['prefix', 'prompt'])
def test_packed_documents_each_see_the_prefix_and_never_each_other(method):
  base = _base()
  peft_cfg = _hook_cfg(method)
  peft = hooks.model_peft(peft_cfg, _perturb(hooks.init_leaves(peft_cfg, CFG, base,
                                                                 jax.random.key(4))))
  tokens = jax.random.randint(jax.random.key(5), (1, 10), 1, CFG.vocab_size)
  segments = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 0]])  # two documents and one pad slot
  positions = jnp.array([[0, 1, 2, 3, 0, 1, 2, 3, 4, 0]])
  packed = forward(CFG, base, tokens, positions, segments, peft=peft)
  for lo, hi in ((0, 4), (4, 9)):
    alone = forward(CFG, base, tokens[:, lo:hi], positions[:, lo:hi],
                    jnp.ones((1, hi - lo), jnp.int32), peft=peft)
    np.testing.assert_allclose(packed[:, lo:hi], alone, atol=1e-5)
    plain = forward(CFG, base, tokens[:, lo:hi], positions[:, lo:hi],
                    jnp.ones((1, hi - lo), jnp.int32))
    assert not np.allclose(alone, plain, atol=1e-3)  # the prefix reaches every document
  assert np.all(np.isfinite(packed))


@pytest.mark.parametrize('method', HOOK_METHODS)
def test_gradients_reach_only_the_method_leaves(method):
  config = _config(method=method, num_virtual_tokens=3, adapter_dim=4, encoder_dim=16)
  task = tasks.from_config(config)
  params = nn.unbox(params_lib.build_params(task, init_params(task.model, jax.random.key(0)),
                                            jax.random.key(1)))
  assert set(params['trainable']) == {'adapters'}
  # the base tree is untouched: the plain model reads it and the method only adds `peft`
  base = params_lib.model_params(task, params)
  assert jax.tree.structure(base) == jax.tree.structure(_base())
  batch = _sft_batch()
  plain = forward(CFG, base, batch['inputs'], batch['positions'], batch['segment_ids'])
  np.testing.assert_array_equal(
      plain, forward(CFG, params_lib.reference_params(task, params), batch['inputs'],
                     batch['positions'], batch['segment_ids']))
  adapters = params['trainable']['adapters']
  if method == 'p_tuning':  # non-zero second layers, so the first ones get a gradient too
    adapters['w2'] += 0.05
  if method == 'bottleneck':
    for name in ('attn', 'mlp'):
      adapters[name]['up'] += 0.05
  loss = lambda trainable: task.sums(
      {'trainable': trainable, 'frozen': params['frozen']}, batch, None)['loss']
  grads = jax.grad(loss)(params['trainable'])
  for path, g in traverse_util.flatten_dict(grads['adapters']).items():
    assert np.any(np.asarray(g) != 0), path
  with pytest.raises(ValueError, match='cannot be merged'):
    params_lib.merged_model_params(task, params)
  with pytest.raises(ValueError, match='cannot be merged'):
    lora.merge(task.peft, base, params['trainable']['adapters'])


@pytest.mark.parametrize('method', HOOK_METHODS)
def test_hook_methods_train_with_a_frozen_base(method):
  config = _config(method=method, num_virtual_tokens=3, adapter_dim=4, encoder_dim=16)
  task = tasks.from_config(config)
  tx, schedule = task.optimizer(config)
  state = init_state(task, tx, 0)
  state = state.replace(params=nn.unbox(state.params))
  first = state
  fn = jax.jit(lambda s, b: step_lib.train_step(task, tx, schedule, s, b))
  losses = []
  for _ in range(6):
    state, metrics = fn(state, _sft_batch())
    losses.append(float(metrics['loss']))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  for got, want in zip(jax.tree.leaves(state.params['frozen']),
                       jax.tree.leaves(first.params['frozen'])):
    np.testing.assert_array_equal(got, want)  # the base never moves
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params['trainable'],
                         first.params['trainable'])
  assert all(jax.tree.leaves(changed)), changed


def test_hook_method_save_and_merge_refusal(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  from types import SimpleNamespace  # pylint: disable=g-import-not-at-top
  from lmjax.commands import peft as peft_command  # pylint: disable=g-import-not-at-top
  config = _config(method='prefix', num_virtual_tokens=3)
  task = tasks.from_config(config)
  params = nn.unbox(params_lib.build_params(task, init_params(task.model, jax.random.key(0)),
                                            jax.random.key(1)))
  workdir_lib.save_adapters(str(tmp_path / 'saved'), task.peft,
                            {'adapters': params_lib.adapters_of(params)})
  peft_dict, small = workdir_lib.load_adapters(str(tmp_path / 'saved'))
  assert lora.PeftConfig(**peft_dict) == task.peft
  np.testing.assert_array_equal(small['adapters']['k'], params['trainable']['adapters']['k'])
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'config.json').write_text(json.dumps(config.to_dict()))
  args = SimpleNamespace(action='merge', workdir=str(workdir), output=str(tmp_path / 'merged'))
  assert peft_command.run(args) == 2
  assert not (tmp_path / 'merged').exists()


@pytest.mark.parametrize('method', ['bottleneck', 'prefix', 'prompt'])
def test_hook_methods_decode_with_a_cache_from_params_peft(method):
  """A trained run loaded for sampling: the base with a `peft` entry (tasks.load_trained); prefill
  then one decode step match the full forward pass."""
  from lmjax.models.transformer import forward_cached, init_cache  # pylint: disable=g-import-not-at-top
  base = _base()
  peft_cfg = _hook_cfg(method)
  peft = hooks.model_peft(peft_cfg, _perturb(hooks.init_leaves(peft_cfg, CFG, base,
                                                                 jax.random.key(6))))
  tokens, positions, segments = _inputs(length=6)
  want = forward(CFG, base, tokens, positions, segments, peft=peft)
  loaded = dict(base, peft=peft)
  np.testing.assert_allclose(forward(CFG, loaded, tokens, positions, segments), want,
                             atol=1e-6)
  cache = init_cache(CFG, 2, 8)
  first, cache = forward_cached(CFG, loaded, tokens[:, :5], positions[:, :5], segments[:, :5],
                                cache)
  last, _ = forward_cached(CFG, loaded, tokens[:, 5:], positions[:, 5:], segments[:, 5:], cache)
  np.testing.assert_allclose(jnp.concatenate([first, last], axis=1), want, atol=1e-5)
