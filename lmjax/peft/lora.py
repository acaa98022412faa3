"""Low-rank adapters as pytree transforms: LoRA, rsLoRA, DoRA, VeRA and LoRA-FA.

The adapters never change the base tree; gradients flow only to the adapter leaves. Two views give
the Transformer the adapted weights W + a @ b (a, b from `low_rank_factors`: scale * A @ B, ...):
  attach(cfg, base, adapters)            the factors next to each weight as `NAME_lora`; the model
                                         applies them inside the layer (training: no adapted copy
                                         of the whole model in memory)
  effective_params(cfg, base, adapters)  the adapted weights built once, as a plain tree
                                         (decoding; the reference the tests hold `attach` to)

A weight of shape `lead + in_shape + out_shape` (lead = the stacked layer axis under scan) is seen
as an (in, out) matrix: q/k/v (D, H, Dh) -> (D, H*Dh); o (H, Dh, D) -> (H*Dh, D); MLP and lm_head
are already 2-D. Adapter leaves live in a tree that mirrors the model tree:
  lora/dora/lora_fa:  {'a': lead+(in, r), 'b': lead+(r, out)}   (+ dora: 'm': lead+(out,))
  vera:               {'d': lead+(r,), 'b': lead+(out,)}  with frozen random A, B regenerated from
                      `cfg.seed` (never stored).
Dropout is applied to the rows of A (the input features), one mask per step shared by all tokens
of the batch: a weight-space approximation of LoRA's input dropout.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from flax import traverse_util

from lmjax.config import PEFT_LOW_RANK, base_config, choices

LOW_RANK_METHODS = PEFT_LOW_RANK
ATTACHED_SUFFIX = '_lora'  # `attach`: factors stored next to their weight, applied in the layer
# 'bottleneck', 'prefix', 'prompt', 'p_tuning' act inside the forward pass: `lmjax.peft.hooks`
METHODS = choices('peft.method')
# leaf name -> number of input dims after the lead dims
_IN_DIMS = {'q': 1, 'k': 1, 'v': 1, 'o': 2, 'gate': 1, 'up': 1, 'down': 1, 'lm_head': 1}
TARGET_ALIASES = {
    'all-linear': r'attn/(q|k|v|o)$|mlp/(gate|up|down)$',
    'attn': r'attn/(q|k|v|o)$',
    'mlp': r'mlp/(gate|up|down)$',
    'qv': r'attn/(q|v)$',
}


_SCHEMA = base_config().peft  # the `peft` group's defaults: one definition, in the schema


@dataclasses.dataclass(frozen=True)
class PeftConfig:
  """The `peft` group as hashable static data."""
  method: str = _SCHEMA.method
  rank: int = _SCHEMA.rank
  alpha: float = _SCHEMA.alpha
  rslora: bool = _SCHEMA.rslora  # scale alpha / sqrt(r) instead of alpha / r
  dropout: float = _SCHEMA.dropout
  targets: str = _SCHEMA.targets  # an alias above or a regex searched in 'layers_0/attn/q'
  lora_plus_ratio: float = _SCHEMA.lora_plus_ratio  # LoRA+: learning-rate multiplier of B
  train_patterns: str = _SCHEMA.train_patterns
  freeze_patterns: str = _SCHEMA.freeze_patterns
  base_dtype: str = _SCHEMA.base_dtype
  seed: int = _SCHEMA.seed  # VeRA's shared random projections
  num_virtual_tokens: int = _SCHEMA.num_virtual_tokens
  adapter_dim: int = _SCHEMA.adapter_dim  # bottleneck adapters: r
  encoder_dim: int = _SCHEMA.encoder_dim

  @classmethod
  def from_config(cls, peft_config) -> 'PeftConfig':
    return cls(**dict(peft_config))

  @property
  def enabled(self) -> bool:
    return self.method != 'none'

  @property
  def low_rank(self) -> bool:
    """A weight-delta method (`effective_params`, `merge`); False for the in-model ones."""
    return self.method in LOW_RANK_METHODS

  @property
  def scale(self) -> float:
    if self.method == 'vera':
      return 1.0
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def path_name(path: tuple) -> str:
  return '/'.join(str(p) for p in path)


def target_regex(targets: str) -> str:
  return TARGET_ALIASES.get(targets, targets)


def target_paths(cfg: PeftConfig, params) -> list[tuple]:
  """Paths of the (flattened) base params that get an adapter."""
  regex = re.compile(target_regex(cfg.targets))
  flat = traverse_util.flatten_dict(params)
  paths = [p for p in flat if p[-1] in _IN_DIMS and regex.search(path_name(p))]
  if cfg.enabled and not paths:
    raise ValueError(f'peft.targets: {cfg.targets!r} matches no weight')
  return paths


def _split_shape(path: tuple, shape: tuple, stacked: bool):
  """(lead shape, in size, out shape) of a weight."""
  lead = 1 if stacked and path[0] == 'layers' else 0
  n_in = _IN_DIMS[path[-1]]
  in_shape = shape[lead:lead + n_in]
  return shape[:lead], math.prod(in_shape), shape[lead + n_in:]


def init_adapters(cfg: PeftConfig, params, rng, stacked: bool = False):
  """Fresh adapters for `params` (plain arrays): B (or VeRA's b) zero, so the model is unchanged."""
  flat = traverse_util.flatten_dict(params)
  out = {}
  for i, path in enumerate(target_paths(cfg, params)):
    w = flat[path]
    lead, n_in, out_shape = _split_shape(path, w.shape, stacked)
    n_out = math.prod(out_shape)
    key = jax.random.fold_in(rng, i)
    if cfg.method == 'vera':
      out[path + ('d',)] = jnp.full(lead + (cfg.rank,), 0.1, jnp.float32)
      out[path + ('b',)] = jnp.zeros(lead + (n_out,), jnp.float32)
      continue
    bound = 1.0 / math.sqrt(n_in)  # kaiming-uniform with a = sqrt(5), as nn.Linear
    out[path + ('a',)] = jax.random.uniform(key, lead + (n_in, cfg.rank), jnp.float32, -bound,
                                            bound)
    out[path + ('b',)] = jnp.zeros(lead + (cfg.rank, n_out), jnp.float32)
    if cfg.method == 'dora':
      w_IO = w.reshape(lead + (n_in, n_out)).astype(jnp.float32)
      out[path + ('m',)] = jnp.linalg.norm(w_IO, axis=-2)
  return traverse_util.unflatten_dict(out)


def _vera_projections(cfg: PeftConfig, n_in: int, n_out: int):
  key = jax.random.fold_in(jax.random.key(cfg.seed), n_in * 1_000_003 + n_out)
  ka, kb = jax.random.split(key)
  a = jax.random.uniform(ka, (n_in, cfg.rank), jnp.float32, -1.0, 1.0) / math.sqrt(n_in)
  b = jax.random.uniform(kb, (cfg.rank, n_out), jnp.float32, -1.0, 1.0) / math.sqrt(cfg.rank)
  return a, b


def low_rank_factors(cfg: PeftConfig, path, w_shape, leaves: dict, stacked: bool, rng=None):
  """(a (lead, in, r), b (lead, r, out)) in float32 whose product is the weight delta: scale * A @ B
  (LoRA, LoRA-FA with A frozen, DoRA's direction update), or VeRA's (A * d) @ (B * b)."""
  _, n_in, out_shape = _split_shape(path, w_shape, stacked)
  if cfg.method == 'vera':
    a, b = _vera_projections(cfg, n_in, math.prod(out_shape))
    return a * leaves['d'][..., None, :], b * leaves['b'][..., None, :]
  a = leaves['a'].astype(jnp.float32)
  if cfg.method == 'lora_fa':
    a = jax.lax.stop_gradient(a)
  if rng is not None and cfg.dropout > 0:
    keep = jax.random.bernoulli(rng, 1.0 - cfg.dropout, a.shape[:-1] + (1,))
    a = jnp.where(keep, a / (1.0 - cfg.dropout), 0.0)
  return a, cfg.scale * leaves['b'].astype(jnp.float32)


def _delta(cfg: PeftConfig, path, w_shape, leaves: dict, stacked: bool, rng=None):
  """The weight delta as a (lead, in, out) float32 matrix."""
  a, b = low_rank_factors(cfg, path, w_shape, leaves, stacked, rng)
  return jnp.einsum('...ir,...ro->...io', a, b)


def _adapted(cfg: PeftConfig, path, w, leaves, stacked, rng=None):
  lead, n_in, out_shape = _split_shape(path, w.shape, stacked)
  n_out = math.prod(out_shape)
  w_IO = w.reshape(lead + (n_in, n_out)).astype(jnp.float32)
  new_IO = w_IO + _delta(cfg, path, w.shape, leaves, stacked, rng)
  if cfg.method == 'dora':
    norm = jax.lax.stop_gradient(jnp.linalg.norm(new_IO, axis=-2, keepdims=True))
    new_IO = new_IO * (leaves['m'][..., None, :] / norm)
  return new_IO.reshape(w.shape)


def _grouped(adapters) -> dict:
  flat = traverse_util.flatten_dict(adapters)
  groups = {}
  for path, leaf in flat.items():
    groups.setdefault(path[:-1], {})[path[-1]] = leaf
  return groups


def effective_params(cfg: PeftConfig, base, adapters, rng=None, stacked: bool = False,
                     compute_dtype=None):
  """The params the model reads: every adapted weight replaced by its adapted value.

  `rng` (training only) turns on LoRA dropout. Adapted weights come out in `compute_dtype`
  (default: the base weight's dtype, float32 for a bfloat16 base).
  """
  if not cfg.low_rank or not adapters:
    return base
  flat = dict(traverse_util.flatten_dict(base))
  for i, (path, leaves) in enumerate(sorted(_grouped(adapters).items())):
    w = flat[path]
    key = None if rng is None else jax.random.fold_in(rng, i)
    dtype = compute_dtype or (jnp.float32 if w.dtype == jnp.bfloat16 else w.dtype)
    flat[path] = _adapted(cfg, path, w, leaves, stacked, key).astype(dtype)
  return traverse_util.unflatten_dict(flat)


def attach(cfg: PeftConfig, base, adapters, rng=None, stacked: bool = False, shapes=None):
  """`base` with each adapted weight's factors next to it as `NAME_lora` = {'a', 'b'} (+ DoRA's
  'm'). The Transformer applies them inside the layer (`models.layers.param_with_axes`), so the
  adapted weights exist one layer at a time, never as a second copy of the whole model; the result
  equals the model read with `effective_params` (the same factors, dropout masks and rounding).
  `shapes` ({path: shape}) gives the shapes of weights stored in another form (quantised)."""
  if not cfg.low_rank or not adapters:
    return base
  flat = dict(traverse_util.flatten_dict(base))
  for i, (path, leaves) in enumerate(sorted(_grouped(adapters).items())):
    key = None if rng is None else jax.random.fold_in(rng, i)
    shape = flat[path].shape if path in flat else shapes[path]
    a, b = low_rank_factors(cfg, path, shape, leaves, stacked, key)
    factors = {'a': a, 'b': b, **({'m': leaves['m']} if cfg.method == 'dora' else {})}
    for name, value in factors.items():
      flat[path[:-1] + (path[-1] + ATTACHED_SUFFIX, name)] = value
  return traverse_util.unflatten_dict(flat)


def merge(cfg: PeftConfig, base, adapters, stacked: bool = False):
  """Base weights with the adapters folded in (the base dtype is kept)."""
  if cfg.enabled and not cfg.low_rank:
    from lmjax.peft import hooks  # pylint: disable=g-import-not-at-top
    raise hooks.merge_error(cfg.method)
  merged = effective_params(cfg, base, adapters, stacked=stacked)
  return jax.tree.map(lambda m, b: m.astype(b.dtype), merged, base)


def unmerge(cfg: PeftConfig, merged, adapters, stacked: bool = False):
  """The inverse of `merge`: W = W' - scale * A @ B (LoRA, LoRA-FA, VeRA; DoRA is not invertible
  without the base norm, so it raises)."""
  if cfg.method == 'dora':
    raise ValueError('unmerge: DoRA rescales columns by the base norm; keep the base instead')
  if cfg.enabled and not cfg.low_rank:
    from lmjax.peft import hooks  # pylint: disable=g-import-not-at-top
    raise hooks.merge_error(cfg.method)
  if not cfg.enabled or not adapters:
    return merged
  flat = dict(traverse_util.flatten_dict(merged))
  for path, leaves in _grouped(adapters).items():
    w = flat[path]
    delta = _delta(cfg, path, w.shape, leaves, stacked)
    flat[path] = (w.astype(jnp.float32) - delta.reshape(w.shape)).astype(w.dtype)
  return traverse_util.unflatten_dict(flat)


def lora_b_mask(cfg: PeftConfig, adapters) -> dict:
  """True on the B leaves that LoRA+ trains with a `lora_plus_ratio` times higher LR."""
  def is_b(path, _):
    name = path[-1].key if hasattr(path[-1], 'key') else str(path[-1])
    return name == 'b' and cfg.method in ('lora', 'dora', 'lora_fa')
  return jax.tree_util.tree_map_with_path(is_b, adapters)
