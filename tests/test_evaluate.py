"""Scoring, perplexity, bits per byte, generation metrics, multiple choice and the inference CLI."""

import functools
import json
import math
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from lmjax import evaluation as eval_lib
from lmjax.cli import main as cli_main
from lmjax.data import DataError
from lmjax.evaluation.loglikelihood import Scorer
from lmjax.inference.scoring import score_sequences
from lmjax.models.transformer import ModelConfig, forward, init_params


class CharTokenizer:
  """One token per character (ids 3..vocab-1), so tokens and characters correspond exactly."""
  pad_id, bos_id, eos_id = 0, 1, 2

  def __init__(self, vocab_size):
    self.vocab_size = vocab_size

  def encode(self, text):
    return [3 + ord(c) % (self.vocab_size - 3) for c in text]


def _model(vocab=40, max_seq_len=64):
  cfg = ModelConfig(vocab_size=vocab, num_layers=1, d_model=32, num_heads=4, num_kv_heads=2,
                    head_dim=8, mlp_dim=64, max_seq_len=max_seq_len, init_std=0.3)
  return cfg, nn.unbox(init_params(cfg, jax.random.key(0)))


@functools.lru_cache(maxsize=None)
def _jitted_forward(cfg):
  return jax.jit(lambda params, tokens, positions, segments: forward(cfg, params, tokens,
                                                                      positions, segments))


def _reference_logprobs(cfg, params, seq):
  """log p(seq[t + 1] | seq[:t + 1]) from one plain forward pass (the sequence right-padded to
  max_seq_len with segment-0 padding after it, so one program serves every length), log-softmax
  in float64 numpy."""
  n, width = len(seq), cfg.max_seq_len
  tokens = np.zeros((1, width), np.int32)
  tokens[0, :n] = seq
  segments = (np.arange(width) < n).astype(np.int32)[None]
  logits = np.asarray(_jitted_forward(cfg)(params, tokens, np.arange(width)[None], segments),
                      np.float64)[0, :n]
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
  logp -= logits.max(-1, keepdims=True)
  return np.asarray([logp[t, seq[t + 1]] for t in range(n - 1)])


def test_score_equals_log_softmax_of_full_forward():
  cfg, params = _model()
  rng = np.random.default_rng(0)
  seqs = [list(rng.integers(0, 40, n)) for n in (5, 17, 2, 30, 9)] + [[7]]
  scores = score_sequences(cfg, params, seqs, batch_size=2, bucket=8)
  for seq, got in zip(seqs, scores):
    assert got.shape == (len(seq) - 1,)
    np.testing.assert_allclose(got, _reference_logprobs(cfg, params, seq), atol=1e-4)
  with pytest.raises(ValueError, match='max_seq_len'):
    score_sequences(cfg, params, [[1] * 65])


def test_text_windows_predict_every_token_once():
  ids = list(range(23))
  for window in (1, 4, 22, 40):
    windows = eval_lib.text_windows(ids, window)
    assert all(2 <= len(w) <= window + 1 for w in windows)
    targets = [t for w in windows for t in w[1:]]
    assert targets == ids[1:]


def test_perplexity_equals_exp_mean_token_nll():
  cfg, params = _model()
  tok = CharTokenizer(cfg.vocab_size)
  texts = ['hello world, hello model', 'def f(x):\n  return x', 'z']
  got = eval_lib.text_perplexity(cfg, params, tok, texts, window=32, batch_size=2)
  nll = [-_reference_logprobs(cfg, params, [tok.bos_id] + tok.encode(t)) for t in texts]
  mean = np.concatenate(nll).mean()
  assert got['tokens'] == sum(len(t) for t in texts)
  assert got['loss'] == pytest.approx(mean, rel=1e-5)
  assert got['perplexity'] == pytest.approx(math.exp(mean), rel=1e-5)
  num_bytes = sum(len(t.encode('utf-8')) for t in texts)
  assert got['bits_per_byte'] == pytest.approx(np.concatenate(nll).sum() / math.log(2) / num_bytes,
                                               rel=1e-5)


