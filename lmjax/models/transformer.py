"""The LLaMA-style decoder: embedding, pre-RMSNorm attention + SwiGLU blocks, final norm, LM head.

Shapes: B batch, L query length, S key length (= L in training, the cache length in decoding),
T = B * L flattened tokens, D d_model, H heads, K kv heads, Dh head dim, F mlp dim, V vocab.

`forward(cfg, params, tokens_BL, positions_BL, segment_ids_BL)` returns the logits (float32);
`forward_cached(..., cache)` returns `(logits_BLV, cache)`: with a cache from `init_cache` the new
tokens' keys and values are written at `cache['index']` and the queries attend everything cached so
far (prefill and decode use the same path). `forward_hidden` adds the final-norm hidden states
(reward and value heads), `forward_head_inputs` gives them with the output projection (chunked
cross-entropy). `Transformer` exposes the three parts, `embed`, `trunk` and `head`, which pipeline
stages call too (`lmjax.parallel.pipeline`).

`peft` (default None: the plain model) carries the leaves of the PEFT methods that act inside the
forward pass (built by `lmjax.peft.hooks.model_peft`); it never adds params to the model tree:
  peft['layers']['adapter']  bottleneck adapters after attention and after the MLP, per layer:
                             {'attn'|'mlp': {'down': (N, D, r), 'down_b': (N, r), 'up': (N, r, D),
                             'up_b': (N, D)}} (N = num_layers)
  peft['layers']['prefix']   prefix tuning: {'k', 'v': (N, P, K, Dh)} extra keys/values every
                             non-padding query attends (see `attention.attention`)
  peft['prompt']             prompt tuning / P-tuning: (P, D) virtual-token embeddings before the
                             input. They attend only one another, so they run once through the
                             layers (positions 0..P-1) and their keys/values become a per-layer
                             prefix; the real tokens' positions move up by P.
Without the argument, a `params['peft']` entry is used instead (a trained in-model PEFT run loaded
for sampling / scoring: `lmjax.tasks.load_trained`); `init_params` never makes one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from lmjax.config import base_config
from lmjax.models import attention as attention_lib
from lmjax.models.layers import MLP, RMSNorm, constrain, param_with_axes, rope
from lmjax.models.moe import MoE, MoeConfig, is_moe_layer
from lmjax.parallel import target

_REMAT_POLICIES = {
    'full': None,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_saveable': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # each layer's attention output (named in `Attention`) besides the layer inputs: more than
    # `full` keeps, less than the dots policies (tests/test_model.py compares their temporaries)
    'minimal': jax.checkpoint_policies.save_only_these_names('attention_out'),
}


_SCHEMA = base_config().model  # the `model` group's defaults: one definition, in the schema


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The `model` group as hashable static data (head_dim and dtypes resolved)."""
  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  max_seq_len: int = _SCHEMA.max_seq_len
  rope_theta: float = _SCHEMA.rope_theta
  norm_eps: float = _SCHEMA.norm_eps
  tie_embeddings: bool = _SCHEMA.tie_embeddings
  sliding_window: int = _SCHEMA.sliding_window
  qkv_bias: bool = _SCHEMA.qkv_bias  # biases on the q/k/v projections (Qwen2)
  attention: str = _SCHEMA.attention
  scan_layers: bool = _SCHEMA.scan_layers
  remat: str = _SCHEMA.remat
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  init_std: float = _SCHEMA.init_std
  rope_scaling: str = _SCHEMA.rope_scaling  # none | llama3
  rope_scaling_factor: float = _SCHEMA.rope_scaling_factor
  rope_low_freq_factor: float = _SCHEMA.rope_low_freq_factor
  rope_high_freq_factor: float = _SCHEMA.rope_high_freq_factor
  rope_original_max_len: int = _SCHEMA.rope_original_max_len
  logits_chunk: int = _SCHEMA.logits_chunk
  context_parallel: str = _SCHEMA.context_parallel  # ring | allgather (mesh.context > 1)
  moe: MoeConfig = MoeConfig()  # num_experts = 0: every layer dense (lmjax.models.moe)

  @classmethod
  def from_config(cls, model_config) -> 'ModelConfig':
    """Builds from the `model` group of an lmjax config, resolving `head_dim` and dtypes."""
    values = dict(model_config)
    values['head_dim'] = values['head_dim'] or values['d_model'] // values['num_heads']
    values['dtype'] = resolve_dtype(values['dtype'])
    values['param_dtype'] = resolve_dtype(values['param_dtype'])
    values['moe'] = MoeConfig.from_config(values['moe'])
    return cls(**values)


