"""Text-generation metrics: ROUGE (rouge-score) and BLEU (sacrebleu) of completions."""

from __future__ import annotations

from lmjax.data.sources import DataError


def check_generation_record(record) -> dict:
  """A {"prompt", "reference"} record as it is; raises DataError otherwise."""
  if not (isinstance(record, dict) and isinstance(record.get('prompt'), str) and
          isinstance(record.get('reference'), str)):
    raise DataError('needs "prompt" and "reference" (strings)')
  return record


def generation_metrics(predictions: list[str], references: list[str]) -> dict:
  """Mean ROUGE-1/2/L F-measures (`rouge-score`, with stemming) and corpus BLEU (`sacrebleu`,
  default 13a tokenisation), each in [0, 100]."""
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  import sacrebleu  # pylint: disable=g-import-not-at-top
  if len(predictions) != len(references):
    raise ValueError(f'{len(predictions)} predictions for {len(references)} references')
  if not predictions:
    return {}
  kinds = ('rouge1', 'rouge2', 'rougeL')
  scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
  totals = dict.fromkeys(kinds, 0.0)
  for prediction, reference in zip(predictions, references):
    scores = scorer.score(reference, prediction)  # (target, prediction)
    for kind in kinds:
      totals[kind] += scores[kind].fmeasure
  metrics = {kind: 100.0 * total / len(predictions) for kind, total in totals.items()}
  metrics['bleu'] = sacrebleu.corpus_bleu(predictions, [references]).score
  return metrics
