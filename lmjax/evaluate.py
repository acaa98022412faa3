"""Evaluation: held-out loss and perplexity (shared with the training loop), bits per byte over
whole documents, generation metrics (ROUGE, BLEU) and multiple-choice accuracy by log-likelihood.

Document-level perplexity and bits per byte (`text_perplexity`): each document is encoded as
`[bos] + tokens` (no EOS: the evaluated text is exactly the document) and cut into windows of
`window + 1` tokens that overlap by one token, so every token after BOS is predicted exactly once,
from the context inside its window (positions restart at 0 per window, as in training).
`bits_per_byte = total NLL (nats) / ln 2 / total UTF-8 bytes of the documents`: it does not depend
on the tokenizer. `loss` is the mean NLL per predicted token and `perplexity = exp(loss)`.
"""

from __future__ import annotations

import functools
import math

import jax
import numpy as np

from lmjax.inference.scoring import score_sequences
from lmjax.train.step import eval_step


def held_out_loss(eval_fn, params, batches, to_device=lambda batch: batch) -> dict:
  """Token-weighted mean loss, perplexity = exp(loss), and the token count over `batches`.

  `eval_fn(params, batch)` returns the sums {'nll', 'weight'}; `to_device` places a host batch.
  """
  nll = weight = 0.0
  for batch in batches:
    sums = jax.device_get(eval_fn(params, to_device(batch)))
    nll += float(sums['nll'])
    weight += float(sums['weight'])
  loss = nll / max(weight, 1.0)
  return {'loss': loss, 'perplexity': float(np.exp(loss)), 'tokens': weight}


def evaluate_workdir(model_cfg, params, batches) -> dict:
  """Held-out metrics of a loaded model on packed eval batches (one device)."""
  eval_fn = jax.jit(functools.partial(eval_step, model_cfg))
  return held_out_loss(eval_fn, params, batches)


def text_windows(ids: list[int], window: int) -> list[list[int]]:
  """Windows of `window + 1` tokens overlapping by one: each token after the first is a target in
  exactly one window."""
  return [ids[start:start + window + 1] for start in range(0, max(len(ids) - 1, 0), window)]


def text_perplexity(model_cfg, params, tokenizer, texts: list[str], window: int,
                    batch_size: int = 8) -> dict:
  """Loss, perplexity and bits per byte of `texts` (see the module docstring)."""
  window = min(window, model_cfg.max_seq_len - 1)
  sequences, num_bytes = [], 0
  for text in texts:
    num_bytes += len(text.encode('utf-8'))
    sequences.extend(text_windows([tokenizer.bos_id] + tokenizer.encode(text), window))
  logps = score_sequences(model_cfg, params, sequences, batch_size, bucket=window + 1)
  nll = -sum(float(np.sum(lp, dtype=np.float64)) for lp in logps)
  tokens = sum(len(lp) for lp in logps)
  loss = nll / max(tokens, 1)
  return {'loss': loss, 'perplexity': math.exp(loss), 'bits_per_byte': nll / math.log(2) /
          max(num_bytes, 1), 'tokens': tokens, 'bytes': num_bytes, 'documents': len(texts)}


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


def choice_loglikelihoods(model_cfg, params, tokenizer, items: list[dict],
                          batch_size: int = 8) -> list[list[tuple[float, int]]]:
  """Per item, per choice: (sum of the choice tokens' log-probabilities, number of tokens).

  The context is `[bos] + encode(question)` and each choice is encoded on its own and appended
  (its text follows the question verbatim: put any separating space in the question or the
  choice), so every choice is scored against the same context tokens.
  """
  sequences, spans = [], []
  for item in items:
    context = [tokenizer.bos_id] + tokenizer.encode(item['question'])
    for choice in item['choices']:
      continuation = tokenizer.encode(choice)
      if not continuation:
        raise ValueError(f'choice {choice!r} encodes to no tokens')
      sequences.append(context + continuation)
      spans.append((len(context) - 1, len(continuation)))
  logps = score_sequences(model_cfg, params, sequences, batch_size)
  flat = [(float(np.sum(lp[start:start + n], dtype=np.float64)), n)
          for lp, (start, n) in zip(logps, spans)]
  out, i = [], 0
  for item in items:
    out.append(flat[i:i + len(item['choices'])])
    i += len(item['choices'])
  return out


def choice_accuracy(items: list[dict], loglikelihoods: list[list[tuple[float, int]]]) -> dict:
  """Accuracy of the highest-likelihood choice: raw (sum of log-probs), per character (divided by
  the choice's length in characters) and per token (divided by its number of tokens)."""
  hits = {'accuracy': 0, 'accuracy_per_char': 0, 'accuracy_per_token': 0}
  for item, scores in zip(items, loglikelihoods):
    answer = int(item['answer'])
    raw = [ll for ll, _ in scores]
    per_char = [ll / max(len(choice), 1) for (ll, _), choice in zip(scores, item['choices'])]
    per_token = [ll / n for ll, n in scores]
    for key, values in (('accuracy', raw), ('accuracy_per_char', per_char),
                        ('accuracy_per_token', per_token)):
      hits[key] += int(int(np.argmax(values)) == answer)
  n = max(len(items), 1)
  return {**{key: count / n for key, count in hits.items()}, 'questions': len(items)}


def check_choice_items(items: list[dict], where: str = 'choices file') -> None:
  """Raises ValueError naming the first malformed multiple-choice record."""
  for line, item in enumerate(items, start=1):
    ok = (isinstance(item.get('question'), str) and isinstance(item.get('choices'), list) and
          len(item['choices']) >= 2 and all(isinstance(c, str) for c in item['choices']) and
          isinstance(item.get('answer'), int) and 0 <= item['answer'] < len(item['choices']))
    if not ok:
      raise ValueError(f'{where}:{line}: needs "question" (str), "choices" (list of >= 2 str) and '
                       '"answer" (an index into choices)')
