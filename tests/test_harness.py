"""The lm-evaluation-harness backend (`lmjax.evaluation.harness`) on a tiny params-only workdir:
scores against `lmjax score` and a float64 log-softmax, rolling windows by hand, generation
against greedy `lmjax sample`, lm-eval's tokenization of a SentencePiece model, fixed shapes.
The tasks, their data and their runs (`tests/test_harness_tasks.py`) are all local: nothing
reaches a hub."""

import functools
import json

import flax.linen as nn
import jax
import numpy as np
import pytest

pytest.importorskip('lm_eval')

# pylint: disable=g-import-not-at-top,wrong-import-position
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM

from lmjax.cli import main as cli_main
from lmjax.config import load_config
from lmjax.evaluation import harness
from lmjax.evaluation.loglikelihood import length_buckets, token_scores
from lmjax.models.transformer import ModelConfig, forward, init_params
from lmjax.workdir import save_params

MAX_LEN = 64


def make_workdir(path):
  """A params-only workdir of the tiny preset (seed-0 init, larger init so outputs vary)."""
  config = load_config('tiny')
  config.model.max_seq_len, config.model.init_std = MAX_LEN, 0.2
  params = nn.unbox(init_params(ModelConfig.from_config(config.model), jax.random.key(0)))
  save_params(path, params, config)
  return path


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  return make_workdir(str(tmp_path_factory.mktemp('harness_workdir')))


@pytest.fixture(scope='module')
def lm(workdir):
  return harness.LmjaxLM(workdir=workdir, batch_size=4)


def requests(kind, args, task='toy'):
  return [Instance(request_type=kind, doc={}, arguments=a, idx=0, metadata=(task, i, 1))
          for i, a in enumerate(args)]


@functools.lru_cache(maxsize=None)
def _forward(cfg):
  return jax.jit(lambda params, tokens, positions, segments: forward(cfg, params, tokens,
                                                                      positions, segments))


def reference_logprobs(lm, seq):
  """(log p(seq[t + 1] | seq[:t + 1]), whether it is the argmax) from one plain forward pass of
  seq[:-1] (right-padded to MAX_LEN), log-softmax in float64 numpy."""
  n = len(seq) - 1
  tokens = np.zeros((1, MAX_LEN), np.int32)
  tokens[0, :n] = seq[:-1]
  segments = (np.arange(MAX_LEN) < n).astype(np.int32)[None]
  logits = np.asarray(_forward(lm.model_cfg)(lm.params, tokens, np.arange(MAX_LEN)[None],
                                             segments), np.float64)[0, :n]
  top = logits.max(-1)
  log_z = top + np.log(np.exp(logits - top[:, None]).sum(-1))
  targets = np.asarray(seq[1:])
  return logits[np.arange(n), targets] - log_z, logits.argmax(-1) == targets


def split_tokens(tok, context, continuation):
  """lm-eval's rule: trailing spaces of the context move to the continuation; [bos] + the whole
  text is encoded once and the continuation is what follows the context's tokens (an empty
  context is just [bos])."""
  if context:
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
  whole = [tok.bos_id] + tok.encode(context + continuation)
  n_context = 1 + len(tok.encode(context)) if context else 1
  return whole, len(whole) - n_context


PAIRS = [('def f(x):', ' return x'), ('import', ' os'), ('', 'hello world'), ('Answer: ', 'yes'),
         ('class A:\n    pass\n', '\n'), ('x = 1 ' * 40, '+ 2')]  # the last is left-truncated