def resolve_dtype(name: str):
  """`auto`: bfloat16 on accelerators, float32 on CPU, for the target devices (the mesh set by
  `jax.set_mesh`, else this host's)."""
  if name == 'auto':
    return jnp.float32 if target.platform() == 'cpu' else jnp.bfloat16
  return jnp.dtype(name).type


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_TD, ctx, kv_cache, prefix=None):
    cfg = self.cfg
    batch, length = ctx['positions'].shape
    d, h, k, dh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    std, out_std = cfg.init_std, cfg.init_std / (2 * cfg.num_layers) ** 0.5
    q_DHd = param_with_axes(self, 'q', (d, h, dh), ('embed', 'heads', 'head_dim'), std,
                            cfg.param_dtype)
    k_DKd = param_with_axes(self, 'k', (d, k, dh), ('embed', 'kv_heads', 'head_dim'), std,
                            cfg.param_dtype)
    v_DKd = param_with_axes(self, 'v', (d, k, dh), ('embed', 'kv_heads', 'head_dim'), std,
                            cfg.param_dtype)
    o_HdD = param_with_axes(self, 'o', (h, dh, d), ('heads', 'head_dim', 'embed'), out_std,
                            cfg.param_dtype)
    if cfg.qkv_bias:  # created after the kernels, so those initialise as without biases
      bias = lambda name, n, axes: self.param(
          name, nn.with_logical_partitioning(nn.initializers.zeros, axes), (n, dh),
          cfg.param_dtype)
      q_bias_Hd = bias('q_bias', h, ('heads', 'head_dim'))
      k_bias_Kd = bias('k_bias', k, ('kv_heads', 'head_dim'))
      v_bias_Kd = bias('v_bias', k, ('kv_heads', 'head_dim'))
    x_TD = x_TD.astype(cfg.dtype)
    project = lambda w, n: (x_TD @ w.reshape(d, n * dh).astype(cfg.dtype)).reshape(
        batch, length, n, dh)
    q_BLHD, k_BLKD, v_BLKD = project(q_DHd, h), project(k_DKd, k), project(v_DKd, k)
    if cfg.qkv_bias:
      q_BLHD = q_BLHD + q_bias_Hd.astype(cfg.dtype)
      k_BLKD = k_BLKD + k_bias_Kd.astype(cfg.dtype)
      v_BLKD = v_BLKD + v_bias_Kd.astype(cfg.dtype)
    q_BLHD = constrain(q_BLHD, ('act_batch', 'act_len', 'act_heads', None))
    k_BLKD = constrain(k_BLKD, ('act_batch', 'act_len', 'act_kv_heads', None))
    v_BLKD = constrain(v_BLKD, ('act_batch', 'act_len', 'act_kv_heads', None))
    scaling = None if cfg.rope_scaling == 'none' else (
        cfg.rope_scaling, cfg.rope_scaling_factor, cfg.rope_low_freq_factor,
        cfg.rope_high_freq_factor, cfg.rope_original_max_len)
    q_BLHD = rope(q_BLHD, ctx['positions'], cfg.rope_theta, scaling)
    k_BLKD = rope(k_BLKD, ctx['positions'], cfg.rope_theta, scaling)

    kv_mask_args = {}
    if kv_cache is not None:
      start = (0, ctx['cache_index'], 0, 0)
      k_BSKD = jax.lax.dynamic_update_slice(kv_cache['k'], k_BLKD.astype(kv_cache['k'].dtype),
                                            start)
      v_BSKD = jax.lax.dynamic_update_slice(kv_cache['v'], v_BLKD.astype(kv_cache['v'].dtype),
                                            start)
      kv_cache = {'k': k_BSKD, 'v': v_BSKD}
      k_BLKD, v_BLKD = k_BSKD.astype(cfg.dtype), v_BSKD.astype(cfg.dtype)
      kv_mask_args = dict(kv_segment_ids_BS=ctx['kv_segment_ids'],
                          kv_positions_BS=ctx['kv_positions'])
    if prefix is not None:  # PEFT prefix keys/values: (P, K, Dh) or (B, P, K, Dh)
      kv_mask_args.update(
          prefix_k_BPKD=jnp.broadcast_to(prefix['k'], (batch,) + prefix['k'].shape[-3:]),
          prefix_v_BPKD=jnp.broadcast_to(prefix['v'], (batch,) + prefix['v'].shape[-3:]))
    out_BLHD = attention_lib.attention(
        q_BLHD, k_BLKD, v_BLKD, segment_ids_BL=ctx['segment_ids'], positions_BL=ctx['positions'],
        causal=True, sliding_window=cfg.sliding_window, impl=cfg.attention,
        context_parallel=cfg.context_parallel, **kv_mask_args)
    out_BLHD = checkpoint_name(out_BLHD, 'attention_out')  # saved by remat 'minimal'
    out_TD = out_BLHD.reshape(batch * length, h * dh) @ o_HdD.reshape(h * dh, d).astype(cfg.dtype)
    return out_TD, kv_cache


