"""`lmjax eval`: held-out loss and perplexity of a trained workdir; writes DIR/eval.json."""

from __future__ import annotations

import json
import os

from lmjax.commands.common import load_model, print_json, workdir_config


def add_arguments(parser) -> None:
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--eval_batches', type=int, help='batches to evaluate (default: config)')


def run(args) -> int:
  from lmjax import data as data_lib  # pylint: disable=g-import-not-at-top
  from lmjax.evaluate import evaluate_workdir  # pylint: disable=g-import-not-at-top
  overrides = list(args.overrides)
  if args.eval_batches is not None:
    overrides.append(f'eval_batches={args.eval_batches}')
  config = workdir_config(args.workdir, overrides)
  tokenizer = data_lib.load_or_train_tokenizer(config.data, config.model.vocab_size)
  batches = data_lib.make_eval_batches(config, tokenizer)
  model_cfg, params = load_model(args.workdir, config)
  results = evaluate_workdir(model_cfg, params, batches)
  with open(os.path.join(args.workdir, 'eval.json'), 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=2, sort_keys=True)
  print_json(results)
  return 0
