"""Files as people have them (lmjax.data.records) and every bad input as one line, exit status 2."""

import gzip
import json
import os

import pytest
import zstandard

from lmjax import cli
from lmjax.data import records as records_lib
from lmjax.data.jsonl import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REWARD_TINY = os.path.join(ROOT, 'configs', 'reward_tiny.py')
RECORDS = [{'prompt': f'q{i}', 'chosen': f' yes {i}', 'rejected': ' no', 'n': i} for i in range(5)]


def _write(path, records=RECORDS):
  path = str(path)
  text = ''.join(json.dumps(r) + '\n' for r in records).encode()
  if path.endswith('.parquet'):
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    pq.write_table(pa.Table.from_pylist(records), path)
  elif path.endswith('.json'):
    with open(path, 'w') as f:
      json.dump(records, f, indent=1)
  elif path.endswith('.gz'):
    with gzip.open(path, 'wb') as f:
      f.write(text)
  elif path.endswith('.zst'):
    with open(path, 'wb') as f:
      f.write(zstandard.ZstdCompressor().compress(text))
  elif path.endswith('_hf'):
    import datasets  # pylint: disable=g-import-not-at-top
    datasets.Dataset.from_list(records).save_to_disk(path)
  else:
    with open(path, 'wb') as f:
      f.write(text)
  return path


@pytest.mark.parametrize('name, where', [
    ('p.jsonl', 'p.jsonl:3'), ('p.jsonl.gz', 'p.jsonl.gz:3'), ('p.jsonl.zst', 'p.jsonl.zst:3'),
    ('p.json', 'p.json:record 3'), ('p.parquet', 'p.parquet:row 3'), ('p_hf', 'p_hf:row 3')])
def test_every_format_reads_the_same_records(tmp_path, name, where):
  path = _write(tmp_path / name)
  got = records_lib.read_records(path, 'post.train_file')
  assert [r for _, r in got] == RECORDS
  assert got[2][0] == os.path.join(str(tmp_path), where)


def test_a_datasets_dict_reads_its_train_split(tmp_path):
  import datasets  # pylint: disable=g-import-not-at-top
  d = datasets.DatasetDict({'test': datasets.Dataset.from_list(RECORDS[:2]),
                            'train': datasets.Dataset.from_list(RECORDS)})
  d.save_to_disk(str(tmp_path / 'dd'))
  got = records_lib.read_records(str(tmp_path / 'dd'))
  assert [r for _, r in got] == RECORDS and got[0][0].endswith('dd[train]:row 1')
  assert [r for _, r in records_lib.read_records(str(tmp_path / 'dd'), split='test')] == RECORDS[:2]


def test_a_missing_extra_says_what_to_install(tmp_path, monkeypatch):
  path = _write(tmp_path / 'p.parquet')
  monkeypatch.setitem(__import__('sys').modules, 'pyarrow.parquet', None)
  with pytest.raises(DataError, match=r'needs the pyarrow package: pip install -e "\.\[data\]"'):
    records_lib.read_records(path)


def _bad_inputs(tmp_path):
  """(path, the message expected after 'lmjax train: data error: ')."""
  p = str(tmp_path)
  with open(f'{p}/binary.jsonl', 'wb') as f:
    f.write(b'\x7fELF\x00\x01\x02' * 10)
  open(f'{p}/empty.jsonl', 'w').close()
  with open(f'{p}/badjson.jsonl', 'w') as f:
    f.write(json.dumps(RECORDS[0]) + '\n{"prompt": "a", chosen\n')
  _write(f'{p}/nofield.jsonl', [RECORDS[0], {'prompt': 'a', 'chosen': 'b'}])
  _write(f'{p}/typed.jsonl', [{'prompt': 'a', 'chosen': 3, 'rejected': 'b'}])
  _write(f'{p}/gz.jsonl.gz')
  os.rename(f'{p}/gz.jsonl.gz', f'{p}/gz.jsonl')
  _write(f'{p}/bad.json', RECORDS)
  with open(f'{p}/bad.json', 'a') as f:
    f.write('\n,')
  return [
      (f'{p}/none.jsonl', f'{p}/none.jsonl: no such file'),
      (f'{p}/binary.jsonl', f'{p}/binary.jsonl: a binary file (NUL byte at offset 4); expected '
                            'JSON text'),
      (f'{p}/empty.jsonl', f'{p}/empty.jsonl: holds no records (post.train_file)'),
      (f'{p}/badjson.jsonl', f'{p}/badjson.jsonl:2: not valid JSON'),
      (f'{p}/nofield.jsonl', f"{p}/nofield.jsonl:2: no field 'rejected'; a preference record "
                             'needs chosen and rejected'),
      (f'{p}/typed.jsonl', f"{p}/typed.jsonl:1: field 'chosen': expected a string; got int"),
      (f'{p}/gz.jsonl', f'{p}/gz.jsonl: the file is gzip data but its name does not end in .gz'),
      (f'{p}/bad.json', f'{p}/bad.json:'),
  ]


