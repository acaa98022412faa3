"""Hugging Face conversion: logit parity with transformers, exact round trips, generation, errors.

Tiny random models (d_model 64, 2 layers) on CPU in float32.
"""

import functools
import json
import os
import pickle

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('safetensors')

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp

from lmjax import checkpoint, config as config_lib
from lmjax.convert import (ConversionError, abstract_params, export_hf, hf_config_from_model,
                           import_hf, load_tokenizer, model_config_from_hf)
from lmjax.models import transformer
from lmjax.scaling import flops
# pylint: enable=g-import-not-at-top,wrong-import-position

VOCAB, LENGTH = 96, 16
_COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
               vocab_size=VOCAB, max_position_embeddings=64, rms_norm_eps=1e-5,
               initializer_range=0.2, attn_implementation='eager')
CASES = {
    'llama_mha_tied': ('llama', dict(num_key_value_heads=4, tie_word_embeddings=True,
                                     rope_theta=10000.0), {}),
    'llama_gqa_untied_sharded': ('llama', dict(num_key_value_heads=2, tie_word_embeddings=False,
                                               rope_theta=500.0), {'max_shard_size': '40KB'}),
    'llama3_rope_scaling': ('llama', dict(
        num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                      'high_freq_factor': 4.0, 'original_max_position_embeddings': 32}), {}),
    'mistral_sliding_window': ('mistral', dict(num_key_value_heads=2, tie_word_embeddings=False,
                                               sliding_window=5, rope_theta=1000.0), {}),
    # Qwen2: q/k/v biases; a sliding_window that use_sliding_window=False switches off
    'qwen2_qkv_bias_tied': ('qwen2', dict(num_key_value_heads=2, tie_word_embeddings=True,
                                          rope_theta=1000000.0, use_sliding_window=False,
                                          sliding_window=4, max_window_layers=1), {}),
}
_HF_CLASSES = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM',
               'qwen2': 'Qwen2ForCausalLM'}


def _hf_model(kind, overrides):
  torch.manual_seed(0)
  config_cls = {'llama': transformers.LlamaConfig, 'mistral': transformers.MistralConfig,
                'qwen2': transformers.Qwen2Config}[kind]
  model = getattr(transformers, _HF_CLASSES[kind])(config_cls(**_COMMON, **overrides))
  with torch.no_grad():  # non-trivial norm scales, so a misplaced norm weight shows
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif name.endswith('.bias'):  # initialised to zero; random, so a misplaced bias shows
        p.copy_(0.5 * torch.randn_like(p))
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = 0
  return model.eval()


def _write_tiny_tokenizer(directory):
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  vocab = {'<unk>': 0, '<s>': 1, '</s>': 2, '<pad>': 3}
  for word in ['hello', 'world', 'def', 'return', 'x', '(', ')', ':']:
    vocab[word] = len(vocab)
  tok = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(['<s>', '</s>', '<pad>'])
  tok.save(os.path.join(directory, 'tokenizer.json'))
  with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
    json.dump({'bos_token': '<s>', 'eos_token': '</s>', 'pad_token': '<pad>'}, f)


@pytest.fixture(scope='module', params=list(CASES))
def case(request, tmp_path_factory):
  kind, overrides, save_kwargs = CASES[request.param]
  root = tmp_path_factory.mktemp(request.param)
  model = _hf_model(kind, overrides)
  hf_dir, workdir = str(root / 'hf'), str(root / 'workdir')
  model.save_pretrained(hf_dir, **save_kwargs)
  if request.param == 'llama_mha_tied':
    _write_tiny_tokenizer(hf_dir)
  config, params = import_hf(hf_dir, workdir)
  cfg = transformer.ModelConfig.from_config(config.model)
  return dict(name=request.param, model=model, hf_dir=hf_dir, workdir=workdir, config=config,
              cfg=cfg, params=params, root=root)


def _lmjax_logits(cfg, params, tokens_BL):
  batch, length = tokens_BL.shape
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  logits = transformer.forward(cfg, params, jnp.asarray(tokens_BL), positions,
                               jnp.ones((batch, length), jnp.int32))
  return np.asarray(logits)


def _hf_logits(model, tokens_BL):
  with torch.no_grad():
    return model(torch.tensor(tokens_BL)).logits.float().numpy()


def test_logits_match_transformers(case):
  tokens = np.random.RandomState(1).randint(0, VOCAB, (2, LENGTH))
  expected = _hf_logits(case['model'], tokens)
  assert np.abs(expected).max() > 1.0  # the test model is not trivially near-uniform
  np.testing.assert_allclose(_lmjax_logits(case['cfg'], case['params'], tokens), expected,
                             rtol=1e-4, atol=1e-4)


