"""The training loop: build everything from the config, resume, step, log, evaluate, checkpoint.

The loop never waits for the device inside a step: each step's metrics are fetched after the next
step has been dispatched. SIGTERM finishes the current step, saves a checkpoint and returns.
"""

from __future__ import annotations

import json
import os
import signal
import time

import flax.linen as nn
import jax
import numpy as np

from lmjax import checkpoint as checkpoint_lib
from lmjax import config as config_lib
from lmjax import data as data_lib
from lmjax.evaluate import held_out_loss
from lmjax.models import attention as attention_lib
from lmjax.parallel import distributed as distributed_lib
from lmjax.parallel import mesh as mesh_lib
from lmjax.parallel.pipeline import bubble_fraction
from lmjax.perf import peak_flops_per_device
from lmjax.posttrain import params as post_params_lib
from lmjax.posttrain import tasks as tasks_lib
from lmjax.scaling.flops import flops_per_token
from lmjax.train import step as step_lib
from lmjax.train.metrics import MetricsWriter


class TrainingError(RuntimeError):
  """The run cannot go on (e.g. too many non-finite steps in a row)."""


class _StopFlag:
  """Set by SIGTERM; the loop checks it between steps."""

  def __init__(self):
    self.stop = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.stop = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def build_state(config, mesh, tx):
  """Compiles state creation with the logical shardings; returns (create_fn, abstract_state).

  Nothing is allocated until `create_fn()` runs, and then directly sharded.
  """
  step_cfg = step_lib.StepConfig.from_config(config)
  with nn.logical_axis_rules(()):  # init traces the model on a 1-row batch: no constraints
    boxed = jax.eval_shape(lambda: step_lib.init_state(step_cfg, tx, config.seed))
  if step_cfg.task is None:
    shardings = mesh_lib.state_shardings(boxed, tx, mesh, *mesh_lib.rules(config))
  else:  # post-training: the optimizer sees params['trainable'] only
    shardings = post_params_lib.state_shardings(boxed, tx, mesh, config)

  def create():
    with nn.logical_axis_rules(()):
      state = step_lib.init_state(step_cfg, tx, config.seed)
    params = jax.lax.with_sharding_constraint(nn.unbox(state.params), shardings.params)
    return state.replace(params=params, opt_state=tx.init(step_lib.trainable_params(step_cfg,
                                                                                    params)))

  compiled = jax.jit(create, out_shardings=shardings).lower().compile()
  shapes = jax.eval_shape(create)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, compiled.output_shardings)
  return compiled, abstract


def jit_steps(config, mesh, tx, schedule, abstract_state):
  """The jitted, sharded train step (state donated) and eval step."""
  step_cfg = step_lib.StepConfig.from_config(config)
  state_shardings = jax.tree.map(lambda a: a.sharding, abstract_state)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  train_fn = jax.jit(lambda s, b: step_lib.train_step(step_cfg, tx, schedule, s, b),
                     in_shardings=(state_shardings, batch_sharding),
                     out_shardings=(state_shardings, mesh_lib.replicated(mesh)),
                     donate_argnums=0)
  eval_fn = jax.jit(lambda p, b: step_lib.eval_step(step_cfg.model, p, b),
                    in_shardings=(state_shardings.params, batch_sharding))
  return train_fn, eval_fn


