"""`lmjax eval`: perplexity and bits per byte on held-out text, generation metrics and
multiple-choice accuracy of a trained workdir.

Writes the results to DIR/eval.json and appends them to DIR/metrics.jsonl (split 'eval', at the
step of the evaluated checkpoint). See `lmjax.evaluation` for the definitions.

  --source          text to evaluate (a `data.source` spec: GLOB, F.jsonl, mixtures); default: the
                    workdir's held-out split
  --generation_file JSONL of {"prompt", "reference"}: ROUGE-1/2/L (mean F, rouge-score) and BLEU
                    (corpus, sacrebleu) of the completions (decoding flags as in `lmjax sample`)
  --choices_file    JSONL multiple choice (`--choices_schema`: lmjax {"question", "choices",
                    "answer"}, mmlu, hellaswag, arc, piqa, winogrande; `--choices_fields
                    NAME=SOURCE,...` renames fields), `--num_fewshot` examples drawn with
                    `--seed`: acc, acc_norm (per character), per subject and macro
  --tasks           lm-evaluation-harness tasks or groups (needs the [eval] extra), e.g.
                    hellaswag,arc_easy,mmlu, with --num_fewshot, --limit, --log_samples and
                    --include_path (a directory of local task YAMLs); perplexity then runs only
                    with --source. Rows per batch: --batch_size.
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
  parser.add_argument('--choices_file', help='JSONL multiple choice (see --choices_schema)')
  parser.add_argument('--choices_schema', default='lmjax',
                      choices=('lmjax', 'mmlu', 'hellaswag', 'arc', 'piqa', 'winogrande'),
                      help='the records\' layout (lmjax: "question", "choices", "answer")')
  parser.add_argument('--choices_fields', default='',
                      help='field mapping NAME=SOURCE,... over context, choices, label, subject')
  parser.add_argument('--tasks', help='lm-eval tasks / groups, comma-separated')
  parser.add_argument('--num_fewshot', type=int,
                      help='few-shot examples per prompt (lm-eval tasks, --choices_file)')
  parser.add_argument('--limit', type=float,
                      help='documents per task (a fraction if < 1); default all')
  parser.add_argument('--log_samples', action='store_true',
                      help='write each task\'s samples to WORKDIR/eval_samples/TASK.jsonl')
  parser.add_argument('--include_path', help='a directory of lm-eval task YAMLs')
  add_sampling_arguments(parser)


def run(args) -> int:
  from lmjax.data import DataError  # pylint: disable=g-import-not-at-top
  from lmjax.evaluation import evaluate_workdir  # pylint: disable=g-import-not-at-top
  config = config_of(args.workdir, args.overrides)
  harness = None
  if args.tasks:
    limit = args.limit
    harness = {'tasks': [t.strip() for t in args.tasks.split(',') if t.strip()],
               'num_fewshot': args.num_fewshot, 'include_path': args.include_path,
               'limit': int(limit) if limit is not None and limit.is_integer() else limit,
               'log_samples': args.log_samples}
  try:
    results = evaluate_workdir(
        args.workdir, config, source=args.source, max_documents=args.max_documents,
        window=args.window, perplexity=not args.no_perplexity and (not args.tasks or args.source),
        generation_file=args.generation_file, choices_file=args.choices_file, flags=args,
        seed=args.seed, batch_size=args.batch_size, harness=harness,
        choices_schema=args.choices_schema, choices_fields=args.choices_fields,
        num_fewshot=args.num_fewshot or 0)
  except DataError as e:
    raise ConfigError(str(e)) from None
  print_json(results)
  return 0
