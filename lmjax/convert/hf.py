"""Import Hugging Face LLaMA / Mistral / Qwen2 / Mixtral checkpoints into lmjax workdirs; export them
back.

Weight layout (HF `nn.Linear` weights are (out, in); lmjax weights are (in, out...)):
  model.embed_tokens.weight (V, D)                 embed (V, D)
  model.layers.{i}.self_attn.q_proj.weight (H*Dh, D)  layers_{i}/attn/q (D, H, Dh)   (k, v: K heads)
  model.layers.{i}.self_attn.q_proj.bias (H*Dh,)      layers_{i}/attn/q_bias (H, Dh)  (k, v: K;
                                                      only with `model.qkv_bias`, i.e. Qwen2)
  model.layers.{i}.self_attn.o_proj.weight (D, H*Dh)  layers_{i}/attn/o (H, Dh, D)
  model.layers.{i}.mlp.{gate,up}_proj.weight (F, D)   layers_{i}/mlp/{gate,up} (D, F)
  model.layers.{i}.mlp.down_proj.weight (D, F)        layers_{i}/mlp/down (F, D)
  model.layers.{i}.input_layernorm.weight             layers_{i}/attn_norm/scale
  model.layers.{i}.post_attention_layernorm.weight    layers_{i}/mlp_norm/scale
  model.norm.weight                                   final_norm/scale
  lm_head.weight (V, D)                               lm_head (D, V)  (absent when tied)
Mixtral (`model.moe`; the on-disk per-expert layout that transformers 5 also writes):
  model.layers.{i}.block_sparse_moe.gate.weight (E, D)          layers_{i}/moe/router (D, E)
  model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight (F, D) layers_{i}/moe/gate[j] (D, F)
  ... experts.{j}.w3.weight (F, D)                              layers_{i}/moe/up[j] (D, F)
  ... experts.{j}.w2.weight (D, F)                              layers_{i}/moe/down[j] (F, D)
With `model.scan_layers` the per-layer weights are stacked under `layers/...` on a leading axis.

RoPE: no permutation of q/k is needed. Hugging Face LLaMA checkpoints already use the rotate-half
layout (dimension i rotates with i + Dh/2): the q/k rows were permuted from Meta's interleaved
layout when the checkpoint was converted to HF format, and lmjax's `rope` uses rotate-half too.
The logit-parity tests in tests/test_convert.py check this against transformers.
"""

from __future__ import annotations

import json
import os
import shutil

import flax.linen as nn
import jax
import numpy as np

from lmjax import config as config_lib
from lmjax import tasks
from lmjax import workdir as workdir_lib
from lmjax.convert import hf_config, weights
from lmjax.convert.hf_config import ConversionError
from lmjax.models import transformer
from lmjax.models.moe import is_moe_layer

# Copied from the HF dir into the workdir on import, and back on export.
EXTRA_FILES = ('tokenizer.model', 'tokenizer.json', 'tokenizer_config.json',
               'special_tokens_map.json', 'added_tokens.json', 'generation_config.json')
HF_CONFIG_COPY = 'hf_config.json'  # the imported model's own config, kept for export
_IGNORED_TENSOR_SUFFIXES = ('.rotary_emb.inv_freq',)  # recomputed buffers in old checkpoints


def _specs(cfg: transformer.ModelConfig):
  """(layer index or None, path inside the layer or model, HF name, layout kind, expert index or
  None)."""
  specs = [(None, ('embed',), 'model.embed_tokens.weight', 'copy')]
  for i in range(cfg.num_layers):
    pre = f'model.layers.{i}.'
    specs += [
        (i, ('attn', 'q'), pre + 'self_attn.q_proj.weight', 'proj_in'),
        (i, ('attn', 'k'), pre + 'self_attn.k_proj.weight', 'proj_in'),
        (i, ('attn', 'v'), pre + 'self_attn.v_proj.weight', 'proj_in'),
    ]
    if cfg.qkv_bias:
      specs += [(i, ('attn', f'{p}_bias'), pre + f'self_attn.{p}_proj.bias', 'bias')
                for p in ('q', 'k', 'v')]
    specs += [
        (i, ('attn', 'o'), pre + 'self_attn.o_proj.weight', 'proj_out'),
        (i, ('attn_norm', 'scale'), pre + 'input_layernorm.weight', 'copy'),
        (i, ('mlp_norm', 'scale'), pre + 'post_attention_layernorm.weight', 'copy'),
    ]
    if is_moe_layer(cfg.moe, i):
      moe = pre + 'block_sparse_moe.'
      specs.append((i, ('moe', 'router'), moe + 'gate.weight', 'transpose'))
      for j in range(cfg.moe.num_experts):
        specs += [(i, ('moe', name), moe + f'experts.{j}.{hf_name}.weight', 'transpose', j)
                  for name, hf_name in (('gate', 'w1'), ('up', 'w3'), ('down', 'w2'))]
    else:
      specs += [(i, ('mlp', name), pre + f'mlp.{name}_proj.weight', 'transpose')
                for name in ('gate', 'up', 'down')]
  specs.append((None, ('final_norm', 'scale'), 'model.norm.weight', 'copy'))
  if not cfg.tie_embeddings:
    specs.append((None, ('lm_head',), 'lm_head.weight', 'transpose'))
  return [spec + (None,) * (5 - len(spec)) for spec in specs]


