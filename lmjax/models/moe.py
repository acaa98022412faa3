"""Mixture-of-experts feed-forward: a float32 router, top-k routing and two dispatch paths.

Shapes: T tokens, D d_model, E routed experts, K experts per token (top-k), F expert hidden size,
C slots per expert (capacity), M = T * K token-expert assignments, P expert-parallel shards.

Routing (`route`, `model.moe.router`):
  softmax_topk   probabilities = softmax(logits); the K largest, renormalised to sum to 1 when
                 `renormalize` (Mixtral, Qwen3-MoE with norm_topk_prob)
  topk_softmax   the K largest logits, then a softmax over those K
  sigmoid        scores = sigmoid(logits); experts are chosen by scores + a balancing bias that
                 never weighs the output (DeepSeek-V3's aux-loss-free balancing), weights are the
                 chosen scores (renormalised when `renormalize`)

Dispatch (`model.moe.dispatch`), one result when nothing is dropped:
  dropless   the M assignments sorted by expert, one grouped matmul per projection
             (`jax.lax.ragged_dot` with the experts' group sizes), unsorted and combined
  capacity   each expert has C = ceil(capacity_factor x T x K / E) slots (at most T); every token's
             first choice is served before any second choice, in token order; assignments past C
             are dropped (their weight contributes nothing) and counted

Expert parallelism: when the mesh the step is traced under has an `expert` axis of P > 1 devices,
the experts' weights are split over it and the dispatch runs inside `jax.shard_map` (manual over
`expert` only): each shard routes its own T / P tokens and exchanges fixed-size buffers with
`jax.lax.all_to_all`; capacity then counts per shard (C from the shard's T / P tokens), dropless
sends a worst-case buffer of T / P x K rows to every shard. The router and its statistics run
outside, on the global batch.

Routing statistics are sown into the `moe` collection (`Transformer.apply(..., mutable=['moe'])`,
see `transformer.forward_moe`) and reduced to loss terms and metrics by `loss_sums`:
  load     (E,) fraction of the M assignments each expert received
  aux      Switch load balancing E * sum_e load_e * mean_prob_e (1 when balanced)
  z        mean over tokens of logsumexp(router logits)^2
  dropped  fraction of assignments dropped (capacity dispatch; 0 when dropless)
  bias     a zero-valued term whose gradient moves the sigmoid router's bias along
           bias_update_rate x (load - 1/E): overloaded experts are chosen less next step
"""

from __future__ import annotations

import dataclasses
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from lmjax.config import base_config
from lmjax.models.layers import MLP, constrain, param_with_axes

EXPERT_AXIS = 'expert'
_SCHEMA = base_config().model.moe
STATS = ('load', 'aux', 'z', 'dropped', 'bias')


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """The `model.moe` group as hashable static data."""
  num_experts: int = _SCHEMA.num_experts
  experts_per_token: int = _SCHEMA.experts_per_token
  expert_mlp_dim: int = _SCHEMA.expert_mlp_dim
  num_shared_experts: int = _SCHEMA.num_shared_experts
  first_k_dense: int = _SCHEMA.first_k_dense
  moe_every: int = _SCHEMA.moe_every
  router: str = _SCHEMA.router
  renormalize: bool = _SCHEMA.renormalize
  dispatch: str = _SCHEMA.dispatch
  capacity_factor: float = _SCHEMA.capacity_factor
  aux_loss_coef: float = _SCHEMA.aux_loss_coef
  z_loss_coef: float = _SCHEMA.z_loss_coef
  bias_update_rate: float = _SCHEMA.bias_update_rate

  @classmethod
  def from_config(cls, group) -> 'MoeConfig':
    return cls(**dict(group))


def is_moe_layer(moe: MoeConfig, layer: int) -> bool:
  """Whether layer `layer` (0-based) has the MoE feed-forward."""
  return (moe.num_experts > 0 and layer >= moe.first_k_dense
          and (layer - moe.first_k_dense) % moe.moe_every == 0)


