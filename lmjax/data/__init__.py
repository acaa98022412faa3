"""Input pipeline: document sources, SentencePiece tokenizer, packing and batching.

Public API used by the trainer:
  tok = load_or_train_tokenizer(config.data, config.model.vocab_size)
  train_iter = make_train_iterator(config, tok, process_index, process_count)  # get/set_state
  eval_batches = make_eval_batches(config, tok, process_index, process_count)
A batch is a dict of (batch_size // process_count, seq_len) arrays: inputs, targets, segment_ids,
positions (int32) and weights (float32). See `packing` for the exact layout.
"""

from lmjax.data.pipeline import TrainIterator, make_eval_batches, make_train_iterator
from lmjax.data.report import report_data
from lmjax.data.sources import DataError, DocRef, Source, load_sources, skipped_count
from lmjax.data.tokenizer import Tokenizer, load_or_train_tokenizer, load_tokenizer

__all__ = [
    'DataError', 'DocRef', 'Source', 'TrainIterator', 'Tokenizer', 'load_or_train_tokenizer',
    'load_sources', 'load_tokenizer', 'make_eval_batches', 'make_train_iterator', 'report_data',
    'skipped_count',
]
