"""lmjax as an lm-evaluation-harness model (`--model lmjax`), and running harness tasks.

Importing this module imports lm-eval (the `[eval]` extra) and registers the model class
`LmjaxLM` under the name `lmjax`; only the commands that run harness tasks import it.

The rules are those of lm-eval's Hugging Face backend: a context and its continuation are encoded
together and split at the context's length (so a continuation with a leading space scores as it
does there; lm-eval's `TemplateLM` does it), text starts with the BOS token (the prefix of an
empty context, as in `lmjax score`), a pair too long for `max_length` loses tokens from the left,
rolling log-likelihoods use `get_rolling_token_windows` (each token predicted once), and
`generate_until` decodes with the KV cache, stops at EOS and at each `until` string. Requests are
batched into a few fixed shapes (`lmjax.evaluation.loglikelihood`).
"""

from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np

from lmjax.config import ConfigError
from lmjax.data.jsonl import DataError
from lmjax.evaluation.loglikelihood import Scorer, bucket_width

try:
  from lm_eval import utils as lm_utils
  from lm_eval.api.model import TemplateLM
  from lm_eval.api.registry import register_model
  from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text
except ImportError:  # pragma: no cover - the [eval] extra is installed in CI
  raise ConfigError('harness tasks need lm-eval: pip install -e ".[eval]"') from None


class HarnessInputError(DataError):
  """A task the harness cannot run as asked (unknown, data missing, text the tokenizer cannot
  encode); the message names the task."""


def unknown_token_id(tokenizer):
  """The id text becomes when the tokenizer cannot encode it (None if it always can)."""
  unk = getattr(tokenizer, 'unk_id', None)
  if unk is None and hasattr(tokenizer, '_sp'):  # SentencePiece (lmjax.data.tokenizer)
    unk = tokenizer._sp.unk_id()  # pylint: disable=protected-access
  elif unk is None and hasattr(tokenizer, '_tok'):  # tokenizer.json (lmjax.convert.tokenizer)
    name = getattr(tokenizer._tok.model, 'unk_token', None)  # pylint: disable=protected-access
    unk = tokenizer._tok.token_to_id(name) if name else None  # pylint: disable=protected-access
  return unk if isinstance(unk, int) and unk >= 0 else None