def capacity(moe: MoeConfig, tokens: int) -> int:
  """Slots per expert for a group of `tokens` tokens (never more than the tokens)."""
  slots = math.ceil(moe.capacity_factor * tokens * moe.experts_per_token / moe.num_experts)
  return max(1, min(tokens, slots))


# --- routing and its losses (pure, float32) ------------------------------------------------------

def route(moe: MoeConfig, logits_TE, bias_E=None):
  """(weights_TK, experts_TK int32, probs_TE): the routing weights of the chosen experts and the
  per-token distribution over experts the balancing loss reads."""
  k = moe.experts_per_token
  if moe.router == 'sigmoid':
    scores_TE = jax.nn.sigmoid(logits_TE)
    choose_TE = scores_TE if bias_E is None else scores_TE + jax.lax.stop_gradient(bias_E)
    _, experts_TK = jax.lax.top_k(choose_TE, k)
    weights_TK = jnp.take_along_axis(scores_TE, experts_TK, axis=-1)
    probs_TE = scores_TE / jnp.sum(scores_TE, axis=-1, keepdims=True)
  elif moe.router == 'topk_softmax':
    top_TK, experts_TK = jax.lax.top_k(logits_TE, k)
    weights_TK = jax.nn.softmax(top_TK, axis=-1)
    probs_TE = jax.nn.softmax(logits_TE, axis=-1)
  else:  # softmax_topk
    probs_TE = jax.nn.softmax(logits_TE, axis=-1)
    weights_TK, experts_TK = jax.lax.top_k(probs_TE, k)
  if moe.renormalize and moe.router != 'topk_softmax':
    weights_TK = weights_TK / jnp.sum(weights_TK, axis=-1, keepdims=True)
  return weights_TK, experts_TK.astype(jnp.int32), probs_TE


def expert_load(experts_TK, num_experts: int):
  """load_E: the fraction of the T x K assignments each expert received."""
  counts_E = jnp.zeros((num_experts,), jnp.float32).at[experts_TK.reshape(-1)].add(1.0)
  return counts_E / experts_TK.size


def load_balancing_loss(probs_TE, experts_TK):
  """Switch Transformer's auxiliary loss E * sum_e load_e * mean_t probs_te: 1 for balanced
  routing (uniform load and mean probabilities), E when every token goes to one expert."""
  num_experts = probs_TE.shape[-1]
  load_E = expert_load(experts_TK, num_experts)
  return num_experts * jnp.sum(load_E * jnp.mean(probs_TE, axis=0))


def router_z_loss(logits_TE):
  """ST-MoE's router z-loss: mean over tokens of logsumexp(logits)^2."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits_TE, axis=-1)))


# --- expert computation --------------------------------------------------------------------------

def grouped_swiglu(x_MD, expert_M, num_groups: int, gate_EDF, up_EDF, down_EFD):
  """Each row through its expert's SwiGLU: rows sorted by expert, grouped matmuls
  (`jax.lax.ragged_dot`), unsorted. Rows with expert id >= num_groups (padding) give zeros."""
  order_M = jnp.argsort(expert_M, stable=True)
  sizes_E = jnp.zeros((num_groups,), jnp.int32).at[expert_M].add(1, mode='drop')
  xs_MD = x_MD[order_M]
  h_MF = (nn.silu(jax.lax.ragged_dot(xs_MD, gate_EDF, sizes_E))
          * jax.lax.ragged_dot(xs_MD, up_EDF, sizes_E))
  ys_MD = jax.lax.ragged_dot(h_MF, down_EFD, sizes_E)
  return ys_MD[jnp.argsort(order_M)]


def _combine(y_MD, weights_TK):
  """Sum over each token's K expert outputs (rows token-major) weighted by its routing weights."""
  t, k = weights_TK.shape
  y_TKD = y_MD.reshape(t, k, -1).astype(jnp.float32)
  return jnp.einsum('tkd,tk->td', y_TKD, weights_TK)


