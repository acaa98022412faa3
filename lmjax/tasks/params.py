"""The params layout of the fine-tuning tasks (sft, reward, dpo, ppo): a frozen base, what trains.

A fine-tuning state holds `params = {'trainable': {...}, 'frozen': {...}}`; only `trainable`
is differentiated and has optimizer state.
  trainable['model']     base leaves that train (all of them in full fine-tuning, minus
                         `peft.freeze_patterns`; only `peft.train_patterns` with adapters)
  trainable['adapters']  LoRA / DoRA / VeRA leaves (see `lmjax.peft.lora`), or the leaves of an
                         in-model method (bottleneck / prefix / prompt / p_tuning, see
                         `lmjax.peft.hooks`; the forward pass gets them via `peft_leaves`)
  trainable['head']      reward model: scalar head {'w': (D,), 'b': ()}
  trainable['value']     PPO: value head {'w': (D,), 'b': ()}
  frozen['model']        the other base leaves (held in `peft.base_dtype`; int8 / nf4 store the
                         matmul weights as {'int8'|'nf4': codes, 'absmax': scales}, see
                         `lmjax.peft.quant`, dequantised by `model_params`)
  frozen['ref']          DPO/KTO/PPO reference model when the base itself trains (with adapters
                         the reference is the base with the adapters off: no second copy)
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from lmjax.peft import hooks, lora, quant

def _matches(pattern: str, path) -> bool:
  return bool(pattern) and re.search(pattern, lora.path_name(path)) is not None


def split_model(task, model_params):
  """(trainable, frozen) halves of the base params (nested dicts, either may be empty)."""
  flat = traverse_util.flatten_dict(model_params)
  if task.peft.enabled:
    trains = lambda p: _matches(task.peft.train_patterns, p)
  else:
    trains = lambda p: not _matches(task.peft.freeze_patterns, p)
  trainable = {p: v for p, v in flat.items() if trains(p)}
  if quant.is_quantized(task.peft.base_dtype):  # int8 / nf4: matmul weights become small dicts
    frozen = {p: quant.quantize_leaf(p, v, task.peft.base_dtype, task.model.scan_layers)
              for p, v in flat.items() if not trains(p)}
  else:
    dtype = jnp.dtype(task.peft.base_dtype)
    frozen = {p: jax.tree.map(lambda x: x.astype(dtype), v) for p, v in flat.items()
              if not trains(p)}
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def _stored_base(task, frozen_model):
  """The frozen base as the model will read it (dequantised, float32), plain arrays."""
  return quant.dequantize_tree(nn.unbox(frozen_model), task.model.scan_layers, jnp.float32)


def _head(d_model: int):
  return {'w': jnp.zeros((d_model,), jnp.float32), 'b': jnp.zeros((), jnp.float32)}


def build_params(task, model_params, rng):
  """The post-training params tree around (possibly boxed) base params."""
  plain = nn.unbox(model_params)
  trainable_model, frozen_model = split_model(task, model_params)
  trainable, frozen = {}, {}
  if trainable_model:
    trainable['model'] = trainable_model
  if frozen_model:
    frozen['model'] = frozen_model
  if hooks.is_hook_method(task.peft.method):
    trainable['adapters'] = hooks.init_leaves(task.peft, task.model, plain, rng)
  elif task.peft.enabled:
    if task.peft.method == 'dora' and quant.is_quantized(task.peft.base_dtype):
      plain = _deep_merge(plain, _stored_base(task, frozen_model))  # magnitudes of the stored W
    adapters = lora.init_adapters(task.peft, plain, rng, task.model.scan_layers)
    if task.peft.method == 'lora_fa':  # A stays frozen: no gradient, no optimizer state
      flat = traverse_util.flatten_dict(adapters)
      frozen['adapters'] = traverse_util.unflatten_dict(
          {p: v for p, v in flat.items() if p[-1] == 'a'})
      adapters = traverse_util.unflatten_dict({p: v for p, v in flat.items() if p[-1] != 'a'})
    trainable['adapters'] = adapters
  for name in task.heads:  # scalar heads: reward model ('head'), PPO's value head ('value')
    trainable[name] = _head(task.model.d_model)
  if task.needs_reference and not task.peft.enabled:
    frozen['ref'] = model_params
  return {'trainable': trainable, 'frozen': frozen}


def _deep_merge(a: dict, b: dict) -> dict:
  flat = dict(traverse_util.flatten_dict(a))
  flat.update(traverse_util.flatten_dict(b))
  return traverse_util.unflatten_dict(flat)


def adapters_of(params) -> dict:
  """All adapter leaves (trainable ones and LoRA-FA's frozen A)."""
  return _deep_merge(params['frozen'].get('adapters', {}), params['trainable'].get('adapters', {}))


def _base_model(task, params, dtype=None):
  """The base tree (frozen and trainable leaves); a quantised (int8 / nf4) frozen base comes back
  dequantised to `dtype` (default: bfloat16 under a bfloat16 model.dtype, else float32)."""
  frozen = params['frozen'].get('model', {})
  if quant.is_quantized(task.peft.base_dtype):
    if dtype is None:
      dtype = jnp.bfloat16 if jnp.dtype(task.model.dtype) == jnp.bfloat16 else jnp.float32
    frozen = quant.dequantize_tree(frozen, task.model.scan_layers, dtype)
  return _deep_merge(frozen, params['trainable'].get('model', {}))


def model_params(task, params, rng=None, adapters: bool = True, merged: bool = False):
  """The params tree the Transformer reads (adapters applied unless `adapters=False`).

  Low-rank adapters are attached next to their weights (`lora.attach`) and a quantised frozen
  base stays quantised: the model applies and decodes them inside each layer, so no float copy of
  the whole model is built. `merged=True` builds the adapted, decoded weights once instead, for
  decoding many steps with the same weights. In-model methods leave it as the base: pass
  `peft_leaves(task, params)` to the forward pass."""
  stacked = task.model.scan_layers
  if merged:
    base = _base_model(task, params)
    if adapters and task.peft.low_rank:
      return lora.effective_params(task.peft, base, adapters_of(params), rng, stacked)
    return base
  frozen = params['frozen'].get('model', {})
  base = _deep_merge(frozen, params['trainable'].get('model', {}))
  if adapters and task.peft.low_rank:
    return lora.attach(task.peft, base, adapters_of(params), rng, stacked,
                       quant.weight_shapes(frozen, stacked))
  return base


def peft_leaves(task, params):
  """The `peft` argument of `forward` (in-model methods: bottleneck, prefix, prompt, p_tuning);
  None for the other methods, whose adapters `model_params` already applies."""
  if not hooks.is_hook_method(task.peft.method):
    return None
  return hooks.model_peft(task.peft, adapters_of(params))


def reference_params(task, params):
  """The frozen reference policy: a stored copy, or the base with the adapters off."""
  if 'ref' in params['frozen']:
    return params['frozen']['ref']
  return jax.lax.stop_gradient(model_params(task, params, adapters=False))


def merged_model_params(task, params):
  """Base params with adapters folded in, in the base's storage dtype (for export; a quantised
  base exports float weights, in model.param_dtype).
  Raises ValueError for in-model methods (bottleneck / prefix / prompt / p_tuning)."""
  if hooks.is_hook_method(task.peft.method):
    raise hooks.merge_error(task.peft.method)
  if quant.is_quantized(task.peft.base_dtype):  # merged into the dequantised weights: a float
    dtype = jnp.dtype(task.model.param_dtype)  # export, every leaf in model.param_dtype
    base = jax.tree.map(lambda x: x.astype(dtype), _base_model(task, params, jnp.float32))
  else:
    base = model_params(task, params, adapters=False)
  if not task.peft.enabled:
    return base
  return lora.merge(task.peft, base, adapters_of(params), task.model.scan_layers)


def place_model(task, params, loaded_model):
  """`params` with its base (and reference) replaced by `loaded_model` (plain arrays)."""
  trainable_model, frozen_model = split_model(task, loaded_model)
  trainable, frozen = dict(params['trainable']), dict(params['frozen'])
  if trainable_model:
    trainable['model'] = trainable_model
  if frozen_model:
    frozen['model'] = frozen_model
  if 'ref' in frozen:  # its own buffers: the train step donates the state
    frozen['ref'] = jax.tree.map(jnp.copy, loaded_model)
  if task.peft.method == 'dora':  # DoRA's magnitudes start as the column norms of the new base
    base = _deep_merge(loaded_model, _stored_base(task, frozen_model))
    fresh = traverse_util.flatten_dict(lora.init_adapters(task.peft, base, jax.random.key(0),
                                                          task.model.scan_layers))
    adapters = dict(traverse_util.flatten_dict(trainable['adapters']))
    adapters.update({p: v for p, v in fresh.items() if p[-1] == 'm'})
    trainable['adapters'] = traverse_util.unflatten_dict(adapters)
  new = {'trainable': trainable, 'frozen': frozen}
  return jax.tree.map(lambda n, o: jax.device_put(n.astype(o.dtype), o.sharding), new, params)