def test_bits_per_byte_of_a_uniform_model_on_a_known_text():
  cfg, params = _model()
  params = dict(params, lm_head=np.zeros_like(params['lm_head']))  # every logit 0: uniform
  text = 'héllo wörld ✓ naïve café'  # multi-byte characters: bytes != characters
  num_bytes = len(text.encode('utf-8'))
  assert num_bytes > len(text)
  got = eval_lib.text_perplexity(cfg, params, CharTokenizer(cfg.vocab_size), [text], window=5)
  assert got['bytes'] == num_bytes and got['tokens'] == len(text)
  assert got['bits_per_byte'] == pytest.approx(len(text) * math.log2(cfg.vocab_size) / num_bytes,
                                               rel=1e-5)
  assert got['perplexity'] == pytest.approx(cfg.vocab_size, rel=1e-5)


def test_rouge_and_bleu_equal_the_libraries():
  from rouge_score import rouge_scorer
  import sacrebleu
  predictions = ['the cat sat on the mat', 'a quick brown fox jumps', 'nothing in common']
  references = ['the cat is on the mat', 'the quick brown fox jumped over', 'entirely different']
  got = eval_lib.generation_metrics(predictions, references)
  scorer = rouge_scorer.RougeScorer(['rouge1', 'rouge2', 'rougeL'], use_stemmer=True)
  for kind in ('rouge1', 'rouge2', 'rougeL'):
    expected = np.mean([scorer.score(r, p)[kind].fmeasure for p, r in zip(predictions, references)])
    assert got[kind] == pytest.approx(100 * expected)
  assert got['bleu'] == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score)
  assert 0 < got['bleu'] < 100 and 0 < got['rouge1'] < 100


def test_multiple_choice_against_independent_loglikelihoods():
  cfg, params = _model()
  tok = CharTokenizer(cfg.vocab_size)
  items = [eval_lib.to_item(r) for r in (
      {'question': 'Q: 2+2=', 'choices': ['4', '5', 'four'], 'answer': 0},
      {'question': 'colour?', 'choices': ['red', 'blue'], 'answer': 0},
      {'question': 'x', 'choices': ['a', 'bb', 'ccc', 'd'], 'answer': 0})]
  got = eval_lib.choice_loglikelihoods(Scorer(cfg, params, rows=3), tok, items)
  for item, scores in zip(items, got):
    context = [tok.bos_id] + tok.encode(item['contexts'][0])
    for choice, ll in zip(item['choices'], scores):  # one token per character: " " + choice
      ref = _reference_logprobs(cfg, params, context + tok.encode(' ' + choice))[len(context) - 1:]
      assert ll == pytest.approx(ref.sum(), abs=1e-4)


def test_choice_accuracy_per_subject_and_macro_by_hand():
  """A 4-choice task with a known answer pattern: acc picks the highest log-likelihood, acc_norm
  the highest per character of the choice; subjects average to the macro scores."""
  choices = ['a', 'bbbb', 'cc', 'dddddddd']
  items = [{'contexts': ['q'] * 4, 'choices': choices, 'label': label, 'subject': subject}
           for label, subject in ((1, 'x'), (0, 'x'), (3, 'x'), (3, 'y'))]
  lls = [[-1, -2, -3, -4],   # acc picks 0 (wrong); per char -1, -.5, -1.5, -.5: 1 (right)
         [-1, -5, -5, -5],   # acc 0 (right); per char -1, -1.25, -2.5, -.625: 3 (wrong)
         [-4, -6, -5, -4.5],  # acc 0 (wrong); per char -4, -1.5, -2.5, -.5625: 3 (right)
         [-9, -9, -9, -1]]   # both 3 (right)
  got = eval_lib.choice_accuracy(items, lls)
  assert got['subjects'] == {'x': {'acc': 1 / 3, 'acc_norm': 2 / 3, 'questions': 3},
                             'y': {'acc': 1.0, 'acc_norm': 1.0, 'questions': 1}}
  assert (got['acc'], got['acc_norm'], got['questions']) == (0.5, 0.75, 4)
  assert got['macro_acc'] == pytest.approx((1 / 3 + 1) / 2)
  assert got['macro_acc_norm'] == pytest.approx((2 / 3 + 1) / 2)
  with pytest.raises(DataError, match='label'):
    eval_lib.check_choice_item({'question': 'q', 'choices': ['a', 'b'], 'answer': 2})


