"""Hugging Face `config.json` <-> the lmjax `model` config group.

Only architectures that lmjax computes exactly are accepted: LLaMA, Mistral (a LLaMA with a
sliding attention window), Qwen2 (a LLaMA with q/k/v projection biases, `model.qkv_bias`) and
Mixtral (a Mistral whose MLPs are top-k softmax-routed experts, renormalised: `model.moe`).
Every field that would change the computation and that lmjax does not implement raises
`ConversionError` naming the field; nothing is approximated silently.

Both config styles are read: transformers 4 (`rope_theta`, `rope_scaling`) and transformers 5
(`rope_parameters` holding `rope_theta` and `rope_type`).
"""

from __future__ import annotations

import copy

SUPPORTED_ARCHITECTURES = {'LlamaForCausalLM': 'llama', 'MistralForCausalLM': 'mistral',
                           'Qwen2ForCausalLM': 'qwen2', 'MixtralForCausalLM': 'mixtral'}
_REJECTED_ARCHITECTURES = {
    'Qwen3ForCausalLM': 'has q/k RMS norms, which lmjax attention does not implement',
    'GemmaForCausalLM': 'uses GeLU, (1 + w) RMSNorm scales and scaled embeddings',
    'Qwen2MoeForCausalLM': 'has gated shared experts, which lmjax MoE does not implement',
    'Qwen3MoeForCausalLM': 'has q/k RMS norms, which lmjax attention does not implement',
    'DeepseekV3ForCausalLM': 'uses multi-head latent attention (MLA)',
}
_DEFAULT_ROPE_TYPES = (None, 'default')


class ConversionError(ValueError):
  """A checkpoint or config that cannot be converted exactly; the message names the field."""


def _rope_settings(hf: dict) -> tuple[float, dict]:
  """(rope_theta, lmjax rope-scaling keys) from either config style."""
  params = hf.get('rope_parameters')
  if isinstance(params, dict) and 'rope_type' not in params and params:
    # Per-layer-type rope parameters (e.g. {'full_attention': {...}}): not a LLaMA layout.
    raise ConversionError(f'rope_parameters: per-layer-type rope settings are not supported: '
                          f'{params!r}')
  scaling = params if isinstance(params, dict) else hf.get('rope_scaling') or {}
  theta = (params or {}).get('rope_theta', hf.get('rope_theta', 10000.0))
  field = 'rope_parameters' if isinstance(params, dict) else 'rope_scaling'
  rope_type = scaling.get('rope_type', scaling.get('type'))
  if rope_type not in _DEFAULT_ROPE_TYPES + ('llama3',):
    raise ConversionError(f'{field}: rope type {rope_type!r} is not supported (only default '
                          'and llama3 RoPE); refusing to approximate it')
  if scaling.get('partial_rotary_factor', 1.0) != 1.0 or hf.get('partial_rotary_factor',
                                                                  1.0) != 1.0:
    raise ConversionError('partial_rotary_factor: only full rotary embeddings are supported')
  if rope_type != 'llama3':
    return float(theta), {}
  try:
    return float(theta), dict(
        rope_scaling='llama3', rope_scaling_factor=float(scaling['factor']),
        rope_low_freq_factor=float(scaling['low_freq_factor']),
        rope_high_freq_factor=float(scaling['high_freq_factor']),
        rope_original_max_len=int(scaling['original_max_position_embeddings']))
  except KeyError as e:
    raise ConversionError(f'{field}: llama3 rope scaling without {e.args[0]}') from None


def _architecture(hf: dict) -> str:
  archs = hf.get('architectures') or []
  if len(archs) > 1:
    raise ConversionError(f'architectures: expected one architecture, got {archs!r}')
  if archs:
    arch = archs[0]
  else:  # old configs without `architectures`: fall back to model_type
    by_type = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
    arch = by_type.get(hf.get('model_type'), f'model_type={hf.get("model_type")!r}')
  if arch in _REJECTED_ARCHITECTURES:
    raise ConversionError(f'architectures: {arch} {_REJECTED_ARCHITECTURES[arch]}')
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ConversionError(f'architectures: {arch} is not supported (supported: '
                          f'{", ".join(SUPPORTED_ARCHITECTURES)})')
  return arch


