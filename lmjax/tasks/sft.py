"""Supervised fine-tuning: token-weighted cross-entropy on the response tokens (`lmjax.data.sft`);
held out: the same loss and its perplexity on post.eval_file or a held-out share of train_file."""

from __future__ import annotations

from lmjax.data import sft as sft_data
from lmjax.tasks.finetune import FineTuneTask
from lmjax.tasks.pretrain import token_loss_sums


class SftTask(FineTuneTask):
  name = 'sft'

  def make_iterator(self, config, tokenizer, process_index=0, process_count=1):
    return sft_data.make_sft_iterator(config, tokenizer, process_index, process_count)

  def make_eval_batches(self, config, tokenizer, process_index=0, process_count=1):
    return sft_data.make_eval_batches(config, tokenizer, process_index, process_count)

  def sums(self, params, batch, rng):
    model, peft = self.model_inputs(params, rng)
    return token_loss_sums(self.model, model, batch, self.z_loss, self.pipeline, peft=peft)
