"""`lmjax sample`: generate continuations of prompts with a trained workdir's model.

Every decoding option defaults to the workdir config's `sample` group; flags override it.
"""

from __future__ import annotations

import json

from lmjax.commands.common import load_model, workdir_config
from lmjax.config import ConfigError

_OPTIONS = ('max_new_tokens', 'temperature', 'top_k', 'top_p', 'min_p', 'repetition_penalty',
            'num_beams', 'length_penalty')


def add_sampling_arguments(parser) -> None:
  """The decoding flags, shared with `lmjax eval` (generation metrics)."""
  parser.add_argument('--max_new_tokens', type=int)
  parser.add_argument('--temperature', type=float, help='0 = greedy')
  parser.add_argument('--top_k', type=int, help='keep the k most likely tokens; 0 = off')
  parser.add_argument('--top_p', type=float, help='nucleus: smallest set with this mass; 1 = off')
  parser.add_argument('--min_p', type=float,
                      help='drop tokens below min_p x the top probability; 0 = off')
  parser.add_argument('--repetition_penalty', type=float,
                      help='> 1 discourages tokens already in the prompt or output; 1 = off')
  parser.add_argument('--num_beams', type=int, help='> 1 = beam search (no sampling options)')
  parser.add_argument('--length_penalty', type=float,
                      help='beam score = sum log-prob / length ** length_penalty')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--no_stop', action='store_true', help='do not stop at end-of-sequence')
  parser.add_argument('--stop_token', type=int, action='append', default=[],
                      help='another token id that ends a sequence (repeatable)')
  parser.add_argument('--batch_size', type=int, default=32, help='prompts per generate call')


def add_arguments(parser) -> None:
  parser.add_argument('--workdir', required=True)
  source = parser.add_mutually_exclusive_group()
  source.add_argument('--prompt', action='append', help='a prompt (repeat for a batch)')
  source.add_argument('--prompts_file', help='JSONL with a "prompt" field per line')
  parser.add_argument('--output', help='write JSONL records (prompt, completion, ...) here')
  add_sampling_arguments(parser)


def sampling_config(config, tokenizer, args=None):
  """SamplingConfig from the config's `sample` group, overridden by any flags given."""
  from lmjax.generate import SamplingConfig  # pylint: disable=g-import-not-at-top
  values = {}
  for name in _OPTIONS:
    flag = getattr(args, name, None) if args is not None else None
    values[name] = flag if flag is not None else config.sample[name]
  stops = () if getattr(args, 'no_stop', False) else (tokenizer.eos_id,)
  stops += tuple(getattr(args, 'stop_token', None) or ())
  try:
    return SamplingConfig(stop_ids=tuple(dict.fromkeys(stops)), **values)
  except ValueError as e:
    raise ConfigError(f'sample: {e}') from None


def complete(model_cfg, params, tokenizer, prompts: list[str], cfg, seed: int = 0,
             batch_size: int = 32) -> list[dict]:
  """Records {prompt, completion, tokens, logprobs, finished} (stop tokens left out) for text
  prompts, each encoded as `[bos] + encode(prompt)`."""
  from lmjax.generate import generate  # pylint: disable=g-import-not-at-top
  records = []
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    out = generate(model_cfg, params, [[tokenizer.bos_id] + tokenizer.encode(p) for p in chunk],
                   cfg, seed=seed + start, pad_id=tokenizer.pad_id)
    for i, prompt in enumerate(chunk):
      n = int(out['lengths'][i])
      ids = [int(t) for t in out['tokens'][i, :n]]
      logprobs = [float(x) for x in out['logprobs'][i, :n]]
      if out['finished'][i] and ids and ids[-1] in cfg.stop_ids:
        ids, logprobs = ids[:-1], logprobs[:-1]
      record = {'prompt': prompt, 'completion': tokenizer.decode(ids), 'tokens': ids,
                'logprobs': logprobs, 'finished': bool(out['finished'][i])}
      if 'scores' in out:
        record['score'] = float(out['scores'][i])
      records.append(record)
  return records


def sample_records(workdir, config, prompts, args=None) -> list[dict]:
  from lmjax import data as data_lib  # pylint: disable=g-import-not-at-top
  tokenizer = data_lib.load_or_train_tokenizer(config.data, config.model.vocab_size)
  cfg = sampling_config(config, tokenizer, args)
  model_cfg, params = load_model(workdir, config)
  return complete(model_cfg, params, tokenizer, prompts, cfg,
                  seed=getattr(args, 'seed', 0) or 0, batch_size=getattr(args, 'batch_size', 32))


def sample_text(workdir, config, prompts, args=None) -> list[str]:
  """Completions (text after each prompt) from the workdir's model."""
  return [r['completion'] for r in sample_records(workdir, config, prompts, args)]


def read_jsonl(path: str, field: str | None = None) -> list:
  """The records of a JSONL file (blank lines skipped), or one field of each."""
  records = []
  with open(path, encoding='utf-8') as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ConfigError(f'{path}:{line_no}: not valid JSON ({e.msg})') from None
      if field is not None:
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
          raise ConfigError(f'{path}:{line_no}: no string field {field!r}')
        record = record[field]
      records.append(record)
  return records


def write_jsonl(path: str, records: list[dict]) -> None:
  with open(path, 'w', encoding='utf-8') as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + '\n')


def run(args) -> int:
  config = workdir_config(args.workdir, args.overrides)
  if args.prompts_file:
    prompts = read_jsonl(args.prompts_file, 'prompt')
  else:
    prompts = args.prompt or [config.sample.prompt]
  records = sample_records(args.workdir, config, prompts, args)
  if args.output:
    write_jsonl(args.output, records)
  for record in records:
    print(record['prompt'] + record['completion'])
    print('---')
  return 0