def test_round_trip_is_exact(case):
  hf_dir2, workdir2 = str(case['root'] / 'hf_export'), str(case['root'] / 'workdir2')
  export_hf(case['workdir'], hf_dir2)
  _, params2 = import_hf(hf_dir2, workdir2)
  flat1, tree1 = jax.tree.flatten(case['params'])
  flat2, tree2 = jax.tree.flatten(params2)
  assert tree1 == tree2
  for a, b in zip(flat1, flat2):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
  # transformers loads the export, with the same weights as the original model
  kind = CASES[case['name']][0]
  with open(os.path.join(hf_dir2, 'config.json')) as f:
    exported = json.load(f)
  assert exported['architectures'] == [_HF_CLASSES[kind]]
  assert exported['model_type'] == kind
  cls = getattr(transformers, _HF_CLASSES[kind])
  reloaded = cls.from_pretrained(hf_dir2, attn_implementation='eager').eval()
  original = case['model'].state_dict()
  assert set(reloaded.state_dict()) == set(original)
  for name, tensor in reloaded.state_dict().items():
    assert torch.equal(tensor, original[name]), name
  assert (getattr(reloaded.config, 'sliding_window', None) ==
          getattr(case['model'].config, 'sliding_window', None))


def test_param_counts_agree(case):
  n = sum(x.size for x in jax.tree.leaves(case['params']))
  assert n == case['model'].num_parameters()
  assert n == flops.param_counts(case['config'].model)['total']


def test_workdir_loads_with_load_params(case):
  with open(os.path.join(case['workdir'], 'config.json')) as f:
    config = config_lib.from_json(f.read())
  config_lib.validate(config)
  cfg = transformer.ModelConfig.from_config(config.model)
  restored = checkpoint.load_params(case['workdir'], abstract_params(cfg))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               restored, case['params'])


def _lmjax_greedy(cfg, params, prompt, new_tokens):
  step = jax.jit(functools.partial(transformer.forward_cached, cfg))
  cache = transformer.init_cache(cfg, 1, len(prompt) + new_tokens)
  tokens = jnp.asarray([prompt], jnp.int32)
  positions = jnp.arange(len(prompt), dtype=jnp.int32)[None]
  logits, cache = step(params, tokens, positions, jnp.ones_like(tokens), cache)
  out = []
  for i in range(new_tokens):
    next_token = int(jnp.argmax(logits[0, -1]))
    out.append(next_token)
    tokens = jnp.asarray([[next_token]], jnp.int32)
    positions = jnp.asarray([[len(prompt) + i]], jnp.int32)
    logits, cache = step(params, tokens, positions, jnp.ones_like(tokens), cache)
  return out


def test_greedy_generation_matches(case):
  if case['name'] == 'llama3_rope_scaling':
    pytest.skip('covered by the logit test; keeps the module fast')
  prompt = [5, 17, 42, 3, 88, 9]
  with torch.no_grad():
    hf_out = case['model'].generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)
  expected = hf_out[0, len(prompt):].tolist()
  assert _lmjax_greedy(case['cfg'], case['params'], prompt, 10) == expected


def test_scan_layers_import_and_export(case, tmp_path):
  if case['name'] not in ('llama_gqa_untied_sharded', 'qwen2_qkv_bias_tied'):
    pytest.skip('one case suffices (and the one with biases)')
  config, params = import_hf(case['hf_dir'], str(tmp_path / 'scan'), scan_layers=True)
  assert config.model.scan_layers
  for i in range(case['cfg'].num_layers):
    expected = case['params'][f'layers_{i}']
    jax.tree.map(lambda s, u, i=i: np.testing.assert_array_equal(s[i], u), params['layers'],
                 expected)
  export_hf(str(tmp_path / 'scan'), str(tmp_path / 'hf'))
  _, params2 = import_hf(str(tmp_path / 'hf'), str(tmp_path / 'unrolled'))
  jax.tree.map(np.testing.assert_array_equal, params2, case['params'])


def test_bfloat16_import_and_export(case, tmp_path):
  if case['name'] != 'llama_mha_tied':
    pytest.skip('one case suffices')
  config, params = import_hf(case['hf_dir'], str(tmp_path / 'wd'), dtype='bfloat16')
  assert config.model.param_dtype == 'bfloat16'
  jax.tree.map(lambda b, f: np.testing.assert_array_equal(b, f.astype(jnp.bfloat16)), params,
               case['params'])
  hf = export_hf(str(tmp_path / 'wd'), str(tmp_path / 'hf'))
  assert hf.get('dtype', hf.get('torch_dtype')) == 'bfloat16'
  reloaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / 'hf'),
                                                           dtype=torch.bfloat16)
  assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16