def _require(hf: dict, key: str):
  if hf.get(key) is None:
    raise ConversionError(f'{key}: missing from the Hugging Face config')
  return hf[key]


def model_config_from_hf(hf: dict) -> dict:
  """The lmjax `model.*` values for a Hugging Face config dict; raises ConversionError."""
  arch = _architecture(hf)
  act = hf.get('hidden_act', hf.get('hidden_activation', 'silu'))
  if act not in ('silu', 'swish'):
    raise ConversionError(f'hidden_act: {act!r} is not supported (lmjax MLPs are SwiGLU: silu)')
  qkv_bias = arch == 'Qwen2ForCausalLM'  # always q/k/v biases, never o/MLP ones
  # (transformers' Qwen2 ignores `attention_bias`: its q/k/v projections always have biases)
  for key in ('mlp_bias',) if qkv_bias else ('attention_bias', 'mlp_bias'):
    if hf.get(key):
      raise ConversionError(f'{key}: projection biases are not supported')
  if hf.get('quantization_config'):
    raise ConversionError('quantization_config: quantized checkpoints are not supported')
  moe = {}
  if arch == 'MixtralForCausalLM':
    moe = dict(num_experts=int(_require(hf, 'num_local_experts')),
               experts_per_token=int(_require(hf, 'num_experts_per_tok')),
               expert_mlp_dim=int(_require(hf, 'intermediate_size')))
  elif hf.get('num_experts') or hf.get('num_local_experts'):
    raise ConversionError('num_local_experts: mixture-of-experts models other than Mixtral are '
                          'not supported')
  theta, rope_scaling = _rope_settings(hf)

  d_model = int(_require(hf, 'hidden_size'))
  num_heads = int(_require(hf, 'num_attention_heads'))
  num_kv_heads = int(hf.get('num_key_value_heads') or num_heads)
  head_dim = int(hf.get('head_dim') or d_model // num_heads)

  sliding_window = 0
  if arch == 'Qwen2ForCausalLM' and hf.get('use_sliding_window'):
    # Qwen2 slides only the layers from `max_window_layers` on (per `layer_types`); lmjax
    # slides all or none, and this is not checked to match transformers exactly.
    raise ConversionError('use_sliding_window: Qwen2 sliding-window attention is not supported '
                          '(only use_sliding_window=false)')
  if arch in ('MistralForCausalLM', 'MixtralForCausalLM') and hf.get('sliding_window'):
    sliding_window = int(hf['sliding_window'])
  elif hf.get('sliding_window') and hf.get('use_sliding_window', True):
    raise ConversionError(f'sliding_window: {arch} does not use a sliding window in '
                          'transformers; refusing a config that sets one')
  layer_types = set(hf.get('layer_types') or ())
  expected_type = 'sliding_attention' if sliding_window else 'full_attention'
  if layer_types - {expected_type}:
    raise ConversionError(f'layer_types: {sorted(layer_types)} is not supported (lmjax uses one '
                          f'attention type for every layer: {expected_type})')

  return dict(
      vocab_size=int(_require(hf, 'vocab_size')),
      num_layers=int(_require(hf, 'num_hidden_layers')),
      d_model=d_model,
      num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      head_dim=head_dim,
      mlp_dim=int(_require(hf, 'intermediate_size')),
      max_seq_len=int(hf.get('max_position_embeddings') or 2048),
      rope_theta=theta,
      norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
      tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
      sliding_window=sliding_window,
      qkv_bias=qkv_bias,
      **rope_scaling,
      **({'moe': moe} if moe else {}),
  )


def hf_config_from_model(model, dtype: str, base: dict | None = None,
                         special_ids: dict | None = None) -> dict:
  """A Hugging Face config dict for the lmjax `model` group.

  `base` (the config an imported model came with) keeps fields such as token ids; the
  architecture fields are always rewritten from `model`.
  """
  head_dim = model.head_dim or model.d_model // model.num_heads
  qkv_bias = bool(model.get('qkv_bias', False))
  if qkv_bias and model.sliding_window:
    raise ConversionError('model.sliding_window: a sliding window with model.qkv_bias has no exact '
                          'HF equivalent (Qwen2 with use_sliding_window is not supported)')
  moe = model.get('moe', {})
  if moe and moe.num_experts:
    arch = 'MixtralForCausalLM'
    for key, ok in (('num_shared_experts', moe.num_shared_experts == 0),
                    ('first_k_dense', moe.first_k_dense == 0), ('moe_every', moe.moe_every == 1),
                    ('router', moe.router in ('softmax_topk', 'topk_softmax')),
                    ('renormalize', moe.renormalize or moe.router == 'topk_softmax'),
                    ('qkv_bias', not qkv_bias)):
      if not ok:
        raise ConversionError(f'model.moe.{key}: {moe.get(key, qkv_bias)!r} has no Mixtral '
                              'equivalent (Mixtral: every layer MoE, renormalised softmax top-k, '
                              'no shared experts)')
  elif qkv_bias:
    arch = 'Qwen2ForCausalLM'
  else:
    arch = 'MistralForCausalLM' if model.sliding_window else 'LlamaForCausalLM'
  hf = copy.deepcopy(base) if base else {}
  dtype_key = 'dtype' if 'dtype' in hf else 'torch_dtype'  # transformers 5 / 4 spelling
  for key in ('rope_scaling', 'sliding_window', 'layer_types', 'torch_dtype', 'dtype',
              'quantization_config', 'use_sliding_window', 'max_window_layers', 'attention_bias',
              'mlp_bias'):
    hf.pop(key, None)
  hf.update(
      architectures=[arch],
      model_type=SUPPORTED_ARCHITECTURES[arch],
      vocab_size=model.vocab_size,
      hidden_size=model.d_model,
      intermediate_size=model.mlp_dim,
      num_hidden_layers=model.num_layers,
      num_attention_heads=model.num_heads,
      num_key_value_heads=model.num_kv_heads,
      head_dim=head_dim,
      hidden_act='silu',
      max_position_embeddings=model.max_seq_len,
      rms_norm_eps=model.norm_eps,
      tie_word_embeddings=bool(model.tie_embeddings),
  )
  if arch == 'MixtralForCausalLM':
    for key in ('attention_bias', 'mlp_bias'):
      hf.pop(key, None)
    hf.update(num_local_experts=moe.num_experts, num_experts_per_tok=moe.experts_per_token,
              intermediate_size=moe.expert_mlp_dim or model.mlp_dim, router_jitter_noise=0.0,
              router_aux_loss_coef=moe.aux_loss_coef, output_router_logits=False,
              sliding_window=model.sliding_window or None)
  elif qkv_bias:  # Qwen2: q/k/v biases are implied; no attention_bias / mlp_bias fields
    hf['use_sliding_window'] = False
  else:
    hf.update(attention_bias=False, mlp_bias=False)
  if model.sliding_window:
    hf['sliding_window'] = model.sliding_window
  scaling = None
  if model.get('rope_scaling', 'none') == 'llama3':
    scaling = {'rope_type': 'llama3', 'factor': model.rope_scaling_factor,
               'low_freq_factor': model.rope_low_freq_factor,
               'high_freq_factor': model.rope_high_freq_factor,
               'original_max_position_embeddings': model.rope_original_max_len}
  elif model.get('rope_scaling', 'none') != 'none':
    raise ConversionError(f'model.rope_scaling: {model.rope_scaling!r} has no HF equivalent')
  if 'rope_parameters' in hf:  # transformers 5 style
    hf['rope_parameters'] = dict(scaling or {'rope_type': 'default'}, rope_theta=model.rope_theta)
  else:
    hf['rope_theta'] = model.rope_theta
    hf['rope_scaling'] = scaling
  hf[dtype_key] = dtype
  for key, value in (special_ids or {}).items():
    hf.setdefault(key, value)
  return hf
