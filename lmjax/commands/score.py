"""`lmjax score`: per-token log-probabilities of given texts or token sequences.

Each input JSONL record has `text` (encoded as `[bos] + encode(text)`) or `tokens` (a list of ids,
used as given). The output repeats the record and adds `tokens` (for text records), `logprobs`
(log p of each token after the first, given the ones before it) and `sum_logprob`.
"""

from __future__ import annotations

from lmjax.commands.common import load_model, workdir_config
from lmjax.config import ConfigError


def add_arguments(parser) -> None:
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--input', required=True, help='JSONL: "text" or "tokens" per record')
  parser.add_argument('--output', required=True, help='JSONL with logprobs and sum_logprob added')
  parser.add_argument('--batch_size', type=int, default=8, help='sequences per forward pass')


def token_sequences(records: list, tokenizer, vocab_size: int, where: str) -> list[list[int]]:
  sequences = []
  for i, record in enumerate(records, start=1):
    if isinstance(record, dict) and isinstance(record.get('tokens'), list):
      ids = record['tokens']
      if not all(isinstance(t, int) and 0 <= t < vocab_size for t in ids):
        raise ConfigError(f'{where}: record {i}: "tokens" must be ids in [0, {vocab_size})')
      sequences.append(list(ids))
    elif isinstance(record, dict) and isinstance(record.get('text'), str):
      sequences.append([tokenizer.bos_id] + tokenizer.encode(record['text']))
    else:
      raise ConfigError(f'{where}: record {i}: needs "text" (str) or "tokens" (list of ids)')
  return sequences


def run(args) -> int:
  from lmjax import data as data_lib  # pylint: disable=g-import-not-at-top
  from lmjax.commands.sample import read_jsonl, write_jsonl  # pylint: disable=g-import-not-at-top
  from lmjax.inference.scoring import score_sequences  # pylint: disable=g-import-not-at-top
  config = workdir_config(args.workdir, args.overrides)
  tokenizer = data_lib.load_or_train_tokenizer(config.data, config.model.vocab_size)
  records = read_jsonl(args.input)
  sequences = token_sequences(records, tokenizer, config.model.vocab_size, args.input)
  model_cfg, params = load_model(args.workdir, config)
  try:
    logps = score_sequences(model_cfg, params, sequences, args.batch_size)
  except ValueError as e:
    raise ConfigError(f'{args.input}: {e}') from None
  out = []
  for record, ids, logp in zip(records, sequences, logps):
    values = [float(x) for x in logp]
    out.append({**record, 'tokens': ids, 'logprobs': values, 'sum_logprob': float(sum(values))})
  write_jsonl(args.output, out)
  print(f'scored {len(out)} sequences ({sum(len(s) - 1 for s in sequences)} tokens) -> '
        f'{args.output}')
  return 0