def global_batch(batch: dict, sharding) -> dict:
  """Assembles the global batch from this process's rows."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def _init_params_from(source: str, state, abstract_state):
  params = checkpoint_lib.load_params(source, abstract_state.params)
  return state.replace(params=params)


def train(config, workdir: str) -> dict:
  """Trains (or resumes) per `config` in `workdir`; returns the run summary."""
  start_time = time.time()
  if config.task == 'ppo':  # rollout-then-update: its own outer loop (lmjax.posttrain.ppo)
    from lmjax.posttrain import ppo  # pylint: disable=g-import-not-at-top
    return ppo.train(config, workdir)
  distributed_lib.initialize(config)  # multi-host: before anything touches the devices
  config_lib.validate(config, jax.device_count())
  attention_lib.check_available(config.model.attention)
  os.makedirs(workdir, exist_ok=True)
  is_lead = jax.process_index() == 0
  _check_resume_compatible(config, workdir)
  if is_lead:
    _write_json(os.path.join(workdir, 'config.json'), config.to_dict())

  tokenizer = data_lib.load_or_train_tokenizer(config.data, config.model.vocab_size)
  if config.task != 'pretrain':  # post-training: the task's data (no held-out eval)
    train_iter = tasks_lib.make_iterator(config, tokenizer, jax.process_index(),
                                         jax.process_count())
    eval_batches = []
  else:
    train_iter = data_lib.make_train_iterator(config, tokenizer, jax.process_index(),
                                              jax.process_count())
    eval_batches = data_lib.make_eval_batches(config, tokenizer, jax.process_index(),
                                              jax.process_count())

  mesh = mesh_lib.make_mesh(config)
  step_cfg = step_lib.StepConfig.from_config(config)
  tx, schedule = tasks_lib.make_optimizer(config, step_cfg.task)
  checkpointer = checkpoint_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
  batch_sharding = mesh_lib.batch_sharding(mesh)

  with jax.set_mesh(mesh), nn.logical_axis_rules(list(mesh_lib.rules(config)[0])):
    create_state, abstract_state = build_state(config, mesh, tx)
    latest = checkpointer.latest_step()
    if latest is not None:
      state, data_state = checkpointer.restore(latest, abstract_state)
      train_iter.set_state(data_state)
    else:
      state = create_state()
      if config.init_from and step_cfg.task is not None:
        state = post_params_lib.init_from(step_cfg.task, config.init_from, state)
      elif config.init_from:
        state = _init_params_from(config.init_from, state, abstract_state)
    train_fn, eval_fn = jit_steps(config, mesh, tx, schedule, abstract_state)
    summary = _run_loop(config, workdir, state, train_iter, eval_batches, train_fn, eval_fn,
                        checkpointer, batch_sharding, is_lead, start_time)
  checkpointer.close()
  return summary


def _run_loop(config, workdir, state, train_iter, eval_batches, train_fn, eval_fn, checkpointer,
              batch_sharding, is_lead, start_time):
  start_step = int(jax.device_get(state.step))
  tokens_per_step = config.batch_size * config.seq_len
  model_flops_per_token = flops_per_token(config.model, config.seq_len)['total']
  peak = peak_flops_per_device() * jax.device_count()
  stages = config_lib.mesh_shape(config, jax.device_count())['pipeline']
  extra = ({'pipeline_bubble': bubble_fraction(stages, config.pipeline_microbatches)}
           if stages > 1 else {})
  writer = MetricsWriter(workdir, config.steps, start_step, enabled=is_lead,
                         progress_bar=config.progress_bar)
  pending = None  # (step, device metrics) of the last dispatched step
  last_train, last_eval = {}, {}
  window_start, window_steps = time.perf_counter(), 0
  to_device = lambda batch: global_batch(batch, batch_sharding)

  def flush(pending):
    """Fetches a dispatched step's metrics; logs them on log steps; checks the failure guard."""
    nonlocal window_start, window_steps, last_train
    step, device_metrics = pending
    metrics = jax.device_get(device_metrics)
    if int(metrics['nonfinite_in_a_row']) >= config.max_nonfinite_in_a_row:
      raise TrainingError(f'{int(metrics["nonfinite_in_a_row"])} non-finite steps in a row at '
                          f'step {step} (max_nonfinite_in_a_row={config.max_nonfinite_in_a_row})')
    window_steps += 1
    if step % config.log_every == 0 or step == config.steps:
      elapsed = time.perf_counter() - window_start
      tokens_per_second = window_steps * tokens_per_step / max(elapsed, 1e-9)
      last_train = {k: float(v) for k, v in metrics.items()}
      last_train.update(tokens_per_second=tokens_per_second,
                        mfu=tokens_per_second * model_flops_per_token / peak, **extra)
      writer.write(step, 'train', last_train)
      window_start, window_steps = time.perf_counter(), 0

  with _StopFlag() as stop:
    step = start_step
    while step < config.steps and not stop.stop:
      batch = global_batch(next(train_iter), batch_sharding)
      state, device_metrics = train_fn(state, batch)
      step += 1
      if pending is not None:
        flush(pending)
      pending = (step, device_metrics)
      writer.advance()
      if step % config.eval_every == 0 and step < config.steps and eval_batches:
        last_eval = held_out_loss(eval_fn, state.params, eval_batches, to_device)
        writer.write(step, 'eval', last_eval)
      if step % config.checkpoint_every == 0 or stop.stop:
        checkpointer.save(step, state, train_iter.get_state(), force=True)
      _maybe_crash(step)
    if pending is not None:
      flush(pending)

  finished = step >= config.steps
  if finished:
    if eval_batches:
      last_eval = held_out_loss(eval_fn, state.params, eval_batches, to_device)
      writer.write(step, 'eval', last_eval)
    if checkpointer.latest_step() != step:
      checkpointer.save(step, state, train_iter.get_state(), force=True)
  checkpointer.wait()
  writer.close()
  getattr(train_iter, 'close', lambda: None)()
  summary_path = os.path.join(workdir, 'summary.json')
  previous = {}  # a resumed run that had nothing left to do keeps its last train loss
  if os.path.exists(summary_path):
    with open(summary_path, encoding='utf-8') as f:
      previous = json.load(f)
  summary = {
      'step': step, 'finished': finished, 'stopped_by_signal': not finished,
      'train_loss': last_train.get('loss', previous.get('train_loss')),
      'eval_loss': last_eval.get('loss'),
      'eval_perplexity': last_eval.get('perplexity'), 'tokens': step * tokens_per_step,
      'skipped_steps': last_train.get('skipped'), 'wall_seconds': time.time() - start_time,
  }
  if is_lead:
    _write_json(summary_path, summary)
  return summary