def _exchange(x_PX, axis):
  """Row block p goes to expert shard p; what comes back is stacked by source shard."""
  return x_PX if axis is None else jax.lax.all_to_all(x_PX, axis, 0, 0, tiled=True)


def dropless(x_TD, experts_TK, weights_TK, gate_EDF, up_EDF, down_EFD, shards=1, axis=None):
  """(y_TD float32, kept_TK): every assignment served. With `shards` > 1 (inside shard_map over
  `axis`) the weights are the local E / P experts and each shard's rows travel in a (P, M, D)
  buffer to the shard holding their expert and back."""
  t, k = experts_TK.shape
  local = gate_EDF.shape[0]
  expert_M = experts_TK.reshape(-1)
  x_MD = jnp.repeat(x_TD, k, axis=0)  # row m = token m // K, its (m % K)-th choice
  if shards == 1:
    y_MD = grouped_swiglu(x_MD, expert_M, local, gate_EDF, up_EDF, down_EFD)
    return _combine(y_MD, weights_TK), jnp.ones((t, k), bool)
  m = t * k
  shard_M = expert_M // local
  # rank of each row among the rows bound for its shard (a stable counting order)
  onehot_MP = jax.nn.one_hot(shard_M, shards, dtype=jnp.int32)
  slot_M = jnp.take_along_axis(jnp.cumsum(onehot_MP, axis=0), shard_M[:, None], 1)[:, 0] - 1
  send_PMD = jnp.zeros((shards, m, x_TD.shape[-1]), x_TD.dtype).at[shard_M, slot_M].set(x_MD)
  send_PM = jnp.full((shards, m), local, jnp.int32).at[shard_M, slot_M].set(expert_M % local)
  recv_PMD, recv_PM = _exchange(send_PMD, axis), _exchange(send_PM, axis)
  y_NMD = grouped_swiglu(recv_PMD.reshape(shards * m, -1), recv_PM.reshape(-1), local,
                         gate_EDF, up_EDF, down_EFD)
  back_PMD = _exchange(y_NMD.reshape(shards, m, -1), axis)
  return _combine(back_PMD[shard_M, slot_M], weights_TK), jnp.ones((t, k), bool)


def capacity_dispatch(x_TD, experts_TK, weights_TK, gate_EDF, up_EDF, down_EFD, slots: int,
                      shards=1, axis=None):
  """(y_TD float32, kept_TK): experts see fixed (E, C, D) buffers; assignments past an expert's
  C slots are dropped. With `shards` > 1 the buffer rows of other shards' experts go there
  (`all_to_all`) and come back."""
  t, k = experts_TK.shape
  local, d = gate_EDF.shape[0], x_TD.shape[-1]
  experts = local * shards
  expert_S = experts_TK.T.reshape(-1)  # slot-major: all first choices, then all second, ...
  onehot_SE = jax.nn.one_hot(expert_S, experts, dtype=jnp.int32)
  pos_S = jnp.take_along_axis(jnp.cumsum(onehot_SE, axis=0), expert_S[:, None], 1)[:, 0] - 1
  kept_S = pos_S < slots
  x_SD = jnp.tile(x_TD, (k, 1))
  buffer_ECD = jnp.zeros((experts, slots, d), x_TD.dtype).at[expert_S, pos_S].set(
      x_SD, mode='drop')
  if shards > 1:  # (P, E_local, C, D) -> from every shard, for my experts -> (E_local, P C, D)
    recv_PLCD = _exchange(buffer_ECD.reshape(shards, local, slots, d), axis)
    buffer_ECD = recv_PLCD.transpose(1, 0, 2, 3).reshape(local, shards * slots, d)
  h_ECF = (nn.silu(jnp.einsum('ecd,edf->ecf', buffer_ECD, gate_EDF))
           * jnp.einsum('ecd,edf->ecf', buffer_ECD, up_EDF))
  out_ECD = jnp.einsum('ecf,efd->ecd', h_ECF, down_EFD)
  if shards > 1:
    out_PLCD = out_ECD.reshape(local, shards, slots, d).transpose(1, 0, 2, 3)
    out_ECD = _exchange(out_PLCD, axis).reshape(experts, slots, d)
  y_SD = out_ECD.at[expert_S, pos_S].get(mode='fill', fill_value=0)
  kept_TK = kept_S.reshape(k, t).T
  y_MD = y_SD.reshape(k, t, d).transpose(1, 0, 2).reshape(t * k, d)
  return _combine(y_MD, weights_TK * kept_TK), kept_TK


