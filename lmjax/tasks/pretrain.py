"""Pretraining: next-token cross-entropy on packed text (`lmjax.data`), with held-out batches."""

from __future__ import annotations

from lmjax import data as data_lib
from lmjax.losses import chunked_cross_entropy, cross_entropy
from lmjax.models import moe as moe_lib
from lmjax.models.transformer import ModelConfig, forward, forward_head_inputs, forward_moe
from lmjax.parallel import pipeline as pipeline_lib
from lmjax.tasks.base import Task


def token_loss_sums(model_cfg: ModelConfig, params, batch, z_loss: float = 0.0, pipeline=(1, 1),
                    peft=None):
  """Sums (see `losses.cross_entropy`) of the next-token loss on one batch of rows (`inputs`,
  `targets`, `positions`, `segment_ids`, `weights`); `peft`: in-model PEFT leaves. With pipeline
  stages the layers run as a GPipe schedule; with `model.logits_chunk` > 0 the head and loss run
  chunk by chunk (`losses.chunked_cross_entropy`): the same sums without the (B, L, V) logits.
  An MoE model adds its routing losses and metrics (`lmjax.models.moe.loss_sums`)."""
  args = (model_cfg, params, batch['inputs'], batch['positions'], batch['segment_ids'])
  if model_cfg.moe.num_experts and pipeline[0] == 1:
    out, stats = forward_moe(*args, peft=peft, head_inputs=model_cfg.logits_chunk > 0)
    if model_cfg.logits_chunk > 0:
      sums = chunked_cross_entropy(*out, batch['targets'], batch['weights'],
                                   model_cfg.logits_chunk, z_loss)
    else:
      sums = cross_entropy(out, batch['targets'], batch['weights'], z_loss)
    extra = moe_lib.loss_sums(model_cfg.moe, stats, sums['weight'])
    return {**sums, **extra, 'loss': sums['loss'] + extra['loss']}
  if pipeline[0] > 1:
    logits_BLV = pipeline_lib.staged_forward(*args, stages=pipeline[0], microbatches=pipeline[1],
                                      peft=peft)
  elif model_cfg.logits_chunk > 0:
    hidden_BLD, head_DV = forward_head_inputs(*args, peft=peft)
    return chunked_cross_entropy(hidden_BLD, head_DV, batch['targets'], batch['weights'],
                                 model_cfg.logits_chunk, z_loss)
  else:
    logits_BLV = forward(*args, peft=peft)
  return cross_entropy(logits_BLV, batch['targets'], batch['weights'], z_loss)


class PretrainTask(Task):
  """The whole model trains on packed documents; params are the plain model tree."""
  name = 'pretrain'

  def make_iterator(self, config, tokenizer, process_index=0, process_count=1):
    return data_lib.make_train_iterator(config, tokenizer, process_index, process_count)

  def make_eval_batches(self, config, tokenizer, process_index=0, process_count=1):
    return data_lib.make_eval_batches(config, tokenizer, process_index, process_count)

  def loss_sums(self, trainable, frozen, batch, rng):
    del frozen, rng
    return token_loss_sums(self.model, trainable, batch, self.z_loss, self.pipeline)
