"""`lmjax sample`: generate continuations of prompts with a trained workdir's model."""

from __future__ import annotations

import json

from lmjax.commands.common import load_model, workdir_config


def add_arguments(parser) -> None:
  parser.add_argument('--workdir', required=True)
  source = parser.add_mutually_exclusive_group()
  source.add_argument('--prompt', action='append', help='a prompt (repeat for a batch)')
  source.add_argument('--prompts_file', help='JSONL with a "prompt" field per line')
  parser.add_argument('--output', help='write JSONL records (prompt, completion, ...) here')
  parser.add_argument('--max_new_tokens', type=int)
  parser.add_argument('--temperature', type=float, help='0 = greedy')
  parser.add_argument('--top_k', type=int)
  parser.add_argument('--top_p', type=float)
  parser.add_argument('--min_p', type=float, default=0.0)
  parser.add_argument('--repetition_penalty', type=float, default=1.0)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--no_stop', action='store_true', help='do not stop at end-of-sequence')


def sampling_config(config, tokenizer, args=None):
  from lmjax.generate import SamplingConfig  # pylint: disable=g-import-not-at-top
  pick = lambda name: (getattr(args, name, None) if args is not None and
                       getattr(args, name, None) is not None else config.sample[name])
  return SamplingConfig(
      max_new_tokens=pick('max_new_tokens'), temperature=pick('temperature'),
      top_k=pick('top_k'), top_p=pick('top_p'),
      min_p=getattr(args, 'min_p', 0.0) or 0.0,
      repetition_penalty=getattr(args, 'repetition_penalty', 1.0) or 1.0,
      stop_ids=() if getattr(args, 'no_stop', False) else (tokenizer.eos_id,))


def sample_text(workdir, config, prompts, args=None) -> list[str]:
  """Completions (text after each prompt) from the workdir's model."""
  return [r['completion'] for r in sample_records(workdir, config, prompts, args)]


def sample_records(workdir, config, prompts, args=None) -> list[dict]:
  from lmjax import data as data_lib  # pylint: disable=g-import-not-at-top
  from lmjax.generate import generate  # pylint: disable=g-import-not-at-top
  tokenizer = data_lib.load_or_train_tokenizer(config.data, config.model.vocab_size)
  model_cfg, params = load_model(workdir, config)
  cfg = sampling_config(config, tokenizer, args)
  token_prompts = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
  out = generate(model_cfg, params, token_prompts, cfg, seed=getattr(args, 'seed', 0) or 0,
                 pad_id=tokenizer.pad_id)
  records = []
  for i, prompt in enumerate(prompts):
    n = int(out['lengths'][i])
    ids = [int(t) for t in out['tokens'][i, :n] if int(t) not in cfg.stop_ids]
    records.append({'prompt': prompt, 'completion': tokenizer.decode(ids), 'tokens': ids,
                    'logprobs': [float(x) for x in out['logprobs'][i, :len(ids)]],
                    'finished': bool(out['finished'][i])})
  return records


def run(args) -> int:
  config = workdir_config(args.workdir)
  if args.prompts_file:
    with open(args.prompts_file, encoding='utf-8') as f:
      prompts = [json.loads(line)['prompt'] for line in f if line.strip()]
  else:
    prompts = args.prompt or [config.sample.prompt]
  records = sample_records(args.workdir, config, prompts, args)
  if args.output:
    with open(args.output, 'w', encoding='utf-8') as f:
      for record in records:
        f.write(json.dumps(record) + '\n')
  for record in records:
    print(record['prompt'] + record['completion'])
    print('---')
  return 0