def bottleneck_adapter(h_TD, w):
  """h + up(gelu(down(h))): a bottleneck adapter on a sublayer's output (exactly h when `up` and
  `up_b` are zero)."""
  dtype = h_TD.dtype
  z_TR = jax.nn.gelu(h_TD @ w['down'].astype(dtype) + w['down_b'].astype(dtype))
  return h_TD + (z_TR @ w['up'].astype(dtype) + w['up_b'].astype(dtype))


class Block(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)); with `moe_layer` the
  feed-forward is the mixture of experts (`lmjax.models.moe.MoE`, parameters under `moe`)."""
  cfg: ModelConfig
  moe_layer: bool = False

  @nn.compact
  def __call__(self, x_TD, kv_cache, ctx, layer_peft=None):
    cfg = self.cfg
    layer_peft = layer_peft or {}
    adapter = layer_peft.get('adapter')
    norm = lambda name: RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name=name)
    attn_TD, kv_cache = Attention(cfg, name='attn')(norm('attn_norm')(x_TD), ctx, kv_cache,
                                                    layer_peft.get('prefix'))
    if adapter is not None:
      attn_TD = bottleneck_adapter(attn_TD, adapter['attn'])
    x_TD = constrain(x_TD + attn_TD, ('act_tokens', 'act_embed'))
    out_std = cfg.init_std / (2 * cfg.num_layers)**0.5
    if self.moe_layer:
      mlp_TD = MoE(cfg.moe, cfg.d_model, cfg.mlp_dim, cfg.init_std, out_std, cfg.dtype,
                   cfg.param_dtype, name='moe')(norm('mlp_norm')(x_TD), kv_cache is not None)
    else:
      mlp = MLP(cfg.d_model, cfg.mlp_dim, cfg.init_std, out_std, cfg.dtype, cfg.param_dtype,
                name='mlp')
      mlp_TD = mlp(norm('mlp_norm')(x_TD))
    if adapter is not None:
      mlp_TD = bottleneck_adapter(mlp_TD, adapter['mlp'])
    x_TD = constrain(x_TD + mlp_TD, ('act_tokens', 'act_embed'))
    return x_TD, kv_cache


class Transformer(nn.Module):
  """The decoder as three explicit parts (module docstring):
    embed(tokens_BL) -> x_TD
    trunk(x_TD, positions_BL, segment_ids_BL, cache, peft) -> (x_TD, layer caches)
    head(x_TD, batch) -> logits_BLV (final norm, then the output projection; float32)
  `__call__` composes them. Parameters live at the top level as `embed`, `layers` (scanned) or
  `layers_{i}`, `final_norm`, `lm_head`; adapters and a quantised base are applied inside
  `param_with_axes`, in-model PEFT comes in through the `peft` argument."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embed_VD = param_with_axes(self, 'embed', (cfg.vocab_size, cfg.d_model),
                                    ('vocab', 'embed'), cfg.init_std, cfg.param_dtype)
    block = Block
    if cfg.remat != 'none':
      block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    moe_layers = [is_moe_layer(cfg.moe, i) for i in range(cfg.num_layers)]
    if cfg.scan_layers:
      if len(set(moe_layers)) > 1:
        raise ValueError('model.scan_layers: scanned layers must all be dense or all MoE (set '
                         'model.moe.first_k_dense=0 and model.moe.moe_every=1, or unroll)')
      self.layers = nn.scan(block, variable_axes={'params': 0, 'moe': 0},
                            split_rngs={'params': True}, in_axes=(0, nn.broadcast, 0),
                            length=cfg.num_layers,
                            metadata_params={nn.PARTITION_NAME: 'layers'})(cfg, moe_layers[0])
    else:  # named layers_0, layers_1, ...
      self.layers = [block(cfg, moe_layer) for moe_layer in moe_layers]
    self.final_norm = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype)
    if cfg.tie_embeddings:
      self.head_DV = self.embed_VD.T
    else:
      self.head_DV = param_with_axes(self, 'lm_head', (cfg.d_model, cfg.vocab_size),
                                     ('embed', 'vocab'), cfg.init_std, cfg.param_dtype)

  def __call__(self, tokens_BL, positions_BL, segment_ids_BL, cache=None, peft=None):
    """(logits_BLV float32, the new cache or None)."""
    x_TD, cache = self.trunk(self.embed(tokens_BL), positions_BL, segment_ids_BL, cache, peft)
    return self.head(x_TD, tokens_BL.shape[0]), cache

  def embed(self, tokens_BL):
    x_TD = jnp.take(self.embed_VD, tokens_BL.reshape(-1), axis=0).astype(self.cfg.dtype)
    return constrain(x_TD, ('act_tokens', 'act_embed'))

  def run_layers(self, x_TD, layer_caches, ctx, layer_peft):
    """The layer stack on 2-D activations (a scan, or one block after another)."""
    if self.cfg.scan_layers:
      return self.layers(x_TD, layer_caches, ctx, layer_peft)
    new_caches = []
    for i, layer in enumerate(self.layers):
      pick = lambda tree, i=i: None if tree is None else jax.tree.map(lambda c: c[i], tree)
      x_TD, layer_cache = layer(x_TD, pick(layer_caches), ctx, pick(layer_peft))
      new_caches.append(layer_cache)
    if layer_caches is not None:
      layer_caches = jax.tree.map(lambda *c: jnp.stack(c), *new_caches)
    return x_TD, layer_caches

  def trunk(self, x_TD, positions_BL, segment_ids_BL, cache=None, peft=None):
    """The layers over embedded tokens: (x_TD, the new cache or None). With a cache the new
    tokens' keys and values are written at `cache['index']`."""
    batch = positions_BL.shape[0]
    layer_peft = None if peft is None else peft.get('layers')
    if peft is not None and peft.get('prompt') is not None:
      layer_peft = dict(layer_peft or {}, prefix=self._prompt_prefix(peft['prompt'], batch))
      positions_BL = positions_BL + peft['prompt'].shape[0]
    ctx = {'positions': positions_BL, 'segment_ids': segment_ids_BL}
    layer_caches = None
    if cache is not None:
      index = cache['index']
      ctx['cache_index'] = index
      ctx['kv_segment_ids'] = jax.lax.dynamic_update_slice(cache['segment_ids'], segment_ids_BL,
                                                           (0, index))
      ctx['kv_positions'] = jax.lax.dynamic_update_slice(cache['positions'], positions_BL,
                                                         (0, index))
      layer_caches = {'k': cache['k'], 'v': cache['v']}
    x_TD, layer_caches = self.run_layers(x_TD, layer_caches, ctx, layer_peft)
    if cache is None:
      return x_TD, None
    return x_TD, dict(layer_caches, segment_ids=ctx['kv_segment_ids'],
                      positions=ctx['kv_positions'], index=cache['index'] + positions_BL.shape[1])

  def normed(self, x_TD, batch: int):
    """The final-norm hidden states hidden_BLD (compute dtype): what the heads read."""
    x_TD = self.final_norm(x_TD)
    return constrain(x_TD.reshape(batch, -1, self.cfg.d_model),
                     ('act_batch', 'act_len', 'act_embed'))

  def head(self, x_TD, batch: int):
    """Logits (float32) of the trunk's output."""
    return self.project(self.normed(x_TD, batch))

  def project(self, hidden_BLD):
    """The output projection of final-norm hidden states: logits_BLV (float32)."""
    batch, length, d = hidden_BLD.shape
    logits_TV = jnp.dot(hidden_BLD.reshape(batch * length, d), self.head_DV.astype(self.cfg.dtype),
                        preferred_element_type=jnp.float32)  # 2-D: no transposes in the backward
    return constrain(logits_TV.reshape(batch, length, self.cfg.vocab_size),
                     ('act_batch', 'act_len', 'act_vocab'))

  def head_weight(self):
    """The output projection (D, V) in its storage dtype (the transposed embedding when tied)."""
    return self.head_DV

  def _prompt_prefix(self, prompt_PD, batch):
    """Per-layer keys/values {'k', 'v': (N, B, P, K, Dh)} of virtual tokens at positions 0..P-1
    (causal among themselves), computed by one pass through the layers."""
    cfg = self.cfg
    num = prompt_PD.shape[0]
    positions_BP = jnp.broadcast_to(jnp.arange(num, dtype=jnp.int32), (batch, num))
    segments_BP = jnp.ones((batch, num), jnp.int32)
    ctx = {'positions': positions_BP, 'segment_ids': segments_BP, 'cache_index': 0,
           'kv_segment_ids': segments_BP, 'kv_positions': positions_BP}
    shape = (cfg.num_layers, batch, num, cfg.num_kv_heads, cfg.head_dim)
    caches = {'k': jnp.zeros(shape, cfg.dtype), 'v': jnp.zeros(shape, cfg.dtype)}
    x_TD = jnp.broadcast_to(prompt_PD.astype(cfg.dtype), (batch, num, cfg.d_model))
    x_TD = constrain(x_TD.reshape(batch * num, cfg.d_model), ('act_tokens', 'act_embed'))
    _, caches = self.run_layers(x_TD, caches, ctx, None)
    return caches


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None):
  """An empty KV cache: K/V per kv head (never repeated for GQA), slots marked empty (segment 0)."""
  dtype = dtype or cfg.dtype
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  return {
      'k': jnp.zeros(shape, dtype),
      'v': jnp.zeros(shape, dtype),
      'segment_ids': jnp.zeros((batch, max_len), jnp.int32),
      'positions': jnp.zeros((batch, max_len), jnp.int32),
      'index': jnp.zeros((), jnp.int32),
  }


