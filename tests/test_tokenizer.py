"""Tests for lmjax.data.tokenizer and tools/train_tokenizer.py (tiny vocab, small corpora)."""

import glob
import os
import pickle
import sys
import sysconfig

import pytest

from lmjax.config import base_config
from lmjax.data import DataError, load_or_train_tokenizer, load_tokenizer, sources, tokenizer

VOCAB = 512
STDLIB = sysconfig.get_paths()['stdlib']
JSON_GLOB = os.path.join(STDLIB, 'json', '*.py')

AWKWARD = [
    '',
    'def f(x):\n    return x  \n\n\n\tif x:\n\t\treturn 1\n',
    '   leading spaces and trailing   ',
    '\n\n\n',
    'mixed \t tabs\t \t and spaces \n  \n',
    'windows\r\nline\r\nendings\r\n',
    'unicode: héllo wörld ☃ 𝔘𝔫𝔦 日本語 🙂 \u200b zero width\n',
    'sentencepiece marks: \u2581 \u2581\u2581x \U000F0000 \U000F0000_ end',
    'nul \x00 and bell \x07 and \x7f',
    '# -*- coding: utf-8 -*-\nclass A:\n    """Doc\n\n    string."""\n\n    x = 1\n',
]


def _data_config(source, **overrides):
  data = base_config().data
  data.source = source
  for key, value in overrides.items():
    data[key] = value
  return data


@pytest.fixture(scope='session')
def tok():
  texts = [open(p, encoding='utf-8').read() for p in sorted(glob.glob(JSON_GLOB))]
  return tokenizer.Tokenizer(tokenizer.train_model(texts, VOCAB))


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
  monkeypatch.setenv('LMJAX_CACHE_DIR', str(tmp_path / 'cache'))
  return tmp_path / 'cache' / 'tokenizers'


def _write_corpus(directory, count=12):
  directory.mkdir()
  for i in range(count):
    body = ''.join(f'    value_{i}_{j} = compute({j}, "text {i}")\n' for j in range(20))
    (directory / f'doc{i:02d}.txt').write_text(f'def func_{i}():\n{body}\n')
  return str(directory / '*.txt')


def test_special_ids_and_vocab(tok):
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
  assert tok.vocab_size == VOCAB
  assert tok.encode('') == []


@pytest.mark.parametrize('text', AWKWARD)
def test_round_trip_awkward_strings(tok, text):
  ids = tok.encode(text)
  assert all(0 <= i < tok.vocab_size for i in ids)
  assert tok.decode(ids) == text


def test_round_trip_stdlib_files(tok):
  paths = sources.stdlib_paths()
  names = ('os.py', 'textwrap.py', 'tabnanny.py', 'string.py', 'codecs.py', 'ast.py')
  chosen = [p for p in paths if os.path.basename(p) in names and os.path.dirname(p) == STDLIB]
  assert len(chosen) == len(names)
  for path in chosen:
    text = open(path, encoding='utf-8').read()
    assert tok.decode(tok.encode(text)) == text, path


def test_compresses_code(tok):
  text = open(os.path.join(STDLIB, 'json', 'decoder.py'), encoding='utf-8').read()
  assert tokenizer.bytes_per_token(tok, [text]) > 2.0


def test_pickle_round_trip(tok):
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.encode(AWKWARD[1]) == tok.encode(AWKWARD[1])
  assert clone.vocab_size == tok.vocab_size


def test_text_chunks_cover_text_and_respect_limit():
  text = 'a' * 10_000 + '\n' + 'short line\n' * 1000 + 'tail'
  chunks = list(tokenizer._text_chunks(text))
  assert ''.join(chunks) == text
  assert max(len(c) for c in chunks) == tokenizer.CHUNK_CHARS


def test_train_then_cache_hit_does_not_retrain(tmp_path, cache_env, monkeypatch):
  data = _data_config(_write_corpus(tmp_path / 'corpus'), eval_fraction=0.2)
  first = load_or_train_tokenizer(data, VOCAB)
  assert os.path.dirname(first.path) == str(cache_env)
  assert os.listdir(cache_env) == [os.path.basename(first.path)]  # no temp files left behind
  mtime = os.stat(first.path).st_mtime_ns

  def no_training(*args, **kwargs):
    raise AssertionError('retrained despite a cached model')

  monkeypatch.setattr(tokenizer, 'train_model', no_training)
  second = load_or_train_tokenizer(data, VOCAB)
  assert second.path == first.path
  assert os.stat(second.path).st_mtime_ns == mtime
  assert second.encode('def func_3():\n') == first.encode('def func_3():\n')


def test_cache_key_depends_on_vocab_and_content():
  texts = ['def f():\n    pass\n']
  assert tokenizer._cache_key(texts, 512) == tokenizer._cache_key(list(texts), 512)
  assert tokenizer._cache_key(texts, 512) != tokenizer._cache_key(texts, 1024)
  assert tokenizer._cache_key(texts, 512) != tokenizer._cache_key(['def g():\n'], 512)


def test_training_sample_excludes_eval_documents(tmp_path):
  data = _data_config(_write_corpus(tmp_path / 'corpus', count=20), eval_fraction=0.3)
  all_docs = sources.load_sources(data)[0].docs
  _, held_out = sources.split_eval(all_docs, 0.3)
  texts = tokenizer.sample_training_texts(tokenizer.train_sources(data), data.text_field)
  held_texts = {sources.read_document(r, 'text') for r in held_out}
  assert held_texts and not held_texts & set(texts)
  assert len(texts) == len(all_docs) - len(held_out)


def test_sample_respects_budget(tmp_path):
  data = _data_config(_write_corpus(tmp_path / 'corpus', count=20), eval_fraction=0.0)
  doc_bytes = os.path.getsize(tmp_path / 'corpus' / 'doc05.txt')
  texts = tokenizer.sample_training_texts(tokenizer.train_sources(data), 'text',
                                          budget_bytes=3 * doc_bytes)
  assert 3 <= len(texts) <= 4
  again = tokenizer.sample_training_texts(tokenizer.train_sources(data), 'text',
                                          budget_bytes=3 * doc_bytes)
  assert texts == again


def test_load_given_model(tmp_path, tok):
  path = tmp_path / 'tok.model'
  path.write_bytes(tok._proto)
  loaded = load_or_train_tokenizer(_data_config('stdlib', tokenizer=str(path)), VOCAB)
  assert loaded.encode(AWKWARD[1]) == tok.encode(AWKWARD[1])
  with pytest.raises(DataError, match='more than model.vocab_size=300'):
    load_tokenizer(str(path), 300)


def test_missing_model_names_key_and_path(tmp_path):
  missing = str(tmp_path / 'nope.model')
  with pytest.raises(DataError, match=r'data\.tokenizer.*nope\.model'):
    load_or_train_tokenizer(_data_config('stdlib', tokenizer=missing), VOCAB)


def test_cli_writes_model_and_reports_compression(tmp_path, capsys):
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'tools'))
  import train_tokenizer  # pylint: disable=g-import-not-at-top
  output = tmp_path / 'out' / 'code.model'
  corpus = _write_corpus(tmp_path / 'corpus')
  assert train_tokenizer.main([f'--source={corpus}', f'--vocab_size={VOCAB}',
                               f'--output={output}', '--eval_fraction=0.2']) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == str(output)
  assert 'bytes/token' in lines[1]
  assert float(lines[1].split('; ')[1].split()[0]) > 1.0
  written = load_tokenizer(str(output))
  assert written.decode(written.encode('x = 1\n')) == 'x = 1\n'