def _expert_shards() -> int:
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or EXPERT_AXIS not in mesh.axis_names:
    return 1
  return mesh.shape[EXPERT_AXIS]


def dispatch(moe: MoeConfig, x_TD, experts_TK, weights_TK, gate_EDF, up_EDF, down_EFD,
             dropless_only: bool = False):
  """The routed experts' output y_TD (float32) and kept_TK, on one device or expert-parallel."""
  use_dropless = dropless_only or moe.dispatch == 'dropless'
  shards = _expert_shards()
  tokens = x_TD.shape[0]
  if shards > 1 and tokens % shards:
    shards = 1  # e.g. decoding a few tokens: GSPMD gathers the experts instead

  def run(x_TD, experts_TK, weights_TK, gate_EDF, up_EDF, down_EFD):
    axis = EXPERT_AXIS if shards > 1 else None
    if use_dropless:
      return dropless(x_TD, experts_TK, weights_TK, gate_EDF, up_EDF, down_EFD, shards, axis)
    slots = capacity(moe, x_TD.shape[0])
    return capacity_dispatch(x_TD, experts_TK, weights_TK, gate_EDF, up_EDF, down_EFD, slots,
                             shards, axis)

  args = (x_TD, experts_TK, weights_TK, gate_EDF, up_EDF, down_EFD)
  if shards == 1:
    return run(*args)
  spec = PartitionSpec(EXPERT_AXIS)
  return jax.shard_map(run, in_specs=(spec,) * 6, out_specs=(spec, spec),
                       axis_names={EXPERT_AXIS}, check_vma=False)(*args)


class MoE(nn.Module):
  """Routed experts (+ shared experts): the feed-forward of an MoE layer. Parameters: `router`
  (D, E) float32, `router_bias` (E,) with the sigmoid router's balancing, `gate`/`up` (E, D, F),
  `down` (E, F, D), and `shared` (a SwiGLU MLP of width num_shared_experts x F)."""
  moe: MoeConfig
  d_model: int
  mlp_dim: int
  std: float
  out_std: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_TD, decoding: bool = False):
    moe, d = self.moe, self.d_model
    e, f = moe.num_experts, moe.expert_mlp_dim or self.mlp_dim
    router_DE = self.param('router', nn.with_logical_partitioning(
        nn.initializers.normal(stddev=self.std), ('embed', None)), (d, e), jnp.float32)
    bias_E = None
    if moe.router == 'sigmoid' and moe.bias_update_rate > 0:
      bias_E = self.param('router_bias', nn.with_logical_partitioning(nn.initializers.zeros,
                                                                       (None,)), (e,), jnp.float32)
    gate_EDF = param_with_axes(self, 'gate', (e, d, f), ('experts', 'embed', 'expert_mlp'),
                               self.std, self.param_dtype)
    up_EDF = param_with_axes(self, 'up', (e, d, f), ('experts', 'embed', 'expert_mlp'),
                             self.std, self.param_dtype)
    down_EFD = param_with_axes(self, 'down', (e, f, d), ('experts', 'expert_mlp', 'embed'),
                               self.out_std, self.param_dtype)
    x_TD = x_TD.astype(self.dtype)
    logits_TE = jnp.dot(x_TD.astype(jnp.float32), router_DE)
    weights_TK, experts_TK, probs_TE = route(moe, logits_TE, bias_E)
    cast = lambda w: w.astype(self.dtype)
    y_TD, kept_TK = dispatch(moe, x_TD, experts_TK, weights_TK, cast(gate_EDF), cast(up_EDF),
                             cast(down_EFD), dropless_only=decoding)
    y_TD = constrain(y_TD.astype(self.dtype), ('act_tokens', 'act_embed'))
    if moe.num_shared_experts:
      y_TD = y_TD + MLP(d, moe.num_shared_experts * f, self.std, self.out_std, self.dtype,
                        self.param_dtype, name='shared')(x_TD)
    load_E = expert_load(experts_TK, e)
    self.sow('moe', 'load', load_E)
    self.sow('moe', 'aux', load_balancing_loss(probs_TE, experts_TK))
    self.sow('moe', 'z', router_z_loss(logits_TE))
    self.sow('moe', 'dropped', 1.0 - jnp.mean(kept_TK.astype(jnp.float32)))
    if bias_E is not None:
      push_E = jax.lax.stop_gradient(load_E - 1.0 / e) * moe.bias_update_rate
      term = jnp.sum(push_E * bias_E)
      self.sow('moe', 'bias', term - jax.lax.stop_gradient(term))
    return y_TD