def test_every_bad_input_is_one_line_naming_file_line_and_field(tmp_path, capsys):
  for path, expected in _bad_inputs(tmp_path):
    code = cli.main(['train', f'--config={REWARD_TINY}', f'--workdir={tmp_path}/run',
                     f'--config.post.train_file={path}', '--config.progress_bar=false'])
    err = capsys.readouterr().err
    assert code == 2, (path, err)
    assert err.startswith(f'lmjax train: data error: {expected}'), err
    assert err.count('\n') == 1 and 'Traceback' not in err


def test_field_mapping_and_tokenizer_mismatch_errors(tmp_path, capsys):
  path = _write(tmp_path / 'p.jsonl')
  code = cli.main(['train', f'--config={REWARD_TINY}', f'--workdir={tmp_path}/run',
                   f'--config.post.train_file={path}', '--config.post.fields=chosen=answer'])
  err = capsys.readouterr().err
  assert code == 2 and err == (f"lmjax train: data error: {path}:1: no field 'answer' "
                               '(post.fields chosen=answer); the record has fields chosen, n, '
                               'prompt, rejected\n')
  code = cli.main(['train', f'--config={REWARD_TINY}', f'--workdir={tmp_path}/run',
                   f'--config.post.train_file={path}', '--config.post.fields=answer=x'])
  err = capsys.readouterr().err
  assert code == 2 and err.startswith("lmjax train: config error: post.fields: unknown field "
                                      "'answer'") and err.count('\n') == 1
  from lmjax.config import load_config  # pylint: disable=g-import-not-at-top
  from lmjax.data import load_or_train_tokenizer  # pylint: disable=g-import-not-at-top
  config = load_config(REWARD_TINY)
  tok = load_or_train_tokenizer(config.data, config.model.vocab_size)
  code = cli.main(['train', f'--config={REWARD_TINY}', f'--workdir={tmp_path}/run2',
                   f'--config.data.tokenizer={tok.path}', '--config.model.vocab_size=128'])
  err = capsys.readouterr().err
  assert code == 2 and err == (f"lmjax train: data error: data.tokenizer: {tok.path!r} has "
                               f'{tok.vocab_size} pieces, more than model.vocab_size=128\n')


def test_a_missing_optional_module_is_an_install_hint(monkeypatch, capsys):
  from lmjax.commands import score  # pylint: disable=g-import-not-at-top

  def run(args):
    raise ModuleNotFoundError("No module named 'safetensors'", name='safetensors')
  monkeypatch.setattr(score, 'run', run)
  assert cli.main(['score', '--workdir=x', '--input=y', '--output=z']) == 2
  assert capsys.readouterr().err == ('lmjax score: missing optional dependency: safetensors: '
                                     'pip install -e ".[hf]"\n')


@pytest.mark.parametrize('name', ['c.jsonl.gz', 'c.parquet', 'c.json', 'c_hf'])
def test_pretraining_sources_read_record_files(tmp_path, name):
  from lmjax.config import base_config  # pylint: disable=g-import-not-at-top
  from lmjax.data import sources  # pylint: disable=g-import-not-at-top
  texts = [{'text': f'doc {i} ' * (i + 1)} for i in range(6)]
  data = base_config().data
  data.source = _write(tmp_path / name, texts)
  docs = sources.load_sources(data)[0].docs
  assert [sources.read_document(d, 'text') for d in docs] == [t['text'] for t in texts]
  data.source = _write(tmp_path / ('bad_' + name), texts[:2] + [{'body': 'x'}])
  with pytest.raises(DataError, match=r"(:row 3|:3|:record 3): no string field 'text' "
                                      r'\(data.text_field\)'):
    sources.load_sources(data)
  data.on_bad_input = 'skip'
  assert len(sources.load_sources(data)[0].skipped) == 1


def test_a_one_file_corpus_is_held_out_by_position(tmp_path, capsys):
  from lmjax.config import base_config  # pylint: disable=g-import-not-at-top
  from lmjax.data import pipeline, report_data, sources  # pylint: disable=g-import-not-at-top
  text = ''.join(f'line {i}: ' + 'word ' * (i % 7) + '\n' for i in range(500))
  (tmp_path / 'shakespeare.txt').write_text(text)
  data = base_config().data
  data.source, data.eval_fraction = str(tmp_path / 'shakespeare.txt'), 0.1
  docs = sources.load_sources(data)[0].docs
  train, held = sources.split_eval(docs, 0.1)
  chunks = sorted(train + held, key=lambda r: r.offset)
  assert len(chunks) == 10 and held and not set(train) & set(held)
  assert ''.join(sources.read_document(r, 'text') for r in chunks) == text  # cut at line ends
  assert all(sources.read_document(r, 'text').endswith('\n') for r in chunks)
  assert pipeline.eval_refs(sources.load_sources(data), 0.1) == held
  config = base_config()
  config.data.source = str(tmp_path / 'one.jsonl')
  assert report_data(config, iter(()), []) == {}
  assert capsys.readouterr().out == (
      f"data: no held-out evaluation: data.source '{tmp_path}/one.jsonl' gave no held-out "
      'document (data.eval_fraction=0.02; a single JSON line or a file of one line stays in '
      'training)\n')
