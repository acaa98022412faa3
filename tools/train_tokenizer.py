"""Trains a SentencePiece tokenizer on a data source and writes the model.

  python tools/train_tokenizer.py --source=stdlib --vocab_size=8192 --output=/tmp/code.model

Uses the same sampling and trainer settings as the training pipeline (held-out documents excluded);
prints the model path and its compression in bytes per token on the held-out documents.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lmjax.config import base_config  # pylint: disable=g-import-not-at-top
from lmjax.data import pipeline, sources, tokenizer  # pylint: disable=g-import-not-at-top

_EVAL_SAMPLE_DOCS = 200


def _parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--source', default='stdlib', help="as data.source, e.g. 'corpus/*.txt'")
  parser.add_argument('--vocab_size', type=int, required=True)
  parser.add_argument('--output', required=True, help='path of the .model file to write')
  parser.add_argument('--text_field', default='text', help='JSONL field holding the text')
  parser.add_argument('--eval_fraction', type=float, default=base_config().data.eval_fraction,
                      help='held-out fraction excluded from training (as data.eval_fraction)')
  parser.add_argument('--on_bad_input', choices=('error', 'skip'), default='error')
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = _parse_args(argv)
  data = base_config().data
  data.source, data.text_field = args.source, args.text_field
  data.eval_fraction, data.on_bad_input = args.eval_fraction, args.on_bad_input
  try:
    train = tokenizer.train_sources(data)
    texts = tokenizer.sample_training_texts(train, data.text_field)
    start = time.time()
    proto = tokenizer.train_model(texts, args.vocab_size)
    seconds = time.time() - start
    tokenizer.write_atomically(os.path.abspath(args.output), proto)
    tok = tokenizer.Tokenizer(proto, args.output)
    held_out = pipeline.eval_refs(sources.load_sources(data), data.eval_fraction)
    sample = held_out[:_EVAL_SAMPLE_DOCS]
    where = 'held-out documents'
    eval_texts = [sources.read_document(r, data.text_field) for r in sample]
    if not eval_texts:
      eval_texts, where = texts, 'training sample'
  except sources.DataError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  bpt = tokenizer.bytes_per_token(tok, eval_texts)
  print(args.output)
  print(f'vocab {tok.vocab_size}, trained on {sum(len(t) for t in texts) / 1e6:.2f}M characters '
        f'in {seconds:.1f}s; {bpt:.3f} bytes/token on {len(eval_texts)} {where}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
