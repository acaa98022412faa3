"""Pipeline parallelism over the `pipeline` mesh axis: a GPipe schedule written with `shard_map`.

The model's layers must be scan-stacked (`model.scan_layers=True`): every layer parameter carries a
leading `layers` dimension, which the sharding rules split over `pipeline`, so stage `s` holds
layers `[s * n, (s + 1) * n)` with `n = num_layers / stages`.

The batch is cut into `M` micro-batches (strided: micro-batch `m` holds rows `m, m + M, ...`, which
keeps each micro-batch evenly split over the data-like axes). The schedule runs `M + P - 1` ticks;
at tick `t` stage `s` runs micro-batch `t - s` (when `0 <= t - s < M`) and hands its output to stage
`s + 1` with `jax.lax.ppermute`. The last stage's outputs are summed over `pipeline` (all other
stages contribute zeros) so that the final norm and LM head run outside the pipeline. The embedding
and the head are the model's own (`Transformer.embed`, `Transformer.head`: a quantised or adapted
head works as without stages) and each stage runs the model's `Block`s with their slice of the
per-layer in-model PEFT leaves (bottleneck adapters, prefix tuning).
Differentiating through the schedule gives the backward pipeline (ppermute's transpose is the
reverse shift). Only `pipeline` is manual inside `shard_map`; `data`, `fsdp` and `tensor` stay
automatic, so FSDP and tensor parallelism compose with it through the usual logical constraints.

Idle ticks: each stage is busy `M` of `M + P - 1` ticks, so the bubble fraction is
`(P - 1) / (M + P - 1)`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from lmjax.models.layers import constrain
from lmjax.models.transformer import _REMAT_POLICIES, Block, ModelConfig, Transformer

PIPELINE_AXIS = 'pipeline'


def bubble_fraction(stages: int, microbatches: int) -> float:
  """Fraction of stage-ticks that are idle in a GPipe schedule (forward or backward alike)."""
  if stages <= 1:
    return 0.0
  return (stages - 1) / (microbatches + stages - 1)


def _layer_fn(cfg: ModelConfig):
  """x_TD -> x_TD for one layer given its params (remat per the model config)."""

  def apply_layer(layer_params, layer_peft, x_TD, positions_BL, segment_ids_BL):
    ctx = {'positions': positions_BL, 'segment_ids': segment_ids_BL}
    x_TD, _ = Block(cfg).apply({'params': layer_params}, x_TD, None, ctx, layer_peft)
    return x_TD

  if cfg.remat != 'none':
    apply_layer = jax.checkpoint(apply_layer, policy=_REMAT_POLICIES[cfg.remat])
  return apply_layer


def _stage_fn(cfg: ModelConfig):
  """Runs this stage's layers (a scan over the local slice of the stacked params)."""
  apply_layer = _layer_fn(cfg)

  def run_stage(stage_params, stage_peft, x_TD, positions_BL, segment_ids_BL):
    def body(x_TD, layer):
      layer_params, layer_peft = layer
      return apply_layer(layer_params, layer_peft, x_TD, positions_BL, segment_ids_BL), None

    x_TD, _ = jax.lax.scan(body, x_TD, (stage_params, stage_peft))
    return x_TD

  return run_stage