def test_tokenizer_copied_and_wrapped(case):
  if case['name'] != 'llama_mha_tied':
    pytest.skip('only this case ships a tokenizer')
  path = case['config'].data.tokenizer
  assert path == os.path.join(os.path.abspath(case['workdir']), 'tokenizer.json')
  tok = load_tokenizer(path, VOCAB)
  ids = tok.encode('def x ( ) : return hello world')
  assert ids == [6, 8, 9, 10, 11, 7, 4, 5]
  assert tok.decode(ids) == 'def x ( ) : return hello world'
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 3, 12)
  assert pickle.loads(pickle.dumps(tok)).encode('hello') == [4]
  hf_dir2 = str(case['root'] / 'hf_tok')
  export_hf(case['workdir'], hf_dir2)
  assert os.path.isfile(os.path.join(hf_dir2, 'tokenizer.json'))
  assert transformers.AutoTokenizer.from_pretrained(hf_dir2).encode(
      'hello world', add_special_tokens=False) == [4, 5]


_BASE_HF = dict(architectures=['LlamaForCausalLM'], hidden_size=64, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=96, vocab_size=VOCAB, hidden_act='silu')


@pytest.mark.parametrize('change, field', [
    ({'hidden_act': 'gelu'}, 'hidden_act'),
    ({'attention_bias': True}, 'attention_bias'),
    ({'mlp_bias': True}, 'mlp_bias'),
    ({'rope_scaling': {'rope_type': 'yarn', 'factor': 4.0}}, 'rope_scaling'),
    ({'rope_parameters': {'rope_type': 'dynamic', 'rope_theta': 1e4}}, 'rope_parameters'),
    ({'architectures': ['Qwen3ForCausalLM']}, 'architectures'),
    ({'architectures': ['Qwen2ForCausalLM'], 'use_sliding_window': True, 'sliding_window': 4},
     'use_sliding_window'),
    ({'architectures': ['Qwen2ForCausalLM'], 'mlp_bias': True}, 'mlp_bias'),
    ({'architectures': ['GPT2LMHeadModel']}, 'architectures'),
    ({'sliding_window': 4}, 'sliding_window'),
    ({'layer_types': ['full_attention', 'sliding_attention']}, 'layer_types'),
    ({'quantization_config': {'quant_method': 'gptq'}}, 'quantization_config'),
])
def test_unsupported_config_names_the_field(change, field):
  with pytest.raises(ConversionError, match=f'^{field}:'):
    model_config_from_hf(dict(_BASE_HF, **change))


def test_qwen2_config():
  values = model_config_from_hf(dict(_BASE_HF, architectures=['Qwen2ForCausalLM'],
                                     use_sliding_window=False, sliding_window=32768))
  assert values['qkv_bias'] and values['sliding_window'] == 0
  assert not model_config_from_hf(_BASE_HF)['qkv_bias']
  model = config_lib.base_config().model
  model.update(qkv_bias=True)
  hf = hf_config_from_model(model, 'float32', {'attention_bias': True, 'model_type': 'llama'})
  assert hf['architectures'] == ['Qwen2ForCausalLM'] and hf['model_type'] == 'qwen2'
  assert 'attention_bias' not in hf and hf['use_sliding_window'] is False
  model.update(sliding_window=8)
  with pytest.raises(ConversionError, match='^model.sliding_window:'):
    hf_config_from_model(model, 'float32')


def test_qkv_bias_off_and_zero_change_nothing():
  """Without qkv_bias the param tree has no bias leaves; with it, zero-initialised biases
  leave the kernels' init and the logits exactly as without."""
  base = transformer.ModelConfig(vocab_size=VOCAB, num_layers=2, d_model=64, num_heads=4,
                                 num_kv_heads=2, head_dim=16, mlp_dim=96, init_std=0.2)
  biased = transformer.ModelConfig(**dict(vars(base), qkv_bias=True))
  assert set(abstract_params(base)['layers_0']['attn']) == {'q', 'k', 'v', 'o'}
  p0 = jax.tree.map(lambda x: x.unbox() if hasattr(x, 'unbox') else x,
                    transformer.init_params(base, jax.random.key(0)),
                    is_leaf=lambda x: hasattr(x, 'unbox'))
  p1 = jax.tree.map(lambda x: x.unbox() if hasattr(x, 'unbox') else x,
                    transformer.init_params(biased, jax.random.key(0)),
                    is_leaf=lambda x: hasattr(x, 'unbox'))
  attn = p1['layers_0']['attn']
  assert attn['q_bias'].shape == (4, 16) and attn['k_bias'].shape == attn['v_bias'].shape == (2, 16)
  assert not np.any(np.asarray(attn['q_bias']))
  for i in range(2):
    for name in ('q_bias', 'k_bias', 'v_bias'):
      del p1[f'layers_{i}']['attn'][name]
  jax.tree.map(np.testing.assert_array_equal, p1, p0)
  tokens = np.random.RandomState(3).randint(0, VOCAB, (1, LENGTH))
  p1 = jax.tree.map(lambda x: x.unbox() if hasattr(x, 'unbox') else x,
                    transformer.init_params(biased, jax.random.key(0)),
                    is_leaf=lambda x: hasattr(x, 'unbox'))
  np.testing.assert_array_equal(_lmjax_logits(biased, p1, tokens), _lmjax_logits(base, p0, tokens))
  assert flops.param_counts(biased)['total'] == sum(x.size for x in jax.tree.leaves(p1))


