"""Evaluating a trained workdir (`lmjax eval`): which texts, which checkpoint, where results go.

`evaluate_workdir` reads and checks every input first, then loads the model once and runs the
evaluations asked for. It writes the results to WORKDIR/eval.json and appends their numbers to
WORKDIR/metrics.jsonl (split 'eval', at the step of the evaluated checkpoint).
"""

from __future__ import annotations

import json
import os

from lmjax import data as data_lib
from lmjax.data import pipeline, sources as sources_lib
from lmjax.data.jsonl import read_jsonl
from lmjax.data.sources import DataError
from lmjax.evaluation.choice import (choice_accuracy, choice_loglikelihoods, read_choice_items,
                                     with_fewshot)
from lmjax.evaluation.generation import check_generation_record, generation_metrics
from lmjax.evaluation.loglikelihood import Scorer
from lmjax.evaluation.loss import text_perplexity
from lmjax.inference.complete import complete, sampling_config


def evaluation_texts(config, source: str | None, max_documents: int | None) -> list[str]:
  """The held-out documents of the workdir's data (or every document of `source`)."""
  data = config.data
  if source:
    data.source = source
  sources = sources_lib.load_sources(data)
  if source:
    refs = [ref for s in sources for ref in s.docs]
  else:
    refs = pipeline.eval_refs(sources, data.eval_fraction)
    if not refs:
      raise DataError(f'data.eval_fraction: {data.eval_fraction} holds out no documents of '
                      f'{data.source!r}; pass --source')
  if max_documents is not None:
    refs = refs[:max_documents]
  return [sources_lib.read_document(ref, data.text_field) for ref in refs]


def checkpoint_step(workdir: str) -> int:
  """The step of the checkpoint `load_model` reads (0 for a params-only workdir)."""
  directory = os.path.join(workdir, 'checkpoints')
  steps = [int(n) for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(directory) else []
  return max(steps, default=0)


def evaluate_workdir(workdir: str, config, *, source: str | None = None,
                     max_documents: int | None = None, window: int | None = None,
                     perplexity: bool = True, generation_file: str | None = None,
                     choices_file: str | None = None, flags=None, seed: int = 0,
                     batch_size: int = 32, harness: dict | None = None,
                     choices_schema: str = 'lmjax', choices_fields: str = '',
                     num_fewshot: int = 0) -> dict:
  """Evaluates the workdir's model and records the results; returns {'step', **results}.

  perplexity: loss, perplexity and bits per byte of the held-out split of the workdir's data (or
    of every document of `source`, a `data.source` spec), at most `max_documents`, in windows of
    `window` tokens (default: config.seq_len).
  generation_file: JSONL of {"prompt", "reference"}: ROUGE-1/2/L and BLEU of the completions,
    decoded per `sampling_config(config, tokenizer, flags)`.
  choices_file: JSONL multiple choice in `choices_schema` (lmjax, mmlu, hellaswag, arc, piqa,
    winogrande; fields renamed by `choices_fields`, 'NAME=SOURCE,...'), `num_fewshot` solved
    examples drawn with `seed` before each question: acc, acc_norm, per subject and macro (keys
    prefixed with `mc_`; `lmjax.evaluation.choice`).
  harness: lm-evaluation-harness tasks, {'tasks': [names], 'num_fewshot', 'limit',
    'include_path', 'log_samples'} (`harness.run_tasks`; rows per batch: `batch_size`): lm-eval's
    results under 'harness', each metric as 'harness/TASK/METRIC'; logged samples go to
    WORKDIR/eval_samples/TASK.jsonl.
  A bad input is a DataError naming the file (and line), or the task.
  """
  from lmjax.tasks import load_model  # pylint: disable=g-import-not-at-top
  tokenizer = data_lib.load_or_train_tokenizer(config.data, config.model.vocab_size)
  generation = (read_jsonl(generation_file, encode=check_generation_record)
                if generation_file else None)
  choices = (with_fewshot(read_choice_items(choices_file, choices_schema, choices_fields),
                          num_fewshot or 0, seed) if choices_file else None)
  texts = evaluation_texts(config, source, max_documents) if perplexity else None
  model_cfg, params = load_model(workdir, config)

  results = {}
  if texts is not None:
    results.update(text_perplexity(model_cfg, params, tokenizer, texts, window or config.seq_len,
                                   batch_size))
    results['source'] = source or f'held-out split of {config.data.source}'
  if generation is not None:
    cfg = sampling_config(config, tokenizer, flags)
    records = complete(model_cfg, params, tokenizer, [r['prompt'] for r in generation], cfg, seed,
                       batch_size)
    metrics = generation_metrics([r['completion'] for r in records],
                                 [r['reference'] for r in generation])
    results.update(metrics, generation_examples=len(generation))
  if choices is not None:
    scores = choice_loglikelihoods(Scorer(model_cfg, params, batch_size), tokenizer, choices)
    accuracy = choice_accuracy(choices, scores)
    results.update({f'mc_{key}': value for key, value in accuracy.items()})
  if harness:
    results.update(run_harness(workdir, config, harness, batch_size, seed))

  step = checkpoint_step(workdir)
  with open(os.path.join(workdir, 'eval.json'), 'w', encoding='utf-8') as f:
    json.dump({'step': step, **results}, f, indent=2, sort_keys=True)
  numbers = {k: v for k, v in results.items() if isinstance(v, (int, float))}
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8') as f:
    f.write(json.dumps({'step': step, 'split': 'eval', **numbers}) + '\n')
  return {'step': step, **results}


def run_harness(workdir: str, config, harness: dict, batch_size: int, seed: int) -> dict:
  """lm-eval's results of the harness tasks on the workdir's model (see `evaluate_workdir`)."""
  from lmjax.evaluation import harness as harness_lib  # pylint: disable=g-import-not-at-top
  lm = harness_lib.LmjaxLM(workdir=workdir, batch_size=batch_size, config=config)
  out = harness_lib.run_tasks(lm, list(harness['tasks']), harness.get('num_fewshot'),
                              harness.get('limit'), harness.get('include_path'),
                              bool(harness.get('log_samples')), seed=seed)
  results = {f'harness/{k}': v for k, v in harness_lib.flat_metrics(out).items()}
  kept = {k: out[k] for k in ('results', 'groups', 'group_subtasks', 'n-shot', 'versions')
          if k in out}
  results['harness'] = json.loads(json.dumps(kept, default=str))
  if harness.get('log_samples'):
    harness_lib.write_samples(os.path.join(workdir, 'eval_samples'), out['samples'])
  return results