def test_loglikelihood_equals_score_and_log_softmax(lm, workdir, tmp_path):
  got = lm.loglikelihood(requests('loglikelihood', PAIRS), disable_tqdm=True)
  tok = lm.tokenizer_
  expected = []
  for (context, continuation), (ll, greedy) in zip(PAIRS, got):
    whole, n = split_tokens(tok, context, continuation)
    logp, argmax = reference_logprobs(lm, whole[-(MAX_LEN + 1):])
    expected.append((whole, n))
    assert ll == pytest.approx(logp[-n:].sum(), abs=1e-5)
    assert greedy == bool(argmax[-n:].all())
  assert len(expected[-1][0]) > MAX_LEN + 1  # truncation from the left was exercised

  # `lmjax score` of the same texts (those that fit the model)
  inputs, outputs = tmp_path / 'in.jsonl', tmp_path / 'out.jsonl'
  fit = [i for i, (whole, _) in enumerate(expected) if len(whole) <= MAX_LEN]
  inputs.write_text(''.join(json.dumps({'text': PAIRS[i][0] + PAIRS[i][1]}) + '\n' for i in fit))
  assert cli_main(['score', f'--workdir={workdir}', f'--input={inputs}',
                   f'--output={outputs}']) == 0
  scored = [json.loads(line) for line in outputs.read_text().splitlines()]
  for i, record in zip(fit, scored):
    assert record['tokens'] == expected[i][0]
    assert got[i][0] == pytest.approx(sum(record['logprobs'][-expected[i][1]:]), abs=1e-5)


def test_batch_1_equals_batch_16_in_one_program_per_bucket(lm):
  rng = np.random.default_rng(0)
  words = ['def', ' f', '(x)', ':', ' return', ' x', '\n', ' import', ' os', ' #', ' a', 'b']
  pairs = [(''.join(rng.choice(words, rng.integers(1, 25))), ''.join(rng.choice(words, k)))
           for k in rng.integers(1, 6, 24)]
  one = harness.LmjaxLM.from_params(lm.model_cfg, lm.params, lm.tokenizer_, batch_size=1)
  before = token_scores._cache_size()  # pylint: disable=protected-access
  sixteen = harness.LmjaxLM.from_params(lm.model_cfg, lm.params, lm.tokenizer_, batch_size=16)
  got16 = sixteen.loglikelihood(requests('loglikelihood', pairs), disable_tqdm=True)
  compiled = token_scores._cache_size() - before  # pylint: disable=protected-access
  got1 = one.loglikelihood(requests('loglikelihood', pairs), disable_tqdm=True)
  np.testing.assert_allclose([ll for ll, _ in got16], [ll for ll, _ in got1], rtol=0, atol=1e-5)
  assert [g for _, g in got16] == [g for _, g in got1]
  widths = {w for w in length_buckets(MAX_LEN)
            if any(len(split_tokens(lm.tokenizer_, *p)[0]) - 1 <= w for p in pairs)}
  assert 1 <= compiled <= len(widths)  # 24 mixed lengths, at most one program per bucket


def test_loglikelihood_rolling_equals_windows_by_hand(lm):
  window = 24
  small = harness.LmjaxLM.from_params(lm.model_cfg, lm.params, lm.tokenizer_, batch_size=4,
                                      max_length=window)
  docs = ['def f(x):\n    return x * 2\n\n' * 8, 'import os\n']
  got = small.loglikelihood_rolling(requests('loglikelihood_rolling', [(d,) for d in docs]))
  tok = lm.tokenizer_
  for doc, total in zip(docs, got):
    ids = tok.encode(doc)
    # the first window predicts the first `window` tokens after BOS; each later one the next
    # `window` (the last fewer), given the `window` tokens before its last target
    expected = reference_logprobs(lm, [tok.bos_id] + ids[:window])[0].sum()
    start = window
    while start < len(ids):
      end = min(start + window, len(ids))
      expected += reference_logprobs(lm, ids[end - window - 1:end])[0][-(end - start):].sum()
      start = end
    assert total == pytest.approx(expected, abs=1e-4)
  assert len(tok.encode(docs[0])) > 3 * window  # several windows, the last one partial


