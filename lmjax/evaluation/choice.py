"""Multiple choice by log-likelihood: each choice scored as a continuation of the question."""

from __future__ import annotations

import numpy as np

from lmjax.data.sources import DataError
from lmjax.inference.scoring import score_sequences


def check_choice_item(item) -> dict:
  """A {"question", "choices", "answer"} record as it is; raises DataError otherwise."""
  ok = (isinstance(item, dict) and isinstance(item.get('question'), str) and
        isinstance(item.get('choices'), list) and len(item['choices']) >= 2 and
        all(isinstance(c, str) for c in item['choices']) and
        isinstance(item.get('answer'), int) and 0 <= item['answer'] < len(item['choices']))
  if not ok:
    raise DataError('needs "question" (str), "choices" (list of >= 2 str) and "answer" (an index '
                    'into choices)')
  return item


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
