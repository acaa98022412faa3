"""`lmjax sample`: generate continuations of prompts with a trained workdir's model.

Every decoding option defaults to the workdir config's `sample` group; flags override it (see
`lmjax.inference.complete`).
"""

from __future__ import annotations

from lmjax.workdir import config_of


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
  parser.add_argument('--num_beams', type=int, help='> 1 = beam search; turns the workdir\'s '
                      'sampling options (temperature, top_k/p, min_p, repetition_penalty) off')
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


def run(args) -> int:
  from lmjax.data.jsonl import read_jsonl, write_jsonl  # pylint: disable=g-import-not-at-top
  from lmjax.inference.complete import sample_records  # pylint: disable=g-import-not-at-top
  config = config_of(args.workdir, args.overrides)
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