def _check_resume_compatible(config, workdir: str) -> None:
  """A workdir with checkpoints resumes only under the same model (and task, PEFT) shape."""
  path = os.path.join(workdir, 'config.json')
  if not (os.path.isdir(os.path.join(workdir, 'checkpoints')) and os.path.exists(path)):
    return
  with open(path, encoding='utf-8') as f:
    saved = config_lib.from_json(f.read())
  for group in ('model', 'peft', 'task'):
    old, new = saved.get(group), config.get(group)
    old = old.to_dict() if hasattr(old, 'to_dict') else old
    new = new.to_dict() if hasattr(new, 'to_dict') else new
    if old == new:
      continue
    if isinstance(old, dict):
      key = next(f'{group}.{k}' for k in new if old.get(k) != new[k])
      old, new = old.get(key.split('.', 1)[1]), new[key.split('.', 1)[1]]
    else:
      key = group
    raise config_lib.ConfigError(
        f'{key}: {workdir} holds checkpoints of a run with {key}={old!r}, not {new!r}; '
        'use another --workdir (or --config.init_from to start from it)')


def _maybe_crash(step: int) -> None:
  """Fault injection for tests: LMJAX_CRASH_AT_STEP=N kills this process (SIGKILL) right after
  step N is dispatched and its checkpoint save, if any, has started; LMJAX_STEP_DELAY=S sleeps S
  seconds per step so that a test can signal a run in flight."""
  if os.environ.get('LMJAX_CRASH_AT_STEP') == str(step):
    os.kill(os.getpid(), signal.SIGKILL)
  if float(os.environ.get('LMJAX_STEP_DELAY') or 0):
    time.sleep(float(os.environ['LMJAX_STEP_DELAY']))


def _write_json(path: str, value) -> None:
  tmp = f'{path}.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(value, f, indent=2, sort_keys=True)
  os.replace(tmp, path)

