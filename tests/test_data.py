"""Tests for lmjax.data sources, packing and the train/eval pipelines (tiny corpora, tiny vocab)."""

import glob
import json
import re
import os
import sysconfig

import numpy as np
import pytest

from lmjax.config import base_config
from lmjax.data import (DataError, load_sources, make_eval_batches, make_train_iterator, packing,
                        pipeline, skipped_count, sources, tokenizer)
from lmjax.data.jsonl import read_jsonl, write_jsonl

VOCAB = 512


@pytest.fixture(scope='session')
def tok():
  paths = sorted(glob.glob(os.path.join(sysconfig.get_paths()['stdlib'], 'json', '*.py')))
  return tokenizer.Tokenizer(tokenizer.train_model([open(p).read() for p in paths], VOCAB))


def _doc_text(i):
  return f'# DOC{i:03d}\n' + ''.join(f'x{i} = {j}  # line {j}\n' for j in range(3 + i % 7))


@pytest.fixture
def corpus(tmp_path):
  directory = tmp_path / 'corpus'
  directory.mkdir()
  for i in range(40):
    (directory / f'd{i:03d}.txt').write_text(_doc_text(i))
  return str(directory / '*.txt')


def _config(source, seed=0, batch_size=4, seq_len=32, eval_fraction=0.1, **data):
  c = base_config()
  c.seed, c.batch_size, c.seq_len, c.eval_batches = seed, batch_size, seq_len, 3
  c.model.vocab_size = VOCAB
  c.data.source, c.data.eval_fraction = source, eval_fraction
  for key, value in data.items():
    c.data[key] = value
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def _rows(batches):
  """Packed rows (seq_len + 1 tokens) rebuilt from shifted batches."""
  return np.concatenate([np.concatenate([b['inputs'][:, :1], b['targets']], 1) for b in batches])


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


# --- packing ------------------------------------------------------------------------------------