def _lead(cfg, layer, expert) -> tuple:
  """The leading indices of one HF tensor inside its lmjax leaf (stacked layer, expert)."""
  return (((layer,) if cfg.scan_layers and layer is not None else ())
          + ((expert,) if expert is not None else ()))


def _tree_path(cfg, layer, path):
  if layer is None:
    return path
  return (('layers',) if cfg.scan_layers else (f'layers_{layer}',)) + path


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _to_lmjax(kind, w, shape, name):
  hf_shape = w.shape
  if kind not in ('copy', 'bias'):
    w = w.T
  if (w.size != int(np.prod(shape)) or (kind in ('copy', 'transpose') and w.shape != shape) or
      (kind == 'bias' and w.ndim != 1)):
    raise ConversionError(f'{name}: shape {hf_shape} does not match the config (lmjax expects '
                          f'{shape} in its layout)')
  return w.reshape(shape)


def _to_hf(kind, p):
  if kind == 'proj_in':
    return p.reshape(p.shape[0], -1).T
  if kind == 'proj_out':
    return p.reshape(-1, p.shape[-1]).T
  if kind == 'bias':
    return p.reshape(-1)
  return p.T if kind == 'transpose' else p


def abstract_params(cfg: transformer.ModelConfig):
  """Shapes and dtypes of the unboxed params, without allocating them."""
  return jax.eval_shape(lambda: nn.unbox(transformer.init_params(cfg, jax.random.key(0))))


def read_hf_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, 'config.json')
  if not os.path.isfile(path):
    raise ConversionError(f'{hf_dir}: no config.json (expected a Hugging Face model directory)')
  with open(path) as f:
    return json.load(f)


def load_hf_params(hf_dir: str, cfg: transformer.ModelConfig, *, allow_pickle: bool = False,
                   shardings=None):
  """The lmjax params of a HF checkpoint, read and placed one tensor at a time.

  `shardings` (optional) is a tree like the params holding a `jax.sharding.Sharding` per leaf;
  each tensor is `jax.device_put` straight into it.
  """
  abstract = abstract_params(cfg)
  specs = _specs(cfg)
  reader = weights.open_checkpoint(hf_dir, allow_pickle)
  try:
    present = set(reader.names())
    expected = {spec[2] for spec in specs}
    if cfg.tie_embeddings:
      expected_optional = {'lm_head.weight'}  # some tied checkpoints store it anyway; unused
    else:
      expected_optional = set()
    unexpected = sorted(n for n in present - expected - expected_optional
                        if not n.endswith(_IGNORED_TENSOR_SUFFIXES))
    if unexpected:
      raise ConversionError(f'{unexpected[0]}: unexpected tensor in the checkpoint (e.g. a bias or '
                            f'a layer lmjax does not have; {len(unexpected)} unexpected in all)')
    missing = sorted(expected - present)
    if missing:
      raise ConversionError(f'{missing[0]}: missing from the checkpoint ({len(missing)} missing)')

    def place(path, array):
      sharding = _get(shardings, path) if shardings is not None else None
      return jax.device_put(array, sharding) if sharding is not None else jax.device_put(array)

    params, stacked = {}, {}
    for layer, path, name, kind, expert in specs:
      tree_path = _tree_path(cfg, layer, path)
      leaf = _get(abstract, tree_path)
      lead = _lead(cfg, layer, expert)
      shape = tuple(leaf.shape[len(lead):])
      array = _to_lmjax(kind, reader.get(name), shape, name).astype(leaf.dtype)
      if lead:  # fill a host buffer (stacked layers, experts); placed once every slice is in
        buffer, filled = stacked.get(tree_path) or (np.empty(leaf.shape, leaf.dtype), 0)
        buffer[lead] = array
        stacked[tree_path] = (buffer, filled + 1)
        if filled + 1 == int(np.prod(leaf.shape[:len(lead)])):
          _set(params, tree_path, place(tree_path, stacked.pop(tree_path)[0]))
      else:
        _set(params, tree_path, place(tree_path, array))
      del array
  finally:
    reader.close()
  return params