@register_model('lmjax')
class LmjaxLM(TemplateLM):
  """An lmjax model for lm-eval. From the command line: `--model lmjax --model_args
  workdir=DIR[,batch_size=16,max_length=N,max_gen_toks=256,tokenizer=PATH]`; in Python:
  `LmjaxLM(workdir=DIR)` or `LmjaxLM.from_params(model_cfg, params, tokenizer)`.

  A workdir is loaded as `lmjax sample` loads it (any task, adapters merged; `config`: its config
  with overrides, default its config.json), with its own
  tokenizer (or `tokenizer`: a SentencePiece model or a tokenizer.json); on several devices its
  params are laid out on the config's mesh and each batch's rows split over the batch axes.
  """

  def __init__(self, workdir: str = '', batch_size=16, max_length=0, max_gen_toks=256,
               tokenizer: str = '', config=None, **unused):
    super().__init__()
    del unused  # lm-eval passes device / max_batch_size, which mean nothing here
    if not workdir:
      raise ConfigError('--model_args: the lmjax model needs workdir=DIR')
    from lmjax import data as data_lib  # pylint: disable=g-import-not-at-top
    from lmjax.models.transformer import ModelConfig  # pylint: disable=g-import-not-at-top
    from lmjax.tasks import load_trained  # pylint: disable=g-import-not-at-top
    from lmjax.workdir import config_of  # pylint: disable=g-import-not-at-top
    config = config if config is not None else config_of(workdir)
    tok = (data_lib.load_tokenizer(tokenizer, config.model.vocab_size) if tokenizer else
           data_lib.load_or_train_tokenizer(config.data, config.model.vocab_size))
    mesh, rules = None, ()
    if jax.device_count() > 1:
      from lmjax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
      mesh, rules = mesh_lib.make_mesh(config), mesh_lib.rules(config)[0]
    _, params = load_trained(workdir, config, mesh=mesh, rules=rules)
    self._setup(ModelConfig.from_config(config.model), params, tok, batch_size, max_length,
                max_gen_toks, mesh, rules)

  @classmethod
  def create_from_arg_obj(cls, arg_dict, additional_config=None) -> 'LmjaxLM':
    """lm-eval's constructor from --model_args; a key given there (batch_size) wins over the
    command line's default for it."""
    extra = {k: v for k, v in (additional_config or {}).items()
             if v is not None and k not in arg_dict}
    return cls(**arg_dict, **extra)

  @classmethod
  def create_from_arg_string(cls, arg_string, additional_config=None) -> 'LmjaxLM':
    return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string),
                                   additional_config)

  @classmethod
  def from_params(cls, model_cfg, params, tokenizer, batch_size=16, max_length=0,
                  max_gen_toks=256, mesh=None, rules=()) -> 'LmjaxLM':
    """The model of live params (e.g. during training), laid out on `mesh` if given."""
    lm = cls.__new__(cls)
    TemplateLM.__init__(lm)
    lm._setup(model_cfg, params, tokenizer, batch_size, max_length, max_gen_toks, mesh, rules)
    return lm

  def _setup(self, model_cfg, params, tokenizer, batch_size, max_length, max_gen_toks, mesh,
             rules):
    rows = 16 if str(batch_size).startswith('auto') else int(batch_size)
    self.model_cfg, self.params, self.tokenizer_ = model_cfg, params, tokenizer
    self.scorer = Scorer(model_cfg, params, rows, int(max_length or 0), mesh, rules)
    self._max_gen_toks = int(max_gen_toks)
    self._unk = unknown_token_id(tokenizer)

  # --- what lm-eval's TemplateLM asks -----------------------------------------------------------
  @property
  def eot_token_id(self) -> int:
    return self.tokenizer_.eos_id

  @property
  def prefix_token_id(self) -> int:
    return self.tokenizer_.bos_id

  @property
  def max_length(self) -> int:
    return self.scorer.max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def batch_size(self) -> int:
    return self.scorer.rows

  @property
  def tokenizer_name(self) -> str:
    return os.path.basename(getattr(self.tokenizer_, 'path', '') or 'lmjax')

  def tok_encode(self, string: str, add_special_tokens=None, **unused) -> list[int]:
    """The tokens of `string`, after BOS unless `add_special_tokens` is False."""
    ids = list(self.tokenizer_.encode(string))
    return ids if add_special_tokens is False else [self.tokenizer_.bos_id] + ids

  def _check_encodable(self, requests) -> None:
    """A one-line error naming the task when the tokenizer turns a request's text into the
    unknown token."""
    if self._unk is None:
      return
    for request in requests:
      for text in request.args:
        if isinstance(text, str) and self._unk in self.tokenizer_.encode(text):
          bad = next((c for c in text if self._unk in self.tokenizer_.encode(c)), text)
          raise HarnessInputError(
              f'task {request.task_name!r} (document {request.doc_id}): the model\'s tokenizer '
              f'cannot encode {bad!r} (it becomes the unknown token); use a tokenizer that covers '
              'the task\'s text (byte fallback)')

  def loglikelihood(self, requests, disable_tqdm: bool = False):
    self._check_encodable(requests)
    return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **unused):
    results = self.scorer.loglikelihoods([(ctx, cont) for _, ctx, cont in requests])
    for (key, _, _), result in zip(requests, results):
      if key is not None:
        self.cache_hook.add_partial('loglikelihood', key, result)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Each document's total log-likelihood after BOS, in windows of `max_length` tokens."""
    self._check_encodable(requests)
    windows, owners = [], []
    for i, request in enumerate(requests):
      tokens = self.tok_encode(request.args[0], add_special_tokens=False)
      for pair in lm_utils.get_rolling_token_windows(tokens, self.prefix_token_id,
                                                     self.max_length, context_len=1):
        windows.append(lm_utils.make_disjoint_window(pair))
        owners.append(i)
    totals = [0.0] * len(requests)
    for i, (ll, _) in zip(owners, self.scorer.loglikelihoods(windows)):
      totals[i] += ll
    for request, total in zip(requests, totals):
      self.cache_hook.add_partial('loglikelihood_rolling', request.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy (or sampled, with do_sample) continuations, cut at the first `until` string."""
    self._check_encodable(requests)
    groups: dict[str, list[int]] = {}
    for i, request in enumerate(requests):
      groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
    out: list = [None] * len(requests)
    for indices in groups.values():
      kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
      until = [s for s in kwargs['until'] if s]
      contexts = [requests[i].args[0] for i in indices]
      for i, text in zip(indices, self.generate(contexts, until, kwargs['max_gen_toks'],
                                                float(kwargs.get('temperature', 0.0)))):
        out[i] = text
        self.cache_hook.add_partial('generate_until', requests[i].args, text)
    return out

  def generate(self, contexts: list[str], until: list[str], max_new_tokens: int,
               temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Continuations of text contexts (`[bos] + encode(context)`, cut from the left to leave room
    for `max_new_tokens`), stopped at EOS, at a token that is an `until` string by itself, and cut
    at the first `until` string."""
    from lmjax.inference import generate as gen  # pylint: disable=g-import-not-at-top
    tok, scorer = self.tokenizer_, self.scorer
    room = self.max_length - max_new_tokens
    if room < 1:
      raise ConfigError(f'max_gen_toks: {max_new_tokens} new tokens leave no room for a context in '
                        f'max_length={self.max_length}')
    single = [ids[0] for ids in (tok.encode(s) for s in until) if len(ids) == 1]
    cfg = gen.SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                             stop_ids=tuple(dict.fromkeys((tok.eos_id, *single))))
    prompts = [self.tok_encode(c)[-room:] for c in contexts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts: list = [None] * len(prompts)
    for start in range(0, len(order), scorer.rows):
      chunk = order[start:start + scorer.rows]
      rows = [prompts[i] for i in chunk] + [[tok.bos_id]] * (scorer.rows - len(chunk))
      width = bucket_width(len(rows[0]), scorer.buckets)
      tokens, positions, segments = map(scorer.place, gen.left_pad(rows, tok.pad_id, width=width))
      with scorer.context():
        logits, cache = gen.prefill(self.model_cfg, self.params, tokens, positions, segments,
                                    max_len=width + max_new_tokens)
        new = gen.decode(self.model_cfg, cfg, self.params, cache, logits,
                         np.asarray([len(r) for r in rows], np.int32), tokens, segments,
                         jax.random.key(seed + start))
      new_tokens, lengths = jax.device_get((new[0], new[3]))
      for r, i in enumerate(chunk):
        ids = [int(t) for t in new_tokens[r, :int(lengths[r])]]
        if ids and ids[-1] in cfg.stop_ids:
          ids = ids[:-1]
        texts[i] = postprocess_generated_text(tok.decode(ids), until, None)
    return texts


# --- running tasks --------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _manager(include_path: str | None, include_defaults: bool):
  """A TaskManager (indexing lm-eval's own tasks takes seconds: once per process)."""
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  return TaskManager(include_path=include_path, include_defaults=include_defaults)


def task_manager(names: list[str], include_path: str | None = None):
  """A TaskManager that knows `names`: the include path alone when it holds them all (fast),
  else with lm-eval's own tasks; an unknown name is a one-line error."""
  manager = None
  if include_path:
    if not os.path.isdir(include_path):
      raise HarnessInputError(f'--include_path: no such directory: {include_path!r}')
    manager = _manager(include_path, False)
    if any(n not in manager.all_tasks and not os.path.isfile(n) for n in names):
      manager = None
  if manager is None:
    manager = _manager(include_path or None, True)
  for name in names:
    if name not in manager.all_tasks and not os.path.isfile(name):
      where = f'lm-eval\'s tasks or {include_path}' if include_path else 'lm-eval\'s tasks'
      raise HarnessInputError(f'--tasks: unknown task {name!r} (not in {where}; list them with '
                              '`lm-eval ls tasks`)')
  return manager


def _data_error(name: str, error: Exception) -> HarnessInputError:
  offline = os.environ.get('HF_DATASETS_OFFLINE', '') not in ('', '0')
  reason = str(error).splitlines()[0] if str(error) else type(error).__name__
  return HarnessInputError(f'task {name!r}: its dataset is missing'
                           f'{" offline (HF_DATASETS_OFFLINE=1)" if offline else ""}: {reason}')


def run_tasks(lm: LmjaxLM, tasks: list[str], num_fewshot: int | None = None,
              limit: float | None = None, include_path: str | None = None,
              log_samples: bool = False, bootstrap_iters: int = 100_000, seed: int = 0) -> dict:
  """lm-eval's `simple_evaluate` of `tasks` (names, groups or YAML paths) with `lm`; groups
  aggregate as lm-eval aggregates them. Few-shot examples are drawn with `seed`. Bad input is a
  HarnessInputError naming the task."""
  from lm_eval import simple_evaluate  # pylint: disable=g-import-not-at-top
  manager = task_manager(tasks, include_path)
  try:
    return simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                           log_samples=log_samples, task_manager=manager,
                           bootstrap_iters=bootstrap_iters, random_seed=seed,
                           numpy_random_seed=seed, torch_random_seed=seed,
                           fewshot_random_seed=seed)
  except HarnessInputError:
    raise
  except (OSError, ConnectionError, ValueError, KeyError) as e:
    for name in tasks:  # which task: load each alone
      try:
        manager.load([name])
      except Exception as task_error:  # pylint: disable=broad-except
        raise _data_error(name, task_error) from None
    raise