def layer_stats(moe_collection) -> dict[str, list]:
  """The sown statistics by name, one entry per MoE layer in layer order (scanned stacks split),
  and under 'layer' those layers' indices."""
  found = {name: [] for name in STATS + ('layer',)}
  flat = jax.tree_util.tree_flatten_with_path(moe_collection)[0]

  def layer_of(path):
    keys = [getattr(p, 'key', getattr(p, 'name', None)) for p in path]
    for key in keys:
      match = re.fullmatch(r'layers_(\d+)', str(key))
      if match:
        return int(match.group(1))
    return -1

  rows = []
  for path, leaf in flat:
    name = next(str(getattr(p, 'key', '')) for p in reversed(path)
                if str(getattr(p, 'key', '')) in STATS)
    rows.append((layer_of(path), name, leaf))
  for layer, name, leaf in sorted(rows, key=lambda r: r[0]):
    if layer < 0:  # scanned: a leading layer axis
      found[name].extend(leaf[i] for i in range(leaf.shape[0]))
      indices = range(leaf.shape[0])
    else:
      found[name].append(leaf)
      indices = [layer]
    if name == 'aux':
      found['layer'].extend(indices)
  return found


def loss_sums(moe: MoeConfig, moe_collection, weight) -> dict:
  """Loss and metric sums (the task contract: the step divides by `weight`) of the sown routing
  statistics: 'loss' (the coefficients' aux + z-loss over layers, and the balancing-bias term) and
  moe_aux_loss, moe_z_loss, moe_dropped (mean over MoE layers), and per MoE layer i moe_load_max_l{i}
  (the busiest expert's share x E: 1 = balanced) and moe_dropped_l{i}."""
  stats = layer_stats(moe_collection)
  if not stats['aux']:
    return {'loss': jnp.zeros((), jnp.float32)}
  total = lambda name: sum(stats[name]) if stats[name] else jnp.zeros((), jnp.float32)
  layers = len(stats['aux'])
  loss = moe.aux_loss_coef * total('aux') + moe.z_loss_coef * total('z') + total('bias')
  sums = {'loss': loss * weight, 'moe_aux_loss': total('aux') / layers * weight,
          'moe_z_loss': total('z') / layers * weight,
          'moe_dropped': total('dropped') / layers * weight}
  for i, load_E, dropped in zip(stats['layer'], stats['load'], stats['dropped']):
    sums[f'moe_load_max_l{i}'] = jnp.max(load_E) * moe.num_experts * weight
    sums[f'moe_dropped_l{i}'] = dropped * weight
  return sums