def _gpipe(cfg: ModelConfig, stages: int, stage_params, stage_peft, x_MTD, positions_MBL,
           segment_ids_MBL):
  """The per-stage program (inside shard_map; `pipeline` is manual). Returns y_MTD, the last
  stage's outputs on every stage."""
  microbatches = x_MTD.shape[0]
  stage = jax.lax.axis_index(PIPELINE_AXIS)
  run_stage = _stage_fn(cfg)
  shift = [(i, (i + 1) % stages) for i in range(stages)]

  def tick(carry, t):
    received_TD, out_MTD = carry
    first_in_TD = x_MTD[jnp.minimum(t, microbatches - 1)]
    in_TD = jnp.where(stage == 0, first_in_TD, received_TD)
    micro = jnp.clip(t - stage, 0, microbatches - 1)
    y_TD = run_stage(stage_params, stage_peft, in_TD, positions_MBL[micro],
                     segment_ids_MBL[micro])
    done = t - (stages - 1)
    slot = jnp.clip(done, 0, microbatches - 1)
    keep = (stage == stages - 1) & (done >= 0)
    out_MTD = out_MTD.at[slot].set(jnp.where(keep, y_TD, out_MTD[slot]))
    received_TD = jax.lax.ppermute(y_TD, PIPELINE_AXIS, shift)
    return (received_TD, out_MTD), None

  init = (jnp.zeros_like(x_MTD[0]), jnp.zeros_like(x_MTD))
  (_, out_MTD), _ = jax.lax.scan(tick, init, jnp.arange(microbatches + stages - 1))
  out_MTD = jnp.where(stage == stages - 1, out_MTD, jnp.zeros_like(out_MTD))
  return jax.lax.psum(out_MTD, PIPELINE_AXIS)


def _split_micro(x_B, microbatches):
  """(B, ...) -> (M, B / M, ...), micro-batch m = rows m, m + M, m + 2M, ..."""
  b = x_B.shape[0] // microbatches
  return jnp.swapaxes(x_B.reshape(b, microbatches, *x_B.shape[1:]), 0, 1)


def _merge_micro(x_M, microbatches):
  """Inverse of `_split_micro`."""
  x_BM = jnp.swapaxes(x_M, 0, 1)
  return x_BM.reshape(x_BM.shape[0] * microbatches, *x_BM.shape[2:])


def staged_forward(cfg: ModelConfig, params, tokens_BL, positions_BL, segment_ids_BL, *,
                   stages: int, microbatches: int, mesh=None, peft=None):
  """Same contract as `transformer.forward` (no KV cache): logits_BLV, float32.

  Must run under `jax.set_mesh(mesh)` (or pass `mesh`) whose `pipeline` axis has `stages` devices.
  `peft`: per-layer in-model PEFT leaves (bottleneck, prefix); virtual-token prompts are not
  supported under stages (the config check rejects them).
  """
  if not cfg.scan_layers:
    raise ValueError('model.scan_layers: pipeline parallelism needs scan-stacked layers')
  if peft is not None and peft.get('prompt') is not None:
    raise ValueError('peft.method: prompt / p_tuning virtual tokens do not run under pipeline '
                     'stages')
  batch, length = tokens_BL.shape
  if batch % microbatches:
    raise ValueError(f'pipeline_microbatches: {microbatches} does not divide the batch of {batch}')
  model = Transformer(cfg)
  variables = {'params': params}
  x_TD = model.apply(variables, tokens_BL, method=Transformer.embed)
  x_BLD = constrain(x_TD.reshape(batch, length, cfg.d_model), ('act_batch', 'act_len', 'act_embed'))
  b = batch // microbatches
  x_MTD = _split_micro(x_BLD, microbatches).reshape(microbatches, b * length, cfg.d_model)
  positions_MBL = _split_micro(positions_BL, microbatches)
  segment_ids_MBL = _split_micro(segment_ids_BL, microbatches)
  layer_peft = {} if peft is None else peft.get('layers', {})

  pipelined = jax.shard_map(
      functools.partial(_gpipe, cfg, stages), mesh=mesh,
      in_specs=(PartitionSpec(PIPELINE_AXIS), PartitionSpec(PIPELINE_AXIS), PartitionSpec(),
                PartitionSpec(), PartitionSpec()),
      out_specs=PartitionSpec(), axis_names={PIPELINE_AXIS}, check_vma=False)
  y_MTD = pipelined(params['layers'], layer_peft, x_MTD, positions_MBL, segment_ids_MBL)
  y_BLD = _merge_micro(y_MTD.reshape(microbatches, b, length, cfg.d_model), microbatches)
  y_TD = constrain(y_BLD.reshape(batch * length, cfg.d_model), ('act_tokens', 'act_embed'))
  return model.apply(variables, y_TD, batch, method=Transformer.head)
