"""Text in, text out: decoding options from a config, completions of text prompts, and sampling
from a trained workdir's model (what `lmjax sample` and `lmjax train` print)."""

from __future__ import annotations

from lmjax.config import ConfigError
from lmjax.inference.generate import SamplingConfig, generate

SAMPLING_OPTIONS = ('max_new_tokens', 'temperature', 'top_k', 'top_p', 'min_p',
                    'repetition_penalty', 'num_beams', 'length_penalty')
# a --num_beams flag turns the config's sampling options off (flags given with it still count)
BEAM_NEUTRAL = {'temperature': 0.0, 'top_k': 0, 'top_p': 1.0, 'min_p': 0.0,
                'repetition_penalty': 1.0}


def sampling_config(config, tokenizer, flags=None) -> SamplingConfig:
  """SamplingConfig from the config's `sample` group, overridden by the flags given.

  `flags`: an object with any of SAMPLING_OPTIONS, `no_stop` and `stop_token` as attributes (the
  parsed command line); an attribute that is None keeps the config's value, except that a
  `num_beams` flag > 1 turns the config's sampling options off (BEAM_NEUTRAL). Stops at the
  tokenizer's EOS unless `no_stop`, and at every `stop_token`.
  """
  values = {}
  beams_flag = (getattr(flags, 'num_beams', None) or 1) > 1
  for name in SAMPLING_OPTIONS:
    flag = getattr(flags, name, None)
    if flag is not None:
      values[name] = flag
    elif beams_flag and name in BEAM_NEUTRAL:  # --num_beams overrides the workdir's sampling
      values[name] = BEAM_NEUTRAL[name]
    else:
      values[name] = config.sample[name]
  stops = () if getattr(flags, 'no_stop', False) else (tokenizer.eos_id,)
  stops += tuple(getattr(flags, 'stop_token', None) or ())
  try:
    return SamplingConfig(stop_ids=tuple(dict.fromkeys(stops)), **values)
  except ValueError as e:
    raise ConfigError(f'sample: {e}') from None


def complete(model_cfg, params, tokenizer, prompts: list[str], cfg: SamplingConfig, seed: int = 0,
             batch_size: int = 32) -> list[dict]:
  """Records {prompt, completion, tokens, logprobs, finished} (stop tokens left out; beam search
  adds `score`) for text prompts, each encoded as `[bos] + encode(prompt)`."""
  records = []
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    out = generate(model_cfg, params, [[tokenizer.bos_id] + tokenizer.encode(p) for p in chunk],
                   cfg, seed=seed + start, pad_id=tokenizer.pad_id)
    for i, prompt in enumerate(chunk):
      n = int(out['lengths'][i])
      ids = [int(t) for t in out['tokens'][i, :n]]
      logprobs = [float(x) for x in out['logprobs'][i, :n]]
      if out['finished'][i] and ids and ids[-1] in cfg.stop_ids:
        ids, logprobs = ids[:-1], logprobs[:-1]
      record = {'prompt': prompt, 'completion': tokenizer.decode(ids), 'tokens': ids,
                'logprobs': logprobs, 'finished': bool(out['finished'][i])}
      if 'scores' in out:
        record['score'] = float(out['scores'][i])
      records.append(record)
  return records


def sample_records(workdir: str, config, prompts: list[str], flags=None) -> list[dict]:
  """`complete` with the workdir's tokenizer and model, decoding per `sampling_config(config,
  tokenizer, flags)`; `flags` may also carry `seed` (default 0) and `batch_size` (default 32)."""
  from lmjax import data as data_lib  # pylint: disable=g-import-not-at-top
  from lmjax.tasks import load_model  # pylint: disable=g-import-not-at-top
  tokenizer = data_lib.load_or_train_tokenizer(config.data, config.model.vocab_size)
  cfg = sampling_config(config, tokenizer, flags)
  model_cfg, params = load_model(workdir, config)
  return complete(model_cfg, params, tokenizer, prompts, cfg,
                  seed=getattr(flags, 'seed', 0) or 0, batch_size=getattr(flags, 'batch_size', 32))


def sample_text(workdir: str, config, prompts: list[str], flags=None) -> list[str]:
  """Completions (the text after each prompt) from the workdir's model."""
  return [r['completion'] for r in sample_records(workdir, config, prompts, flags)]
