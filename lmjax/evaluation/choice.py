"""Multiple choice by log-likelihood, without the harness: common record schemas, few-shot
prompts drawn with a fixed seed, acc and acc_norm, per subject and their macro average.

Every record becomes an item {'contexts': one context per choice, 'choices': continuations,
'label': the right choice's index, 'subject'}. Fields are found through `lmjax.data.fields`
(`FieldMap`: NAME=SOURCE over CHOICE_FIELDS and 'subject'), after the schema's own mapping:

  lmjax       {"question", "choices": [...], "answer": index}
  mmlu        {"question", "choices", "answer", "subject"}: the lettered question; " A".." D"
  hellaswag   {"ctx", "endings", "label", "activity_label"}: the endings continue the context
  arc         {"question", "choices": {"text", "label"}, "answerKey"}
  piqa        {"goal", "sol1", "sol2", "label"}
  winogrande  {"sentence" with "_", "option1", "option2", "answer": "1" | "2"}: each option fills
              the blank (one context per choice); the rest of the sentence is scored

A choice is scored as lm-eval scores it: the context and " " + choice are encoded together (after
BOS) and split at the context's length (`loglikelihood.encode_pair`). acc picks the highest sum of
log-probabilities; acc_norm divides it by the choice's length in characters.
"""

from __future__ import annotations

import numpy as np

from lmjax.data.fields import CHOICE_FIELDS, FieldMap, lookup, require_str
from lmjax.data.jsonl import DataError, read_jsonl
from lmjax.evaluation.loglikelihood import Scorer, encode_pair

NAMES = CHOICE_FIELDS + ('subject',)
SCHEMAS = {  # schema -> the FieldMap that names its fields (before any user mapping)
    'lmjax': 'context=question,label=answer',
    'mmlu': 'context=question,label=answer',
    'hellaswag': 'context=ctx,choices=endings',
    'arc': 'context=question,choices=choices.text,label=answerKey',
    'piqa': 'context=goal',
    'winogrande': 'context=sentence,label=answer',
}


def _label(value, choices: list, letters=None) -> int:
  """An index from an int, a digit string ('2'), a letter ('C') or one of `letters`."""
  if isinstance(value, str) and letters and value in letters:
    return letters.index(value)
  if isinstance(value, str) and value.strip().isdigit():
    value = int(value)
  elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().isalpha():
    value = ord(value.strip().upper()) - ord('A')
  if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(choices):
    raise DataError(f'field \'label\': expected an index into the {len(choices)} choices (or a '
                    f'letter); got {value!r}')
  return value


def _strings(value, what: str) -> list:
  if not isinstance(value, list) or len(value) < 2 or not all(isinstance(c, str) for c in value):
    raise DataError(f'field {what}: expected a list of at least 2 strings; got {value!r}'[:200])
  return value


def to_item(record, schema: str = 'lmjax', fields: FieldMap = FieldMap()) -> dict:
  """The item of one record (see the module docstring). `fields` (NAME=SOURCE over NAMES) maps
  fields on top of the schema's own mapping; a DataError names the missing or bad field."""
  mapped = dict(fields.pairs)
  fmap = FieldMap(fields.pairs + tuple(p for p in FieldMap.parse(SCHEMAS[schema], NAMES).pairs
                                       if p[0] not in mapped), fields.key)
  raw, record = record, fmap.apply(record)
  if 'choices' not in mapped and schema in ('piqa', 'winogrande'):
    keys = ('sol1', 'sol2') if schema == 'piqa' else ('option1', 'option2')
    record['choices'] = [require_str(raw, key) for key in keys]
  context = require_str(record, 'context', fmap)
  choices = _strings(record.get('choices'), fmap.describe('choices'))
  if 'label' not in record:
    raise DataError(f'no field {fmap.describe("label")}')
  letters = {'arc': lookup(raw, 'choices.label'), 'winogrande': ['1', '2']}.get(schema)
  label = _label(record['label'], choices, letters if isinstance(letters, list) else None)
  subject = record.get('subject') if isinstance(record.get('subject'), str) else ''
  if schema == 'winogrande':
    if '_' not in context:
      raise DataError(f'field {fmap.describe("context")}: a winogrande sentence needs a "_"')
    before, after = context.split('_', 1)
    return {'contexts': [before + c for c in choices], 'choices': [after.lstrip()] * len(choices),
            'label': label, 'subject': subject}
  if schema == 'mmlu':
    lines = [context.strip()] + [f'{chr(65 + i)}. {c}' for i, c in enumerate(choices)]
    context, choices = '\n'.join(lines) + '\nAnswer:', [chr(65 + i) for i in range(len(choices))]
  elif schema in ('arc', 'piqa'):
    context = f'Question: {context}\nAnswer:'
  elif schema == 'hellaswag' and isinstance(record.get('activity_label'), str):
    context = f'{record["activity_label"]}: {context}'
  return {'contexts': [context] * len(choices), 'choices': choices, 'label': label,
          'subject': subject}