def test_generate_until_equals_greedy_sample_and_stops_at_each_sequence(lm, workdir, tmp_path):
  prompts, n = ['def f(x):', 'import os\n'], 12
  out = tmp_path / 'samples.jsonl'
  assert cli_main(['sample', f'--workdir={workdir}', *[f'--prompt={p}' for p in prompts],
                   '--temperature=0', f'--max_new_tokens={n}', f'--output={out}']) == 0
  samples = [json.loads(line) for line in out.read_text().splitlines()]
  plain = {'until': [], 'max_gen_toks': n, 'do_sample': False}
  got = lm.generate_until(requests('generate_until', [(p, plain) for p in prompts]))
  assert got == [s['completion'] for s in samples]

  tok, cut, whole_tokens = lm.tokenizer_, 0, 0
  for prompt, sample in zip(prompts, samples):
    text = sample['completion']
    # a stop that is a token by itself (decoding stops at it), if the sample has one
    one_token = next((tok.decode([t]) for t in sample['tokens'][1:]
                      if tok.encode(tok.decode([t])) == [t]), text[1:3])
    whole_tokens += len(tok.encode(one_token)) == 1
    for stop in (text[3:5], one_token, [text[6:8], text[2:3]]):
      stops = stop if isinstance(stop, list) else [stop]
      kwargs = {'until': stops, 'max_gen_toks': n, 'do_sample': False}
      [result] = lm.generate_until(requests('generate_until', [(prompt, kwargs)]))
      expected = text
      for s in stops:
        expected = expected.split(s)[0]
      assert result == expected
      cut += result != text
  assert cut >= 4 and whole_tokens >= 1  # the stops did cut, one of them a single token


class HFStyle(TemplateLM):
  """lm-eval's Hugging Face backend as far as tokenization goes: `HFLM.tok_encode` passes
  `add_special_tokens` through to the transformers tokenizer (its default adds LLaMA's BOS).
  (HFLM itself needs `accelerate`, lm-eval's [hf] extra, to import.)"""

  def __init__(self, tokenizer):
    super().__init__()
    self.tokenizer = tokenizer

  eot_token_id = property(lambda self: self.tokenizer.eos_token_id)
  prefix_token_id = property(lambda self: self.tokenizer.bos_token_id)

  def tok_encode(self, string, add_special_tokens=None, **unused):
    kwargs = {} if add_special_tokens is None else {'add_special_tokens': add_special_tokens}
    return self.tokenizer.encode(string, **kwargs)

  _loglikelihood_tokens = loglikelihood_rolling = generate_until = None


def test_continuation_tokens_match_lm_eval_hf_backend_on_sentencepiece(lm, tmp_path):
  """lm-eval's TemplateLM over the same SentencePiece model loaded by transformers (LLaMA-style:
  BOS added) splits every (context, continuation) pair into the same tokens as the lmjax model."""
  import shutil
  import transformers
  shutil.copy(lm.tokenizer_.path, tmp_path / 'tokenizer.model')
  hf = HFStyle(transformers.LlamaTokenizer.from_pretrained(str(tmp_path), add_bos_token=True,
                                                           add_prefix_space=False))

  def pairs_of(model, args):
    seen = []
    model._loglikelihood_tokens = lambda reqs, **_: seen.extend(r[1:] for r in reqs) or []
    TemplateLM.loglikelihood(model, requests('loglikelihood', args), disable_tqdm=True)
    del model._loglikelihood_tokens
    return seen

  args = [('Question: is the sky blue?\nAnswer:', ' yes'), ('Answer: ', 'no'),
          ('The capital of France is', ' Paris'), ('', ' leading space'), ('a', '  two spaces'),
          ('naïve café', ' ✓ done')]
  ours, theirs = pairs_of(lm, args), pairs_of(hf, args)
  assert ours == theirs
  assert theirs[0][0][0] == lm.tokenizer_.bos_id and theirs[3][0] == [lm.tokenizer_.bos_id]
  assert theirs[1][1] == hf.tokenizer.encode(' no', add_special_tokens=False)  # space moved


