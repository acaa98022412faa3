"""`lmjax eval`: perplexity and bits per byte on held-out text, generation metrics and
multiple-choice accuracy of a trained workdir.

Writes the results to DIR/eval.json and appends them to DIR/metrics.jsonl (split 'eval', at the
step of the evaluated checkpoint). See `lmjax.evaluate` for the definitions.

  --source          text to evaluate (a `data.source` spec: GLOB, F.jsonl, mixtures); default: the
                    workdir's held-out split
  --generation_file JSONL of {"prompt", "reference"}: ROUGE-1/2/L (mean F, rouge-score) and BLEU
                    (corpus, sacrebleu) of the completions (decoding flags as in `lmjax sample`)
  --choices_file    JSONL of {"question", "choices": [...], "answer": index}: accuracy of the
                    most likely choice, raw, per character and per token
"""

from __future__ import annotations

import json
import os

from lmjax.commands.common import load_model, print_json, workdir_config
from lmjax.commands.sample import add_sampling_arguments
from lmjax.config import ConfigError


def add_arguments(parser) -> None:
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--source', help='text to evaluate: GLOB | F.jsonl | data.source spec '
                                       '(default: the held-out split of the workdir\'s data)')
  parser.add_argument('--max_documents', type=int, help='evaluate at most this many documents')
  parser.add_argument('--window', type=int,
                      help='tokens predicted per window (default: the config\'s seq_len)')
  parser.add_argument('--no_perplexity', action='store_true', help='skip perplexity/bits per byte')
  parser.add_argument('--generation_file', help='JSONL with "prompt" and "reference" per line')
  parser.add_argument('--choices_file', help='JSONL with "question", "choices", "answer"')
  add_sampling_arguments(parser)


def evaluation_texts(config, source: str | None, max_documents: int | None) -> list[str]:
  """The held-out documents of the workdir's data (or every document of `source`)."""
  from lmjax.data import pipeline, sources as sources_lib  # pylint: disable=g-import-not-at-top
  data = config.data
  if source:
    data.source = source
  sources = sources_lib.load_sources(data)
  if source:
    refs = [ref for s in sources for ref in s.docs]
  else:
    refs = pipeline.eval_refs(sources, data.eval_fraction)
    if not refs:
      raise ConfigError(f'data.eval_fraction: {data.eval_fraction} holds out no documents of '
                        f'{data.source!r}; pass --source')
  if max_documents is not None:
    refs = refs[:max_documents]
  return [sources_lib.read_document(ref, data.text_field) for ref in refs]


def checkpoint_step(workdir: str) -> int:
  """The step of the checkpoint `load_model` reads (0 for a params-only workdir)."""
  directory = os.path.join(workdir, 'checkpoints')
  steps = [int(n) for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(directory) else []
  return max(steps, default=0)


def run(args) -> int:
  from lmjax import data as data_lib  # pylint: disable=g-import-not-at-top
  from lmjax import evaluate as eval_lib  # pylint: disable=g-import-not-at-top
  from lmjax.commands.sample import complete, read_jsonl, sampling_config  # pylint: disable=g-import-not-at-top
  config = workdir_config(args.workdir, args.overrides)
  tokenizer = data_lib.load_or_train_tokenizer(config.data, config.model.vocab_size)
  generation = read_jsonl(args.generation_file) if args.generation_file else None
  choices = read_jsonl(args.choices_file) if args.choices_file else None
  if generation is not None:
    for i, record in enumerate(generation, start=1):
      if not (isinstance(record, dict) and isinstance(record.get('prompt'), str) and
              isinstance(record.get('reference'), str)):
        raise ConfigError(f'{args.generation_file}: record {i}: needs "prompt" and "reference"')
  if choices is not None:
    try:
      eval_lib.check_choice_items(choices, args.choices_file)
    except ValueError as e:
      raise ConfigError(str(e)) from None
  texts = None
  if not args.no_perplexity:
    try:
      texts = evaluation_texts(config, args.source, args.max_documents)
    except data_lib.DataError as e:
      raise ConfigError(str(e)) from None
  model_cfg, params = load_model(args.workdir, config)

  results = {}
  if texts is not None:
    results.update(eval_lib.text_perplexity(model_cfg, params, tokenizer, texts,
                                            args.window or config.seq_len, args.batch_size))
    results['source'] = args.source or f'held-out split of {config.data.source}'
  if generation is not None:
    cfg = sampling_config(config, tokenizer, args)
    records = complete(model_cfg, params, tokenizer, [r['prompt'] for r in generation], cfg,
                       args.seed, args.batch_size)
    metrics = eval_lib.generation_metrics([r['completion'] for r in records],
                                          [r['reference'] for r in generation])
    results.update(metrics, generation_examples=len(generation))
  if choices is not None:
    scores = eval_lib.choice_loglikelihoods(model_cfg, params, tokenizer, choices, args.batch_size)
    accuracy = eval_lib.choice_accuracy(choices, scores)
    results.update({f'mc_{key}': value for key, value in accuracy.items()})

  step = checkpoint_step(args.workdir)
  with open(os.path.join(args.workdir, 'eval.json'), 'w', encoding='utf-8') as f:
    json.dump({'step': step, **results}, f, indent=2, sort_keys=True)
  numbers = {k: v for k, v in results.items() if isinstance(v, (int, float))}
  with open(os.path.join(args.workdir, 'metrics.jsonl'), 'a', encoding='utf-8') as f:
    f.write(json.dumps({'step': step, 'split': 'eval', **numbers}) + '\n')
  print_json({'step': step, **results})
  return 0