def check_choice_item(record) -> dict:
  """A {"question", "choices", "answer"} record as an item; raises DataError otherwise."""
  return to_item(record, 'lmjax')


def with_fewshot(items: list[dict], k: int, seed: int = 0) -> list[dict]:
  """Each item with `k` solved examples of the other items before its contexts (drawn with
  `seed`, the same draw for the same file and seed), separated by blank lines."""
  if k <= 0:
    return items
  if k >= len(items):
    raise DataError(f'--num_fewshot: {k} examples need more than the file\'s {len(items)} items')
  rng = np.random.default_rng(seed)
  out = []
  for i, item in enumerate(items):
    others = [j for j in range(len(items)) if j != i]
    shots = [items[j] for j in rng.choice(others, size=k, replace=False)]
    prefix = ''.join(f'{s["contexts"][s["label"]]} {s["choices"][s["label"]]}\n\n' for s in shots)
    out.append(dict(item, contexts=[prefix + c for c in item['contexts']]))
  return out


def choice_loglikelihoods(scorer: Scorer, tokenizer, items: list[dict]) -> list[list[float]]:
  """Per item, per choice: the sum of log-probabilities of " " + choice after its context."""
  pairs = [encode_pair(tokenizer, context, ' ' + choice)
           for item in items for context, choice in zip(item['contexts'], item['choices'])]
  flat = [ll for ll, _ in scorer.loglikelihoods(pairs)]
  out, i = [], 0
  for item in items:
    out.append(flat[i:i + len(item['choices'])])
    i += len(item['choices'])
  return out


def choice_accuracy(items: list[dict], loglikelihoods: list[list[float]]) -> dict:
  """acc (highest log-likelihood) and acc_norm (per character of the choice) over all items,
  per subject ({'subjects': {name: {acc, acc_norm, questions}}}), and the macro averages over
  subjects (`macro_acc`, `macro_acc_norm`; equal to acc / acc_norm without subjects)."""
  by_subject: dict[str, np.ndarray] = {}
  for item, lls in zip(items, loglikelihoods):
    lls = np.asarray(lls, np.float64)
    lengths = np.asarray([max(len(c), 1) for c in item['choices']], np.float64)
    hits = [np.argmax(lls) == item['label'], np.argmax(lls / lengths) == item['label']]
    by_subject.setdefault(item['subject'], np.zeros(3))
    by_subject[item['subject']] += [*hits, 1]
  total = sum(by_subject.values(), np.zeros(3))
  n = max(total[2], 1)
  subjects = {s: {'acc': v[0] / v[2], 'acc_norm': v[1] / v[2], 'questions': int(v[2])}
              for s, v in sorted(by_subject.items())}
  return {
      'acc': total[0] / n, 'acc_norm': total[1] / n, 'questions': int(total[2]),
      'macro_acc': float(np.mean([v['acc'] for v in subjects.values()])) if subjects else 0.0,
      'macro_acc_norm': (float(np.mean([v['acc_norm'] for v in subjects.values()]))
                         if subjects else 0.0),
      'subjects': subjects,
  }


def read_choice_items(path: str, schema: str = 'lmjax', fields: str = '') -> list[dict]:
  """The items of a JSONL file of `schema` records, with the `fields` mapping ('NAME=SOURCE,...'
  over NAMES, the `--choices_fields` flag); a bad record is a DataError at its line."""
  if schema not in SCHEMAS:
    raise DataError(f'--choices_schema: unknown schema {schema!r}; expected one of '
                    f'{", ".join(SCHEMAS)}')
  fmap = FieldMap.parse(fields, NAMES, key='--choices_fields')
  return read_jsonl(path, encode=lambda record: to_item(record, schema, fmap))
