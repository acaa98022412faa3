"""Evaluation, one module per job:

  loss        held-out loss and perplexity (the training loop's `held_out_loss`), perplexity and
              bits per byte of whole documents
  generation  ROUGE-1/2/L and BLEU of generated text
  choice      multiple choice by log-likelihood: common schemas, few-shot, acc / acc_norm, per
              subject and macro
  loglikelihood  (context, continuation) log-likelihoods in fixed-shape batches (`Scorer`)
  harness     the lm-evaluation-harness model `lmjax` and running its tasks (imports lm-eval:
              imported only where harness tasks run)
  workdir     `evaluate_workdir`: every evaluation of a workdir, recorded in it (`lmjax eval`)

Nothing here imports the trainer: losses come from `models.transformer.forward` through
`inference.scoring` (log-probabilities by `lmjax.losses`), or from the `eval_fn` a caller passes.
"""

from lmjax.evaluation.choice import (check_choice_item, choice_accuracy, choice_loglikelihoods,
                                     read_choice_items, to_item, with_fewshot)
from lmjax.evaluation.generation import check_generation_record, generation_metrics
from lmjax.evaluation.loss import held_out_loss, text_perplexity, text_windows
from lmjax.evaluation.workdir import checkpoint_step, evaluate_workdir, evaluation_texts

__all__ = [
    'check_choice_item', 'check_generation_record', 'checkpoint_step', 'choice_accuracy',
    'choice_loglikelihoods', 'evaluate_workdir', 'evaluation_texts', 'generation_metrics',
    'held_out_loss', 'read_choice_items', 'text_perplexity', 'text_windows', 'to_item',
    'with_fewshot',
]