SCHEMA_RECORDS = {  # a native record of each schema -> its item (contexts, choices, label)
    'mmlu': ({'question': '2+2?', 'choices': ['3', '4'], 'answer': 1, 'subject': 'math'},
             ['2+2?\nA. 3\nB. 4\nAnswer:'] * 2, ['A', 'B'], 1, 'math'),
    'hellaswag': ({'ctx': 'He opens the door', 'endings': ['and walks in.', 'and flies.'],
                   'label': '0', 'activity_label': 'Home'},
                  ['Home: He opens the door'] * 2, ['and walks in.', 'and flies.'], 0, ''),
    'arc': ({'question': 'Sky?', 'choices': {'text': ['blue', 'red'], 'label': ['1', '2']},
             'answerKey': '2'}, ['Question: Sky?\nAnswer:'] * 2, ['blue', 'red'], 1, ''),
    'piqa': ({'goal': 'Open a jar', 'sol1': 'twist the lid', 'sol2': 'eat it', 'label': 0},
             ['Question: Open a jar\nAnswer:'] * 2, ['twist the lid', 'eat it'], 0, ''),
    'winogrande': ({'sentence': 'The cup fell because _ was slippery.', 'option1': 'the cup',
                    'option2': 'the table', 'answer': '1'},
                   ['The cup fell because the cup', 'The cup fell because the table'],
                   ['was slippery.'] * 2, 0, ''),
}


def test_choice_schemas_field_mapping_and_fewshot(tmp_path):
  from lmjax.data.fields import FieldMap
  for schema, (record, contexts, choices, label, subject) in SCHEMA_RECORDS.items():
    assert eval_lib.to_item(record, schema) == {'contexts': contexts, 'choices': choices,
                                                'label': label, 'subject': subject}
  # a user mapping on top of a schema: nested sources, the subject from another field
  fields = FieldMap.parse('context=q.text,label=gold,subject=meta.0', eval_lib.choice.NAMES)
  item = eval_lib.to_item({'q': {'text': 'Hi'}, 'choices': ['a', 'b'], 'gold': 'B',
                           'meta': ['greet']}, 'lmjax', fields)
  assert (item['contexts'], item['label'], item['subject']) == (['Hi', 'Hi'], 1, 'greet')
  path = tmp_path / 'bad.jsonl'
  path.write_text(json.dumps({'ctx': 'x', 'endings': ['a', 'b'], 'label': 0}) + '\n'
                  + json.dumps({'context': 'x', 'endings': ['a', 'b']}) + '\n')
  with pytest.raises(DataError, match=r"bad.jsonl:2: no field 'ctx'"):
    eval_lib.read_choice_items(str(path), 'hellaswag')

  items = [{'contexts': [f'q{i}'] * 2, 'choices': [f'a{i}', f'b{i}'], 'label': i % 2,
            'subject': ''} for i in range(6)]
  shots = eval_lib.with_fewshot(items, 2, seed=7)
  assert shots == eval_lib.with_fewshot(items, 2, seed=7)  # the same draw for the same seed
  for i, item in enumerate(shots):
    prefix = item['contexts'][0][:-len(f'q{i}')]
    examples = prefix.split('\n\n')[:-1]
    assert item['contexts'] == [prefix + f'q{i}'] * 2 and len(examples) == 2
    for example in examples:  # solved examples of other items: context, space, right choice
      j = int(example[1])
      assert j != i and example == f'q{j} {items[j]["choices"][j % 2]}'


# ---- the CLI on a tiny trained workdir ----


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  from lmjax.config import load_config
  from lmjax.train.loop import train
  config = load_config('tiny')
  config.steps, config.eval_every, config.checkpoint_every, config.log_every = 4, 100, 4, 2
  config.optimizer.warmup_steps = 1
  path = str(tmp_path_factory.mktemp('gen_workdir'))
  train(config, path)
  return path


def _write_jsonl(path, records):
  with open(path, 'w', encoding='utf-8') as f:
    for record in records:
      f.write(json.dumps(record) + '\n')
  return str(path)