# ---- local tasks, end to end (offline: JSONL and YAML written here) ----

DOCS = {
    'toy_a': [('What is 2 + 2?', ['4', 'five', 'a large number', '22'], 0),
              ('Which is a colour?', ['blue', 'x', 'the sound of rain', 'seven'], 1),
              ('Pick the café', ['café', 'tea', 'a glass of water', 'no'], 2)],
    'toy_b': [('def f(x): return', ['x', 'None', 'x + 1 if x else 0', 'pass'], 3),
              ('import', ['os', 'sys', 'numpy as np', 'this'], 0)],
}
TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
fewshot_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: answer
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
GROUP_YAML = """group: toy_group
task: [toy_a, toy_b]
aggregate_metric_list:
  - metric: acc
    weight_by_size: true
  - metric: acc_norm
    weight_by_size: true
"""


@pytest.fixture(scope='module')
def tasks_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp('harness_tasks')
  for name, docs in DOCS.items():
    data = directory / f'{name}.jsonl'
    data.write_text(''.join(json.dumps({'question': q, 'choices': c, 'answer': a}) + '\n'
                            for q, c, a in docs))
    (directory / f'{name}.yaml').write_text(TASK_YAML.format(name=name, data=data))
  (directory / 'toy_missing.yaml').write_text(
      TASK_YAML.format(name='toy_missing', data=directory / 'absent.jsonl'))
  (directory / 'toy_group.yaml').write_text(GROUP_YAML)
  return str(directory)


@pytest.fixture
def offline(monkeypatch):
  monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')


def expected_accuracies(lm) -> dict:
  """acc and acc_norm (log-likelihood per character of the choice) of each task and of the
  group (weighted by size), from independent log-likelihoods, zero-shot."""
  tok, out, totals = lm.tokenizer_, {}, np.zeros(2)
  for name, docs in DOCS.items():
    hits = np.zeros(2)
    for question, choices, answer in docs:
      lls = []
      for choice in choices:
        whole, n = split_tokens(tok, f'Q: {question}\nA:', ' ' + choice)
        lls.append(reference_logprobs(lm, whole)[0][-n:].sum())
      lls, lengths = np.asarray(lls), np.asarray([len(c) for c in choices], np.float64)
      hits += [np.argmax(lls) == answer, np.argmax(lls / lengths) == answer]
    out[name] = hits / len(docs)
    totals += hits
  out['toy_group'] = totals / sum(len(d) for d in DOCS.values())
  return out


def test_simple_evaluate_acc_acc_norm_and_group_equal_hand_computed(lm, workdir, tasks_dir,
                                                                     offline):
  from lm_eval import simple_evaluate
  from lm_eval.tasks import TaskManager
  del offline
  model = harness.LmjaxLM(workdir=workdir, batch_size=4)
  out = simple_evaluate(model=model, tasks=['toy_group'], num_fewshot=0, bootstrap_iters=0,
                        task_manager=TaskManager(include_path=tasks_dir, include_defaults=False))
  expected = expected_accuracies(lm)
  flat = harness.flat_metrics(out)
  for name, (acc, acc_norm) in expected.items():
    assert flat[f'{name}/acc'] == pytest.approx(acc)
    assert flat[f'{name}/acc_norm'] == pytest.approx(acc_norm)
  assert len({tuple(v) for v in expected.values()}) > 1  # not a degenerate pattern


