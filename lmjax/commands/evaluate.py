"""`lmjax eval`: perplexity and bits per byte on held-out text, generation metrics and
multiple-choice accuracy of a trained workdir.

Writes the results to DIR/eval.json and appends them to DIR/metrics.jsonl (split 'eval', at the
step of the evaluated checkpoint). See `lmjax.evaluation` for the definitions.

  --source          text to evaluate (a `data.source` spec: GLOB, F.jsonl, mixtures); default: the
                    workdir's held-out split
  --generation_file JSONL of {"prompt", "reference"}: ROUGE-1/2/L (mean F, rouge-score) and BLEU
                    (corpus, sacrebleu) of the completions (decoding flags as in `lmjax sample`)
  --choices_file    JSONL of {"question", "choices": [...], "answer": index}: accuracy of the
                    most likely choice, raw, per character and per token
"""

from __future__ import annotations

from lmjax.commands.common import print_json
from lmjax.commands.sample import add_sampling_arguments
from lmjax.config import ConfigError
from lmjax.workdir import config_of


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


def run(args) -> int:
  from lmjax.data import DataError  # pylint: disable=g-import-not-at-top
  from lmjax.evaluation import evaluate_workdir  # pylint: disable=g-import-not-at-top
  config = config_of(args.workdir, args.overrides)
  try:
    results = evaluate_workdir(
        args.workdir, config, source=args.source, max_documents=args.max_documents,
        window=args.window, perplexity=not args.no_perplexity,
        generation_file=args.generation_file, choices_file=args.choices_file, flags=args,
        seed=args.seed, batch_size=args.batch_size)
  except DataError as e:
    raise ConfigError(str(e)) from None
  print_json(results)
  return 0