def test_packing_hand_made_example():
  docs = iter([np.array([10, 11, 12]), np.array([20, 21]), np.array([30, 31, 32, 33, 34, 35, 36])])
  packer = packing.InterleavedPacker(None, docs, num_rows=3, row_len=5)
  first, second = packer.next_rows(), packer.next_rows()
  # row 0 reads docs 1 and 2, row 1 doc 3 (continued in the second call), row 2 finds none left
  assert packer.exhausted
  np.testing.assert_array_equal(second[0][[0, 2]], 0)
  tokens, seg, pos = (np.concatenate([a[:2], b[1:2], a[2:]]) for a, b in zip(first, second))
  np.testing.assert_array_equal(tokens, [[10, 11, 12, 20, 21], [30, 31, 32, 33, 34],
                                         [35, 36, 0, 0, 0], [0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(seg, [[1, 1, 1, 2, 2], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0],
                                      [0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(pos, [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4], [0, 1, 0, 0, 0],
                                      [0, 0, 0, 0, 0]])
  batch = packing.shift_rows(tokens, seg, pos)
  np.testing.assert_array_equal(batch['inputs'], [[10, 11, 12, 20], [30, 31, 32, 33],
                                                  [35, 36, 0, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(batch['targets'], [[11, 12, 20, 21], [31, 32, 33, 34],
                                                   [36, 0, 0, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(batch['segment_ids'], seg[:, :-1])
  np.testing.assert_array_equal(batch['positions'], pos[:, :-1])
  np.testing.assert_array_equal(batch['weights'], [[1, 1, 0, 1], [1, 1, 1, 1], [1, 0, 0, 0],
                                                   [0, 0, 0, 0]])
  assert {k: v.dtype for k, v in batch.items()} == {
      'inputs': np.int32, 'targets': np.int32, 'segment_ids': np.int32, 'positions': np.int32,
      'weights': np.float32}


def test_train_rows_interleave_whole_documents_in_stream_order(corpus, tok):
  """Row r of successive batches reads the documents of slot r back to back; together the rows
  consume the document stream in order, each document exactly once, and a batch mixes documents."""
  config = _config(corpus)
  docs = load_sources(config.data)
  refs = pipeline.train_refs_dataset(docs, 0.1, config.seed)
  encode = pipeline.EncodeDocument(tok, 'text', skip_bad=False)
  expected = [encode(refs[i]).tolist() for i in range(60)]
  batches = _take(make_train_iterator(config, tok), 6)
  rows = np.stack([_rows([b]) for b in batches], 1)  # (rows, batches, seq_len + 1)
  streams = []
  for row_stream in rows.reshape(config.batch_size, -1).tolist():
    starts = [i for i, t in enumerate(row_stream) if t == tok.bos_id]
    assert starts[0] == 0
    streams.append([row_stream[i:j] for i, j in zip(starts, starts[1:] + [len(row_stream)])])
  # Every piece but each row's open (last) one is a whole document; match those first, then the
  # open pieces by prefix among the documents left (documents may share their first tokens), the
  # longest first: a piece of a few tokens (just bos) is a prefix of every document.
  seen, firsts = [], []
  for pieces in streams:
    for k, piece in enumerate(pieces[:-1]):
      index = next(i for i, doc in enumerate(expected) if i not in seen and doc == piece)
      seen.append(index)
      firsts += [index] if k == 0 else []
  for pieces in sorted(streams, key=lambda pieces: -len(pieces[-1])):
    piece = pieces[-1]
    index = next(i for i, doc in enumerate(expected) if i not in seen and doc[:len(piece)] == piece)
    seen.append(index)
    firsts += [index] if len(pieces) == 1 else []
  assert sorted(seen) == list(range(len(seen)))  # the stream's prefix, each document once
  assert len(set(firsts)) == config.batch_size  # the first batch reads one document per row


def test_segments_positions_and_weights_follow_documents(corpus, tok):
  batch = next(make_train_iterator(_config(corpus), tok))
  seg, pos, w, x, y = (batch[k] for k in ('segment_ids', 'positions', 'weights', 'inputs',
                                          'targets'))
  assert (seg >= 1).all()  # training rows are never padded
  starts = np.concatenate([np.ones((4, 1), bool), seg[:, 1:] != seg[:, :-1]], 1)
  assert (pos[starts] == 0).all()
  assert (pos[:, 1:][~starts[:, 1:]] == pos[:, :-1][~starts[:, 1:]] + 1).all()
  assert (x[pos > 0] != tok.bos_id).all()
  np.testing.assert_array_equal(w == 0, y == tok.bos_id)  # the only cut: eos -> next bos
  assert ((x == tok.eos_id) == (w == 0)).all()


# --- determinism and resume ----------------------------------------------------------------------


def test_same_seed_same_batches_different_seed_differs(corpus, tok):
  a = _take(make_train_iterator(_config(corpus, seed=1), tok), 5)
  b = _take(make_train_iterator(_config(corpus, seed=1), tok), 5)
  c = _take(make_train_iterator(_config(corpus, seed=2), tok), 5)
  _assert_batches_equal(a, b)
  assert not np.array_equal(_rows(a), _rows(c))


def test_epochs_are_reshuffled(corpus, tok):
  config = _config(corpus)
  refs = pipeline.train_refs_dataset(load_sources(config.data), 0.1, config.seed)
  n = len(sources.split_eval(load_sources(config.data)[0].docs, 0.1)[0])
  first, second = [refs[i].key for i in range(n)], [refs[i].key for i in range(n, 2 * n)]
  assert sorted(first) == sorted(second) and first != second


@pytest.mark.parametrize('skip', [3, 7])
def test_resume_from_state(corpus, tok, skip):
  config = _config(corpus)
  it = make_train_iterator(config, tok)
  _take(it, skip)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 4)
  fresh = make_train_iterator(config, tok)
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 4), expected)


def test_state_from_another_process_is_rejected(corpus, tok):
  state = make_train_iterator(_config(corpus), tok, 0, 2).get_state()
  with pytest.raises(ValueError, match='process 0 of 2'):
    make_train_iterator(_config(corpus), tok, 1, 2).set_state(state)


# --- eval split, sharding, mixtures --------------------------------------------------------------


def test_eval_documents_never_in_training(corpus, tok):
  config = _config(corpus, eval_fraction=0.2)
  all_docs = load_sources(config.data)[0].docs
  train, held = sources.split_eval(all_docs, 0.2)
  assert 2 <= len(held) <= 16 and len(train) + len(held) == 40
  held_marks = {sources.read_document(r, 'text').split('\n')[0] for r in held}
  batches = _take(make_train_iterator(config, tok), 30)
  row_streams = np.stack([_rows([b]) for b in batches], 1).reshape(config.batch_size, -1)
  text = '\n'.join(tok.decode(stream) for stream in row_streams.tolist())
  train_marks = set(re.findall(r'# DOC\d{3}', text))
  assert len(train_marks) == len(train) and not train_marks & held_marks
  eval_text = tok.decode(_rows(make_eval_batches(config, tok)).reshape(-1))
  assert {line for line in eval_text.split('\n') if line.startswith('# DOC')} <= held_marks


def test_eval_split_is_by_identity_not_position(corpus, tmp_path):
  docs = load_sources(_config(corpus).data)[0].docs
  _, held = sources.split_eval(docs, 0.2)
  for i in range(40, 60):  # more files do not move existing documents between splits
    (tmp_path / 'corpus' / f'd{i:03d}.txt').write_text(_doc_text(i))
  _, held_more = sources.split_eval(load_sources(_config(corpus).data)[0].docs, 0.2)
  assert {r.key for r in held} <= {r.key for r in held_more}
  assert len(sources.split_eval(docs[:3], 0.001)[1]) == 1  # at least one held out


@pytest.mark.parametrize('kind', ['txt', 'jsonl'])
def test_moving_a_dataset_keeps_its_split(tmp_path, kind):
  # Documents are keyed relative to the source's fixed directory, not by absolute path.
  splits = []
  for place in ('here', 'there/deeper'):
    directory = tmp_path / place / 'corpus'
    directory.mkdir(parents=True)
    if kind == 'txt':
      for i in range(40):
        (directory / f'd{i:03d}.txt').write_text(_doc_text(i))
      spec = str(directory / '*.txt')
    else:
      (directory / 'docs.jsonl').write_text(
          ''.join(json.dumps({'text': _doc_text(i)}) + '\n' for i in range(40)))
      spec = str(directory / 'docs.jsonl')
    docs = load_sources(_config(spec).data)[0].docs
    splits.append([sources.read_document(r, 'text') for r in sources.split_eval(docs, 0.2)[1]])
  assert splits[0] and splits[0] == splits[1]


def test_eval_batches_deterministic_and_capped(corpus, tok):
  config = _config(corpus, eval_fraction=0.5)
  batches = make_eval_batches(config, tok)
  assert len(batches) == 3 and batches[0]['inputs'].shape == (4, 32)
  _assert_batches_equal(batches, make_eval_batches(config, tok))
  small_config = _config(corpus, eval_fraction=0.0001)
  small_config.eval_batches = 100
  held = sources.split_eval(load_sources(small_config.data)[0].docs, 0.0001)[1]
  assert len(held) == 1  # forced: 40 * 0.0001 < 1
  doc = pipeline.EncodeDocument(tok, 'text', skip_bad=False)(held[0])
  rows_used = -(-len(doc) // 33)
  small = make_eval_batches(small_config, tok)
  assert len(small) == rows_used  # a lone document is read by row 0 of successive batches
  stream = np.concatenate([r[0] for r in (_rows([b]) for b in small)])
  np.testing.assert_array_equal(stream[:len(doc)], doc)
  assert not stream[len(doc):].any() and not any(_rows([b])[1:].any() for b in small)  # padding
  assert sum(b['weights'].sum() for b in small) == len(doc) - rows_used
  assert make_eval_batches(_config(corpus, eval_fraction=0.0), tok) == []


def test_process_shards_are_disjoint_and_cover(corpus, tok):
  config = _config(corpus)
  docs = load_sources(config.data)
  train = sources.split_eval(docs[0].docs, 0.1)[0]
  shards = []
  for p in range(3):
    refs = pipeline.train_refs_dataset(docs, 0.1, config.seed, p, 3)
    size = len(train[p::3])
    shards.append({refs[i] for i in range(size)})
    assert {refs[i] for i in range(size, 2 * size)} == shards[-1]
  assert sum(len(s) for s in shards) == len(train)
  assert set().union(*shards) == set(train)
  batch = next(make_train_iterator(_config(corpus, batch_size=6), tok, 2, 3))
  assert batch['inputs'].shape == (2, 32)
  whole = make_eval_batches(_config(corpus, eval_fraction=0.3), tok)
  halves = [make_eval_batches(_config(corpus, eval_fraction=0.3), tok, p, 2) for p in range(2)]
  assert len(halves[0]) == len(halves[1]) == len(whole)
  for b, (h0, h1) in zip(whole, zip(*halves)):
    np.testing.assert_array_equal(b['inputs'], np.concatenate([h0['inputs'], h1['inputs']]))


def test_mixture_weights(tmp_path, corpus, tok):
  jsonl = tmp_path / 'extra.jsonl'
  jsonl.write_text(''.join(json.dumps({'text': f'jsonl doc {i}\n'}) + '\n' for i in range(30)))
  config = _config(f'{jsonl}@1,{corpus}@3')
  docs = load_sources(config.data)
  assert [s.weight for s in docs] == [1.0, 3.0]
  refs = pipeline.train_refs_dataset(docs, 0.1, config.seed)
  counts = np.bincount([refs[i].source_index for i in range(800)], minlength=2)
  assert abs(counts[1] / 800 - 0.75) < 0.02
  text = tok.decode(_rows(_take(make_train_iterator(config, tok), 10)).reshape(-1))
  assert 'jsonl doc' in text and '# DOC' in text


def test_parse_source_spec():
  assert sources.parse_source_spec('a.jsonl@1,stdlib@5') == [('a.jsonl', 1.0), ('stdlib', 5.0)]
  assert sources.parse_source_spec('dir/x@y/*.txt') == [('dir/x@y/*.txt', 1.0)]
  with pytest.raises(DataError, match='weight'):
    sources.parse_source_spec('stdlib@0')


def test_stdlib_source_first_batch(tok):
  stdlib = load_sources(_config('stdlib').data)[0]
  names = {d.key for d in stdlib.docs}
  assert 'os.py' in names and 'json/decoder.py' in names and len(names) > 500
  assert not any(part in ('test', 'tests', 'site-packages', 'idle_test')
                 for key in names for part in key.split(os.sep))
  batch = next(make_train_iterator(_config('stdlib'), tok, sources=[stdlib]))
  assert batch['weights'].sum() > 100


# --- bad input -----------------------------------------------------------------------------------


def test_empty_glob_raises(tmp_path, tok):
  with pytest.raises(DataError, match='nothing.*matches no files'):
    load_sources(_config(str(tmp_path / 'nothing' / '*.txt')).data)


def test_non_utf8_file_raises_naming_file(corpus, tmp_path):
  (tmp_path / 'corpus' / 'latin.txt').write_bytes('caf\xe9\n'.encode('latin-1'))
  with pytest.raises(DataError, match=r'latin\.txt: not valid UTF-8'):
    load_sources(_config(corpus).data)


def _bad_jsonl(tmp_path):
  path = tmp_path / 'bad.jsonl'
  path.write_text('{"text": "ok one"}\n{"body": "no text"}\n\n{not json\n{"text": "ok two"}\n')
  return str(path)


def test_bad_jsonl_names_file_and_line(tmp_path):
  path = _bad_jsonl(tmp_path)
  with pytest.raises(DataError, match=r'bad\.jsonl:2: no string field .text.'):
    load_sources(_config(path).data)
  (tmp_path / 'bad.jsonl').write_text('{"text": "ok"}\n\n{not json\n')
  with pytest.raises(DataError, match=r'bad\.jsonl:3: not valid JSON'):
    load_sources(_config(path).data)


def test_read_jsonl_names_file_and_line(tmp_path):
  path = tmp_path / 'records.jsonl'
  path.write_text('{"prompt": "a"}\n\n{"prompt": "b", "n": 1}\n')
  assert read_jsonl(str(path)) == [{'prompt': 'a'}, {'prompt': 'b', 'n': 1}]
  assert read_jsonl(str(path), 'prompt') == ['a', 'b']
  write_jsonl(str(tmp_path / 'copy.jsonl'), [{'t': 'ü'}, [1, 2]])
  assert read_jsonl(str(tmp_path / 'copy.jsonl')) == [{'t': 'ü'}, [1, 2]]
  path.write_text('{"prompt": "a"}\n\n{"text": "b"}\n')
  with pytest.raises(DataError, match=r'records\.jsonl:3: no string field .prompt.'):
    read_jsonl(str(path), 'prompt')
  path.write_text('{"prompt": "a"}\n{not json\n')
  with pytest.raises(DataError, match=r'records\.jsonl:2: not valid JSON'):
    read_jsonl(str(path))
  path.write_bytes(b'{"prompt": "caf\xe9"}\n')
  with pytest.raises(DataError, match=r'records\.jsonl:1: not valid UTF-8'):
    read_jsonl(str(path))

  def encode(record):
    if record.get('prompt') != 'a':
      raise DataError('prompt must be "a"')
    return record['prompt']

  path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
  with pytest.raises(DataError, match=r'records\.jsonl:2: prompt must be "a"'):
    read_jsonl(str(path), encode=encode)
  with pytest.raises(DataError, match=r'missing\.jsonl: cannot read'):
    read_jsonl(str(tmp_path / 'missing.jsonl'))
  with pytest.raises(DataError, match='post.train_file: a JSONL file is required'):
    read_jsonl('', what='post.train_file')
  (tmp_path / 'empty.jsonl').write_text('\n')
  assert read_jsonl(str(tmp_path / 'empty.jsonl')) == []
  with pytest.raises(DataError, match='post.train_file: .*empty.jsonl.* holds no examples'):
    read_jsonl(str(tmp_path / 'empty.jsonl'), what='post.train_file')


def test_skip_mode_counts_and_trains(tmp_path, corpus, tok):
  (tmp_path / 'corpus' / 'latin.txt').write_bytes(b'caf\xe9\n')
  docs = load_sources(_config(f'{_bad_jsonl(tmp_path)},{corpus}', on_bad_input='skip').data)
  assert skipped_count(docs) == 3
  assert [d.line for d in docs[0].docs] == [1, 5]
  assert any('bad.jsonl:4' in s for s in docs[0].skipped)
  assert len(docs[1].docs) == 40
  config = _config(f'{_bad_jsonl(tmp_path)},{corpus}', on_bad_input='skip', eval_fraction=0.0)
  it = make_train_iterator(config, tok)
  assert it.skipped == 3
  text = tok.decode(_rows(_take(it, 5)).reshape(-1))
  assert 'ok one' in text and 'ok two' in text


def test_unreadable_file_raises_naming_file(corpus, tmp_path, monkeypatch):
  locked = str(tmp_path / 'corpus' / 'd007.txt')

  def fake_open(path, *args, **kwargs):
    if path == locked:
      raise PermissionError(13, 'Permission denied')
    return open(path, *args, **kwargs)

  monkeypatch.setattr(sources, 'open', fake_open, raising=False)
  with pytest.raises(DataError, match=r'd007\.txt: cannot read: Permission denied'):
    load_sources(_config(corpus).data)
  docs = load_sources(_config(corpus, on_bad_input='skip').data)
  assert skipped_count(docs) == 1 and len(docs[0].docs) == 39