def test_lm_eval_cli_and_lmjax_eval_tasks(lm, workdir, tasks_dir, offline, tmp_path):
  expected = expected_accuracies(lm)
  out = tmp_path / 'lm_eval_out'
  model_args = f'workdir={workdir},tokenizer={lm.tokenizer_.path},batch_size=4'  # its own
  assert cli_main(['lm-eval', '--model', 'lmjax', '--model_args', model_args, '--tasks',
                   'toy_group', '--include_path', tasks_dir, '--num_fewshot', '0',
                   '--output_path', str(out)]) == 0
  [path] = list(out.rglob('results_*.json'))
  flat = harness.flat_metrics(json.loads(path.read_text()))
  for name, (acc, acc_norm) in expected.items():
    assert (flat[f'{name}/acc'], flat[f'{name}/acc_norm']) == pytest.approx((acc, acc_norm))

  assert cli_main(['eval', f'--workdir={workdir}', '--tasks=toy_a,toy_b',
                   f'--include_path={tasks_dir}', '--num_fewshot=0', '--log_samples',
                   '--batch_size=4']) == 0
  with open(f'{workdir}/eval.json', encoding='utf-8') as f:
    result = json.load(f)
  for name in DOCS:
    assert result[f'harness/{name}/acc'] == pytest.approx(expected[name][0])
    assert result[f'harness/{name}/acc_norm'] == pytest.approx(expected[name][1])
    with open(f'{workdir}/eval_samples/{name}.jsonl', encoding='utf-8') as f:
      assert len(f.readlines()) == len(DOCS[name])
  with open(f'{workdir}/metrics.jsonl', encoding='utf-8') as f:
    last = json.loads(f.readlines()[-1])
  assert last['split'] == 'eval' and last['harness/toy_a/acc'] == result['harness/toy_a/acc']


class AsciiTokenizer:
  """One token per ASCII character; anything else is the unknown token."""
  pad_id, unk_id, bos_id, eos_id, path = 0, 1, 2, 3, ''

  def encode(self, text):
    return [4 + ord(c) if ord(c) < 128 else self.unk_id for c in text]

  def decode(self, ids):
    return ''.join(chr(i - 4) for i in ids if i >= 4)


def test_bad_input_names_the_task(lm, workdir, tasks_dir, offline, capsys):
  assert cli_main(['eval', f'--workdir={workdir}', '--tasks=toy_a,nope',
                   f'--include_path={tasks_dir}']) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "unknown task 'nope'" in err

  assert cli_main(['eval', f'--workdir={workdir}', '--tasks=toy_missing',
                   f'--include_path={tasks_dir}']) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "task 'toy_missing'" in err and 'absent.jsonl' in err
  assert 'missing offline' in err

  ascii_lm = harness.LmjaxLM.from_params(lm.model_cfg, lm.params, AsciiTokenizer(), batch_size=4)
  with pytest.raises(harness.HarnessInputError, match=r"task 'toy_a' .*cannot encode 'é'"):
    harness.run_tasks(ascii_lm, ['toy_a'], include_path=tasks_dir)


def test_harness_tasks_during_training_equal_the_saved_checkpoint(tasks_dir, offline, tmp_path):
  from lmjax.train.loop import train
  config = load_config('tiny')
  config.steps, config.eval_every, config.checkpoint_every, config.log_every = 2, 100, 2, 1
  config.optimizer.warmup_steps, config.model.max_seq_len = 1, MAX_LEN
  config.eval.harness_tasks, config.eval.harness_every = 'toy_a', 1
  config.eval.harness_include_path, config.eval.harness_batch_size = tasks_dir, 4
  workdir = str(tmp_path / 'run')
  train(config, workdir)
  with open(f'{workdir}/metrics.jsonl', encoding='utf-8') as f:
    logged = [r for r in map(json.loads, f) if r['split'] == 'harness']
  assert [r['step'] for r in logged] == [1, 2]
  saved = harness.run_tasks(harness.LmjaxLM(workdir=workdir, batch_size=4), ['toy_a'],
                            include_path=tasks_dir, bootstrap_iters=0)
  final = harness.flat_metrics(saved)
  assert logged[-1]['toy_a/acc'] == final['toy_a/acc']
  assert logged[-1]['toy_a/acc_norm'] == final['toy_a/acc_norm']
  events = b''.join(p.read_bytes() for p in (tmp_path / 'run' / 'tb').rglob('events.*'))
  assert b'harness/toy_a/acc_norm' in events


