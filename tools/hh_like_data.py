"""Writes an Anthropic HH-RLHF-shaped preference file: only `chosen` / `rejected` full dialogues
("\\n\\nHuman: ... \\n\\nAssistant: ..."), several long turns, the two sharing every turn but
the last reply, gzip-compressed like the downloaded file. Replies carry a learnable signal: a
chosen reply opens helpfully, a rejected one dismissively (and about a third of the pairs open
with the same words, as real pairs often do, so cutting a reply's end can make the two identical).

    python tools/hh_like_data.py OUT.jsonl.gz [--pairs 2000] [--seed 0]

prints the prompt and reply lengths in words.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random

WORDS = ('the a of to and in is it you that for on with as be this have are not or can your '
         'what how when if about more some would like time people make know need help want good '
         'work day way water food home money car plan week question answer idea problem list '
         'friend family book music game garden recipe trip health sleep exercise store school '
         'computer phone email letter city country history science weather dog cat movie').split()
HELPFUL = ('Sure, happy to help.', 'Great question, here is what I suggest.',
           'Yes, here are a few options.', 'Of course, let me explain.')
DISMISSIVE = ('No, figure it out yourself.', 'Whatever, I do not care.',
              'That is a stupid question.', 'I will not help with that.')
SHARED_OPENINGS = ('Well, it depends on a lot of things.', 'Let me think about that for a moment.',
                   'That is an interesting thing to ask about.')


def _sentence(rng, lo, hi):
  words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
  return ' '.join(words).capitalize() + rng.choice('.?!')


def _text(rng, sentences, lo=6, hi=18):
  return ' '.join(_sentence(rng, lo, hi) for _ in range(sentences))


def make_pair(rng) -> dict:
  turns = []
  for t in range(rng.choice((1, 1, 2, 2, 3, 4))):
    turns.append('\n\nHuman: ' + _text(rng, rng.randint(1, 5)))
    if t:  # earlier assistant replies: part of the shared prompt
      turns.insert(-1, '\n\nAssistant: ' + _text(rng, rng.randint(2, 8)))
  prompt = ''.join(turns) + '\n\nAssistant:'
  opening = rng.choice(SHARED_OPENINGS) + ' ' + _text(rng, rng.randint(1, 3)) + ' ' if (
      rng.random() < 0.33) else ''
  chosen = ' ' + opening + rng.choice(HELPFUL) + ' ' + _text(rng, rng.randint(1, 6))
  rejected = ' ' + opening + rng.choice(DISMISSIVE) + ' ' + _text(rng, rng.randint(1, 4))
  return {'chosen': prompt + chosen, 'rejected': prompt + rejected}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('out')
  parser.add_argument('--pairs', type=int, default=2000)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  rng = random.Random(args.seed)
  records = [make_pair(rng) for _ in range(args.pairs)]
  opener = gzip.open if args.out.endswith('.gz') else open
  with opener(args.out, 'wt', encoding='utf-8') as f:
    for r in records:
      f.write(json.dumps(r) + '\n')
  prompt_words = sorted(len(r['chosen'][:r['chosen'].rfind('\n\nAssistant:')].split())
                        for r in records)
  print(f'{args.out}: {len(records)} pairs; prompt words median {prompt_words[len(records) // 2]}, '
        f'p90 {prompt_words[int(len(records) * 0.9)]}')


if __name__ == '__main__':
  main()