def init_params(cfg: ModelConfig, rng, batch: int = 1, length: int = 8):
  """Boxed (logically partitioned) parameters; `nn.unbox` gives plain arrays."""
  tokens = jnp.zeros((batch, length), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  return Transformer(cfg).init(rng, tokens, positions, jnp.ones_like(tokens))['params']


def _hidden(module, tokens_BL, positions_BL, segment_ids_BL, peft):
  x_TD, _ = module.trunk(module.embed(tokens_BL), positions_BL, segment_ids_BL, None, peft)
  return module.normed(x_TD, tokens_BL.shape[0])


def forward(cfg: ModelConfig, params, tokens_BL, positions_BL, segment_ids_BL, peft=None):
  """Logits_BLV (float32) of a plain forward pass on plain (unboxed) params. `peft`: the in-model
  PEFT leaves (module docstring); without it a `params['peft']` entry is used, if any."""
  params, peft = _split_peft(params, peft)
  return Transformer(cfg).apply({'params': params}, tokens_BL, positions_BL, segment_ids_BL,
                                None, peft)[0]


def forward_cached(cfg: ModelConfig, params, tokens_BL, positions_BL, segment_ids_BL, cache,
                   peft=None):
  """(logits_BLV, new cache): the new tokens run against (and are written into) the KV cache."""
  params, peft = _split_peft(params, peft)
  return Transformer(cfg).apply({'params': params}, tokens_BL, positions_BL, segment_ids_BL,
                                cache, peft)


def forward_hidden(cfg: ModelConfig, params, tokens_BL, positions_BL, segment_ids_BL, peft=None):
  """(logits_BLV float32, final-norm hidden states hidden_BLD) without a cache."""
  params, peft = _split_peft(params, peft)

  def run(module):
    hidden_BLD = _hidden(module, tokens_BL, positions_BL, segment_ids_BL, peft)
    return module.project(hidden_BLD), hidden_BLD

  return nn.apply(run, Transformer(cfg))({'params': params})


def forward_head_inputs(cfg: ModelConfig, params, tokens_BL, positions_BL, segment_ids_BL,
                        peft=None):
  """(hidden_BLD, head_DV) without a cache: the final-norm hidden states (compute dtype) and the
  output projection (storage dtype; the transposed embedding when tied), whose product in the
  compute dtype with float32 accumulation is `forward`'s logits. For
  `losses.chunked_cross_entropy`, which never materialises the (B, L, V) logits."""
  params, peft = _split_peft(params, peft)

  def run(module):
    return (_hidden(module, tokens_BL, positions_BL, segment_ids_BL, peft),
            module.head_weight())

  return nn.apply(run, Transformer(cfg))({'params': params})


def forward_moe(cfg: ModelConfig, params, tokens_BL, positions_BL, segment_ids_BL, peft=None,
                head_inputs: bool = False):
  """(`forward`'s logits, or `forward_head_inputs`' pair with `head_inputs`, and the MoE layers'
  sown routing statistics: the `moe` collection that `lmjax.models.moe.loss_sums` reduces)."""
  params, peft = _split_peft(params, peft)

  def run(module):
    if head_inputs:
      return (_hidden(module, tokens_BL, positions_BL, segment_ids_BL, peft),
              module.head_weight())
    return module(tokens_BL, positions_BL, segment_ids_BL, None, peft)[0]

  out, variables = nn.apply(run, Transformer(cfg), mutable=['moe'])({'params': params})
  return out, variables.get('moe', {})


def _split_peft(params, peft):
  """A trained in-model PEFT run loaded for decoding carries its leaves as `params['peft']`
  (`lmjax.tasks.FineTuneTask.decoding_params`): they become the `peft` argument."""
  if peft is None and 'peft' in params:
    params = dict(params)
    peft = params.pop('peft')
  return params, peft
