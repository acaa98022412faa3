"""`lmjax score`: per-token log-probabilities of given texts or token sequences.

Each input JSONL record has `text` (encoded as `[bos] + encode(text)`) or `tokens` (a list of ids,
used as given). The output repeats the record and adds `tokens` (for text records), `logprobs`
(log p of each token after the first, given the ones before it) and `sum_logprob`.
"""

from __future__ import annotations

from lmjax.workdir import config_of


def add_arguments(parser) -> None:
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--input', required=True, help='JSONL: "text" or "tokens" per record')
  parser.add_argument('--output', required=True, help='JSONL with logprobs and sum_logprob added')
  parser.add_argument('--batch_size', type=int, default=8, help='sequences per forward pass')


def run(args) -> int:
  from lmjax.data.jsonl import write_jsonl  # pylint: disable=g-import-not-at-top
  from lmjax.inference.scoring import score_jsonl  # pylint: disable=g-import-not-at-top
  config = config_of(args.workdir, args.overrides)
  out = score_jsonl(args.workdir, config, args.input, args.batch_size)
  write_jsonl(args.output, out)
  print(f'scored {len(out)} sequences ({sum(len(r["tokens"]) - 1 for r in out)} tokens) -> '
        f'{args.output}')
  return 0