def flat_metrics(results: dict) -> dict:
  """{'TASK/METRIC': value} of every task and group (lm-eval's 'acc,none' is 'acc'; another
  filter is appended: 'exact_match_strict'), numbers only."""
  flat = {}
  for section in ('results', 'groups'):
    for task, metrics in (results.get(section) or {}).items():
      for key, value in metrics.items():
        if ',' not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
          continue
        metric, filt = key.split(',', 1)
        flat[f'{task}/{metric if filt == "none" else f"{metric}_{filt}"}'] = float(value)
  return flat


def write_samples(directory: str, samples: dict) -> list[str]:
  """Each task's logged samples as DIRECTORY/TASK.jsonl; returns the paths."""
  os.makedirs(directory, exist_ok=True)
  paths = []
  for task, records in samples.items():
    path = os.path.join(directory, f'{task}.jsonl')
    with open(path, 'w', encoding='utf-8') as f:
      for record in records:
        f.write(json.dumps(record, default=str, ensure_ascii=False) + '\n')
    paths.append(path)
  return paths


def training_hook(config, task, writer, mesh, rules=()):
  """`hook(step, state)` for the training loop: every `eval.harness_every` steps (and at the
  last step) runs `eval.harness_tasks` on the live params and writes each metric to
  metrics.jsonl / TensorBoard (split 'harness')."""
  from lmjax import data as data_lib  # pylint: disable=g-import-not-at-top
  from lmjax.models.transformer import ModelConfig  # pylint: disable=g-import-not-at-top
  e = config.eval
  names = [n.strip() for n in e.harness_tasks.split(',') if n.strip()]
  tokenizer = data_lib.load_or_train_tokenizer(config.data, config.model.vocab_size)
  model_cfg = ModelConfig.from_config(config.model)
  task_manager(names, e.harness_include_path or None)  # unknown names fail before training

  def hook(step, state):
    if not (e.harness_every and step % e.harness_every == 0) and step != config.steps:
      return
    lm = LmjaxLM.from_params(model_cfg, task.decoding_params(state.params), tokenizer,
                             e.harness_batch_size, mesh=mesh, rules=rules)
    results = run_tasks(lm, names, e.harness_num_fewshot, e.harness_limit or None,
                        e.harness_include_path or None, bootstrap_iters=0, seed=config.seed)
    writer.write(step, 'harness', flat_metrics(results))

  return hook