def import_hf(hf_dir: str, workdir: str, *, dtype: str = 'float32', allow_pickle: bool = False,
              scan_layers: bool = False, shardings=None):
  """Converts a HF model dir into an lmjax workdir (config.json, params/, tokenizer files).

  Returns (config, params).
  """
  if dtype not in ('float32', 'bfloat16'):
    raise ConversionError(f'--dtype: must be float32 or bfloat16; got {dtype!r}')
  hf = read_hf_config(hf_dir)
  model_values = hf_config.model_config_from_hf(hf)
  if os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise ConversionError(f'{workdir}: already holds training checkpoints, which would take '
                          'precedence over the converted params; use an empty workdir')
  config = config_lib.base_config()
  config.model.moe.update(model_values.pop('moe', {}))
  config.model.update(model_values)
  config.model.param_dtype = dtype
  config.model.scan_layers = scan_layers
  config.seq_len = min(config.seq_len, config.model.max_seq_len)
  config_lib.validate(config)
  cfg = transformer.ModelConfig.from_config(config.model)
  params = load_hf_params(hf_dir, cfg, allow_pickle=allow_pickle, shardings=shardings)

  os.makedirs(workdir, exist_ok=True)
  for file in EXTRA_FILES:
    if os.path.isfile(os.path.join(hf_dir, file)):
      shutil.copyfile(os.path.join(hf_dir, file), os.path.join(workdir, file))
  for file in ('tokenizer.model', 'tokenizer.json'):  # SentencePiece first: lmjax reads it natively
    if os.path.isfile(os.path.join(workdir, file)):
      config.data.tokenizer = os.path.join(os.path.abspath(workdir), file)
      break
  workdir_lib.write_json(os.path.join(workdir, HF_CONFIG_COPY), hf)
  workdir_lib.save_params(workdir, params, config)
  return config, params


def _special_ids(config) -> dict:
  if not config.data.tokenizer:
    return {}
  try:
    from lmjax.data.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
    tok = load_tokenizer(config.data.tokenizer)
  except Exception:  # pylint: disable=broad-except
    return {}
  return {'bos_token_id': tok.bos_id, 'eos_token_id': tok.eos_id}


def export_hf(workdir: str, hf_dir: str, *, dtype: str | None = None, params=None) -> dict:
  """Writes `hf_dir/config.json` + `model.safetensors` (+ tokenizer files) for a workdir.

  Returns the HF config dict. `dtype` defaults to the params' dtype.
  """
  config = workdir_lib.read_config(workdir)
  if config is None:
    raise ConversionError(f'{workdir}: no config.json (not an lmjax workdir)')
  cfg = transformer.ModelConfig.from_config(config.model)
  if params is None:  # onto one device, whatever mesh the checkpoint was written under
    params = tasks.load_trained(workdir, config)[1]
  elif isinstance(params, dict) and set(params) == {'trainable', 'frozen'}:
    params = tasks.from_config(config).decoding_params(params)  # adapters merged
  specs = _specs(cfg)
  wanted = {_tree_path(cfg, spec[0], spec[1]) for spec in specs}
  leaves = {tuple(k.key for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
  if leaves != wanted:
    extra = sorted('/'.join(p) for p in leaves - wanted) or sorted('/'.join(p)
                                                                   for p in wanted - leaves)
    raise ConversionError(f'{extra[0]}: params do not match the base architecture (unmerged '
                          'adapters or a config mismatch)')
  if dtype is None:
    dtype = str(np.dtype(params['embed'].dtype))
  if dtype not in ('float32', 'bfloat16'):
    raise ConversionError(f'--dtype: must be float32 or bfloat16; got {dtype!r}')
  np_dtype = np.dtype(dtype) if dtype == 'float32' else np.dtype(jax.numpy.bfloat16)

  by_name = {}
  tensors = []
  for layer, path, name, kind, expert in specs:
    leaf = _get(params, _tree_path(cfg, layer, path))
    shape = leaf.shape[len(_lead(cfg, layer, expert)):]
    hf_shape = _to_hf(kind, np.empty(shape, np.int8)).shape
    tensors.append((name, hf_shape, np_dtype))
    by_name[name] = (layer, path, kind, expert)

  def produce(name):
    layer, path, kind, expert = by_name[name]
    leaf = _get(params, _tree_path(cfg, layer, path))
    lead = _lead(cfg, layer, expert)
    if lead:
      leaf = leaf[lead]
    return _to_hf(kind, np.asarray(jax.device_get(leaf))).astype(np_dtype)

  os.makedirs(hf_dir, exist_ok=True)
  weights.write_safetensors(os.path.join(hf_dir, 'model.safetensors'), tensors, produce)
  base = None
  if os.path.isfile(os.path.join(workdir, HF_CONFIG_COPY)):
    with open(os.path.join(workdir, HF_CONFIG_COPY)) as f:
      base = json.load(f)
  hf = hf_config.hf_config_from_model(config.model, dtype, base, _special_ids(config))
  with open(os.path.join(hf_dir, 'config.json'), 'w') as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  for file in EXTRA_FILES:
    if os.path.isfile(os.path.join(workdir, file)):
      shutil.copyfile(os.path.join(workdir, file), os.path.join(hf_dir, file))
  tok_path = config.data.tokenizer
  if tok_path and os.path.isfile(tok_path):  # e.g. a tokenizer lmjax trained for this model
    target = 'tokenizer.json' if tok_path.endswith('.json') else 'tokenizer.model'
    if not os.path.exists(os.path.join(hf_dir, target)):
      shutil.copyfile(tok_path, os.path.join(hf_dir, target))
  return hf