def test_builtin_multiple_choice_equals_hand_computed_without_the_harness(lm, workdir, tmp_path):
  """`lmjax eval --choices_file` (no lm-eval) on the same questions, under other field names
  (mapped with --choices_fields), subjects from a field: the same acc / acc_norm per subject."""
  expected = expected_accuracies(lm)
  path = tmp_path / 'mc.jsonl'
  path.write_text(''.join(
      json.dumps({'q': f'Q: {q}\nA:', 'options': c, 'gold': a, 'meta': {'task': name}}) + '\n'
      for name, docs in DOCS.items() for q, c, a in docs))
  assert cli_main(['eval', f'--workdir={workdir}', f'--choices_file={path}', '--no_perplexity',
                   '--choices_fields=context=q,choices=options,label=gold,subject=meta.task',
                   '--batch_size=4']) == 0
  with open(f'{workdir}/eval.json', encoding='utf-8') as f:
    result = json.load(f)
  assert (result['mc_acc'], result['mc_acc_norm']) == pytest.approx(tuple(expected['toy_group']))
  for name in DOCS:
    subject = result['mc_subjects'][name]
    assert (subject['acc'], subject['acc_norm']) == pytest.approx(tuple(expected[name]))
  assert result['mc_macro_acc'] == pytest.approx((expected['toy_a'][0] + expected['toy_b'][0]) / 2)


def test_without_lm_eval_the_harness_is_a_one_line_install_hint(monkeypatch):
  import importlib
  import sys
  from lmjax.config import ConfigError
  monkeypatch.setitem(sys.modules, 'lm_eval', None)  # as if the [eval] extra were missing
  monkeypatch.delitem(sys.modules, 'lmjax.evaluation.harness')
  hint = r'^harness tasks need lm-eval: pip install -e "\.\[eval\]"$'
  with pytest.raises(ConfigError, match=hint):
    importlib.import_module('lmjax.evaluation.harness')


SHARDED_SCRIPT = """
import json, sys
import jax
from lm_eval.api.instance import Instance
from lmjax.evaluation import harness
lm = harness.LmjaxLM(workdir=sys.argv[1], batch_size=3)
pairs = [tuple(p) for p in json.loads(sys.argv[2])]
reqs = [Instance('loglikelihood', {}, p, 0, ('t', i, 1)) for i, p in enumerate(pairs)]
gen = Instance('generate_until', {}, ('def f', {'until': ['\\n'], 'max_gen_toks': 8}), 0,
               ('t', 0, 1))
print(json.dumps({'devices': jax.device_count(), 'rows': lm.scorer.rows,
                  'data': lm.scorer.mesh.shape['data'],
                  'll': lm.loglikelihood(reqs, disable_tqdm=True),
                  'gen': lm.generate_until([gen])}))
"""


def test_sharded_over_four_devices_equals_one_device(lm, workdir):
  """On 4 devices the workdir's params go onto the config's mesh (data=-1: 4-way) and each
  batch's rows are split over it (3 rows round up to 4): the same scores and generations."""
  import os
  import subprocess
  import sys
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  run = subprocess.run([sys.executable, '-c', SHARDED_SCRIPT, workdir, json.dumps(PAIRS)],
                       env=env, capture_output=True, text=True, timeout=600, check=True)
  sharded = json.loads(run.stdout.strip().splitlines()[-1])
  assert (sharded['devices'], sharded['data'], sharded['rows']) == (4, 4, 4)
  single = lm.loglikelihood(requests('loglikelihood', PAIRS), disable_tqdm=True)
  np.testing.assert_allclose([ll for ll, _ in sharded['ll']], [ll for ll, _ in single], atol=1e-5)
  assert [g for _, g in sharded['ll']] == [g for _, g in single]
  kwargs = {'until': ['\n'], 'max_gen_toks': 8}
  assert sharded['gen'] == lm.generate_until(requests('generate_until', [('def f', kwargs)]))