def _read_jsonl(path):
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def test_cli_sample_and_score(workdir, tmp_path):
  prompts = _write_jsonl(tmp_path / 'prompts.jsonl', [{'prompt': 'def '}, {'prompt': 'import os'}])
  out = str(tmp_path / 'samples.jsonl')
  assert cli_main(['sample', f'--workdir={workdir}', f'--prompts_file={prompts}',
                   f'--output={out}', '--max_new_tokens=5', '--temperature=0.9', '--top_k=50',
                   '--top_p=0.9', '--min_p=0.02', '--repetition_penalty=1.1', '--seed=3']) == 0
  records = _read_jsonl(out)
  assert [r['prompt'] for r in records] == ['def ', 'import os']
  assert all(len(r['tokens']) == len(r['logprobs']) <= 5 for r in records)
  beams = str(tmp_path / 'beams.jsonl')
  assert cli_main(['sample', f'--workdir={workdir}', '--prompt=class ', '--num_beams=3',
                   '--length_penalty=0.5', '--max_new_tokens=4', f'--output={beams}']) == 0
  beam = _read_jsonl(beams)[0]
  assert len(beam['tokens']) <= 4 and beam['score'] <= 0  # the stop token is left out of tokens
  assert cli_main(['sample', f'--workdir={workdir}', '--num_beams=2', '--temperature=1']) == 2

  scored_in = _write_jsonl(tmp_path / 'in.jsonl', [{'text': 'import os\n', 'id': 7},
                                                   {'tokens': [2, 40, 41, 42]}])
  scored_out = str(tmp_path / 'scored.jsonl')
  assert cli_main(['score', f'--workdir={workdir}', f'--input={scored_in}',
                   f'--output={scored_out}', '--batch_size=2']) == 0
  text, ids = _read_jsonl(scored_out)
  assert text['id'] == 7 and len(text['logprobs']) == len(text['tokens']) - 1
  assert ids['tokens'] == [2, 40, 41, 42] and len(ids['logprobs']) == 3
  for record in (text, ids):
    assert record['sum_logprob'] == pytest.approx(sum(record['logprobs']))
    assert all(lp <= 0 for lp in record['logprobs'])


def test_cli_eval_writes_eval_json_and_metrics(workdir, tmp_path):
  source = _write_jsonl(tmp_path / 'text.jsonl', [{'text': 'def f(x):\n    return x + 1\n'},
                                                  {'text': 'import os\nprint(os.getcwd())\n'}])
  generation = _write_jsonl(tmp_path / 'gen.jsonl', [
      {'prompt': 'def ', 'reference': 'def main():'}, {'prompt': 'import', 'reference': 'import os'}])
  choices = _write_jsonl(tmp_path / 'mc.jsonl', [
      {'question': 'import', 'choices': [' os', ' zzzz'], 'answer': 0},
      {'question': 'def', 'choices': [' f(x):', ' ))))'], 'answer': 0}])
  assert cli_main(['eval', f'--workdir={workdir}', f'--source={source}', '--window=16',
                   f'--generation_file={generation}', f'--choices_file={choices}',
                   '--max_new_tokens=4']) == 0
  with open(os.path.join(workdir, 'eval.json'), encoding='utf-8') as f:
    result = json.load(f)
  assert result['step'] == 4 and result['documents'] == 2
  assert result['perplexity'] == pytest.approx(math.exp(result['loss']))
  assert result['bytes'] == sum(len(r['text'].encode()) for r in _read_jsonl(source))
  assert result['bits_per_byte'] == pytest.approx(
      result['loss'] * result['tokens'] / math.log(2) / result['bytes'])
  for key in ('rouge1', 'rouge2', 'rougeL', 'bleu', 'mc_acc', 'mc_acc_norm', 'mc_macro_acc'):
    assert 0 <= result[key] <= 100
  last = _read_jsonl(os.path.join(workdir, 'metrics.jsonl'))[-1]
  assert last['split'] == 'eval' and last['step'] == 4
  assert last['bits_per_byte'] == result['bits_per_byte']

  # the default source: the workdir's own held-out split
  assert cli_main(['eval', f'--workdir={workdir}', '--max_documents=1', '--window=32']) == 0
  with open(os.path.join(workdir, 'eval.json'), encoding='utf-8') as f:
    held_out = json.load(f)
  assert held_out['documents'] == 1 and held_out['source'].startswith('held-out')
  bad = _write_jsonl(tmp_path / 'bad.jsonl', [{'question': 'q', 'choices': ['a'], 'answer': 0}])
  assert cli_main(['eval', f'--workdir={workdir}', f'--choices_file={bad}',
                   '--no_perplexity']) == 2
