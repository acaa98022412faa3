"""`lmjax score` on token ids needs no tokenizer; --num_beams overrides a workdir's sampling
settings; init_from refuses a base of another architecture unless the key is given explicitly."""

import json
import os
import shutil

import numpy as np
import pytest

from lmjax import cli
from lmjax import data as data_lib
from lmjax.config import ConfigError
from lmjax.inference.complete import sampling_config
from lmjax.tasks import load_model
from lmjax.train.loop import check_init_from
from lmjax.workdir import read_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V0 = os.path.join(ROOT, 'tests', 'data', 'workdir_v0', 'pretrain')


def test_score_token_ids_without_a_tokenizer(tmp_path, monkeypatch):
  def no_tokenizer(*args):
    raise AssertionError('token-id input must not load a tokenizer')
  monkeypatch.setattr(data_lib, 'load_or_train_tokenizer', no_tokenizer)
  src, out = tmp_path / 'in.jsonl', tmp_path / 'out.jsonl'
  seqs = [[2, 40, 41, 42, 43], [2, 7, 8]]
  src.write_text(''.join(json.dumps({'tokens': s}) + '\n' for s in seqs))
  assert cli.main(['score', f'--workdir={V0}', f'--input={src}', f'--output={out}']) == 0
  got = [json.loads(line) for line in out.read_text().splitlines()]
  from lmjax.models.transformer import forward  # pylint: disable=g-import-not-at-top
  cfg, params = load_model(V0)
  for record, seq in zip(got, seqs):
    logits = np.asarray(forward(cfg, params, np.array([seq]), np.arange(len(seq))[None],
                                np.ones((1, len(seq)), np.int32))[0], np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)
                           ) - logits.max(-1, keepdims=True)
    want = logp[np.arange(len(seq) - 1), seq[1:]]
    np.testing.assert_allclose(record['logprobs'], want, atol=2e-5)


class _Tok:
  eos_id = 3


class _Flags:
  def __init__(self, **kw):
    self.__dict__.update(kw)

  def __getattr__(self, name):
    return None


def test_num_beams_flag_turns_the_workdirs_sampling_off():
  config = read_config(V0)
  config.sample.temperature, config.sample.top_p, config.sample.repetition_penalty = 0.7, 0.95, 1.1
  cfg = sampling_config(config, _Tok(), _Flags(num_beams=3))
  assert (cfg.num_beams, cfg.temperature, cfg.top_p, cfg.repetition_penalty) == (3, 0.0, 1.0, 1.0)
  assert sampling_config(config, _Tok(), _Flags()).temperature == 0.7  # no flag: the workdir's
  with pytest.raises(ConfigError, match='num_beams > 1'):  # an explicit conflict stays an error
    sampling_config(config, _Tok(), _Flags(num_beams=3, temperature=1.0))


def test_init_from_refuses_another_architecture_naming_each_key(tmp_path, capsys):
  base = tmp_path / 'base'
  shutil.copytree(V0, base, ignore=shutil.ignore_patterns('checkpoints'))
  saved = json.loads((base / 'config.json').read_text())
  saved['model'].update(sliding_window=8, rope_theta=500000.0, attention='pallas')
  (base / 'config.json').write_text(json.dumps(saved))
  config = read_config(V0)
  config.init_from = str(base)
  with pytest.raises(ConfigError) as e:
    check_init_from(config)
  assert str(e.value) == (f'init_from: {base} was trained with model.rope_theta=500000.0 (this '
                          'run: 10000.0), model.sliding_window=8 (this run: 0); set them to '
                          'match, or pass them on the command line to override')
  check_init_from(config, {'model.sliding_window', 'model.rope_theta'})  # explicit: accepted
  code = cli.main(['train', '--config=tiny', f'--workdir={tmp_path}/run',
                   f'--config.init_from={base}', '--config.model.rope_theta=500000'])
  err = capsys.readouterr().err
  assert code == 2 and err.startswith('lmjax train: config error: init_from: ') and (
      'model.sliding_window=8' in err and 'rope_theta' not in err and err.count('\n') == 1)