def test_unsupported_checkpoint_errors(tmp_path):
  model = _hf_model('llama', dict(num_key_value_heads=4, attention_bias=True))
  model.save_pretrained(str(tmp_path / 'bias'))
  with pytest.raises(ConversionError, match='^attention_bias:'):
    import_hf(str(tmp_path / 'bias'), str(tmp_path / 'wd'))
  # a bias tensor smuggled into a config that does not declare it
  with open(tmp_path / 'bias' / 'config.json') as f:
    hf = json.load(f)
  hf['attention_bias'] = False
  with open(tmp_path / 'bias' / 'config.json', 'w') as f:
    json.dump(hf, f)
  with pytest.raises(ConversionError, match=r'self_attn\.[qkvo]_proj\.bias: unexpected tensor'):
    import_hf(str(tmp_path / 'bias'), str(tmp_path / 'wd'))


def test_pickle_refused_without_flag(tmp_path):
  model = _hf_model('llama', dict(num_key_value_heads=2))
  hf_dir = tmp_path / 'bin'
  hf_dir.mkdir()
  model.config.to_json_file(str(hf_dir / 'config.json'))
  torch.save(model.state_dict(), str(hf_dir / 'pytorch_model.bin'))
  with pytest.raises(ConversionError, match='allow_pickle'):
    import_hf(str(hf_dir), str(tmp_path / 'wd'))
  _, params = import_hf(str(hf_dir), str(tmp_path / 'wd'), allow_pickle=True)
  np.testing.assert_array_equal(params['embed'], model.model.embed_tokens.weight.detach().numpy())


def test_command_line(case, tmp_path, capsys):
  if case['name'] != 'mistral_sliding_window':
    pytest.skip('one case suffices')
  import importlib.util  # pylint: disable=g-import-not-at-top
  tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools',
                      'convert_hf.py')
  spec = importlib.util.spec_from_file_location('convert_hf', tool)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  workdir, hf_dir = str(tmp_path / 'wd'), str(tmp_path / 'hf')
  assert module.main([f'--from_hf={case["hf_dir"]}', f'--workdir={workdir}',
                      '--dtype=bfloat16']) == 0
  assert module.main([f'--workdir={workdir}', f'--to_hf={hf_dir}', '--dtype=float32']) == 0
  with open(os.path.join(hf_dir, 'config.json')) as f:
    exported = json.load(f)
  assert exported['architectures'] == ['MistralForCausalLM'] and exported['sliding_window'] == 5
  assert module.main([f'--from_hf={tmp_path / "missing"}', f'--workdir={workdir}']) == 2
  assert 'no config.json' in capsys.readouterr().err


def test_export_of_a_trained_workdir(tmp_path):
  """A model trained from scratch (train checkpoint, no HF config of origin) exports loadably."""
  config = config_lib.base_config()
  config.model.update(vocab_size=VOCAB, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
                      mlp_dim=96, max_seq_len=64, rope_theta=1000.0, sliding_window=7,
                      init_std=0.2)
  config.seq_len = 64
  cfg = transformer.ModelConfig.from_config(config.model)
  params = jax.tree.map(lambda x: x.unbox() if hasattr(x, 'unbox') else x,
                        transformer.init_params(cfg, jax.random.key(3)),
                        is_leaf=lambda x: hasattr(x, 'unbox'))
  workdir = tmp_path / 'trained'
  workdir.mkdir()
  (workdir / 'config.json').write_text(config_lib.to_json(config))
  checkpointer = checkpoint.Checkpointer(str(workdir), async_save=False)
  checkpointer.save(5, {'params': params, 'step': jnp.int32(5)}, {}, force=True)
  checkpointer.close()
  hf = export_hf(str(workdir), str(tmp_path / 'hf'))
  assert hf['architectures'] == ['MistralForCausalLM'] and hf['sliding_window'] == 7
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'hf'),
                                                            attn_implementation='eager').eval()
  tokens = np.random.RandomState(2).randint(0, VOCAB, (1, LENGTH))
  np.testing.assert_allclose(_lmjax_logits(cfg, params, tokens), _hf_logits(model, tokens),
                             rtol=1e-4, atol=1e-4)
