"""The training loop, the same for every task: build everything from the config, resume, run the
task's experience phases and the train step, log, evaluate, checkpoint.

The loop never waits for the device inside a step without experience phases: each step's metrics
are fetched after the next step has been dispatched. Tasks with phases (PPO: rollout, score) are
timed phase by phase (`time/<phase>_s`). SIGTERM finishes the current step, saves a checkpoint
and returns. `hooks` are called after every step as `hook(step, state)` (fault injection in tests,
custom monitoring); `clock` is the wall clock used for throughput (a fake one in tests).
"""

from __future__ import annotations

import functools
import signal
import time
from typing import Callable, Collection, Sequence

import flax.linen as nn
import jax
import numpy as np

from lmjax import config as config_lib
from lmjax import data as data_lib
from lmjax import tasks as tasks_lib
from lmjax import workdir as workdir_lib
from lmjax.models import attention as attention_lib
from lmjax.parallel import distributed as distributed_lib
from lmjax.parallel import mesh as mesh_lib
from lmjax.parallel import ring_attention
from lmjax.parallel.pipeline import bubble_fraction
from lmjax.perf import peak_flops
from lmjax.scaling.flops import flops_per_token
from lmjax.train import step as step_lib
from lmjax.train.metrics import MetricsWriter, PhaseClock, throughput
from lmjax.train.state import build_state


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


def jit_programs(task, tx, schedule, mesh, abstract_state):
  """The jitted, sharded programs of a step: the experience phases, the train step (state
  donated) and the eval step."""
  state_shardings = jax.tree.map(lambda a: a.sharding, abstract_state)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  replicated = mesh_lib.replicated(mesh)
  phases = [(name, jax.jit(functools.partial(task.experience, name),
                           out_shardings=(batch_sharding, replicated, replicated)))
            for name in task.phases]
  train_fn = jax.jit(functools.partial(step_lib.train_step, task, tx, schedule),
                     in_shardings=(state_shardings, batch_sharding),
                     out_shardings=(state_shardings, replicated), donate_argnums=0)
  eval_fn = jax.jit(functools.partial(step_lib.eval_step, task),
                    in_shardings=(state_shardings.params, batch_sharding))
  return phases, train_fn, eval_fn


def global_batch(batch: dict, sharding, context: int = 1) -> dict:
  """Assembles the global batch from this process's rows; with the sequence split over `context`
  devices (mesh.context > 1), every array in zigzag order first (`ring_attention.zigzag`)."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in ring_attention.zigzag(batch, context).items()}


# model keys that do not change what the model computes: an init_from base may differ in them
_FREE_MODEL_KEYS = ('attention', 'scan_layers', 'remat', 'dtype', 'param_dtype', 'init_std',
                    'max_seq_len', 'logits_chunk', 'context_parallel')


def check_init_from(config, explicit: Collection[str] = ()) -> None:
  """An init_from base must have this run's architecture: each model key that differs is named,
  unless it was given explicitly (`explicit`: the command line's --config keys)."""
  base = workdir_lib.read_config(config.init_from) if config.init_from else None
  if base is None:
    return
  ours, theirs = config.model.to_dict(), base.model.to_dict()
  differ = [k for k in sorted(set(ours) | set(theirs)) if k not in _FREE_MODEL_KEYS
            and ours.get(k) != theirs.get(k) and f'model.{k}' not in explicit]
  if differ:
    raise config_lib.ConfigError(
        f'init_from: {config.init_from} was trained with ' + ', '.join(
            f'model.{k}={theirs.get(k)!r} (this run: {ours.get(k)!r})' for k in differ)
        + '; set them to match, or pass them on the command line to override')


def train(config, workdir: str, hooks: Sequence[Callable] = (),
          clock: Callable[[], float] = time.perf_counter, explicit: Collection[str] = ()) -> dict:
  """Trains (or resumes) per `config` in `workdir`; returns the run summary. `explicit`: config
  keys the user gave on the command line (they may differ from an init_from base's)."""
  start_time = time.time()
  distributed_lib.initialize(config)  # multi-host: before anything touches the devices
  mesh_lib.validate(config, jax.device_count())
  attention_lib.check_available(config.model.attention)
  is_lead = jax.process_index() == 0
  workdir_lib.check_resume_compatible(config, workdir)
  check_init_from(config, explicit)
  if is_lead:
    workdir_lib.write_config(workdir, config)

  tokenizer = data_lib.load_or_train_tokenizer(config.data, config.model.vocab_size)
  task = tasks_lib.from_config(config).bind(tokenizer)
  process = (jax.process_index(), jax.process_count())
  train_iter = task.make_iterator(config, tokenizer, *process)
  eval_batches = task.make_eval_batches(config, tokenizer, *process)
  data_report = data_lib.report_data(config, train_iter, eval_batches, is_lead)
  mesh = mesh_lib.make_mesh(config)
  rules = mesh_lib.rules(config)
  tx, schedule = task.optimizer(config)
  checkpointer = workdir_lib.checkpointer(workdir, keep=config.keep_checkpoints)

  with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules[0])):
    create_state, abstract_state = build_state(task, tx, config.seed, mesh, rules)
    latest = checkpointer.latest_step()
    if latest is not None:
      state, data_state = checkpointer.restore(latest, abstract_state)
      train_iter.set_state(data_state)
    else:
      state = create_state()
      if config.init_from:  # restored onto the mesh, then placed in the state's layout
        base = tasks_lib.load_trained(config.init_from, mesh=mesh, rules=rules[0])[1]
        state = state.replace(params=task.place_base(state.params, base))
    aux = task.load_auxiliary(mesh, rules[0])
    programs = jit_programs(task, tx, schedule, mesh, abstract_state)
    summary = _run_loop(config, workdir, task, state, aux, train_iter, eval_batches, programs,
                        checkpointer, mesh, is_lead, start_time, hooks, clock, data_report)
  checkpointer.close()
  return summary


def _run_loop(config, workdir, task, state, aux, train_iter, eval_batches, programs,
              checkpointer, mesh, is_lead, start_time, hooks, clock, data_report):
  phases, train_fn, eval_fn = programs
  batch_sharding = mesh_lib.batch_sharding(mesh)
  start_step = int(jax.device_get(state.step))
  model_flops = flops_per_token(config.model, config.seq_len)['total']  # forward + backward
  peak_per_device, peak_source = peak_flops(mesh)
  peak = peak_per_device * mesh.size
  stages = task.pipeline[0]
  extra = {'pipeline_bubble': bubble_fraction(stages, task.pipeline[1])} if stages > 1 else {}
  writer = MetricsWriter(workdir, config.steps, start_step, enabled=is_lead,
                         progress_bar=config.progress_bar)
  if config.eval.harness_tasks:  # lm-eval tasks on the live params, logged as split 'harness'
    from lmjax.evaluation.harness import training_hook  # pylint: disable=g-import-not-at-top
    hooks = (*hooks, training_hook(config, task, writer, mesh, mesh_lib.rules(config)[0]))
  phase_clock = PhaseClock(task.phases, clock) if task.phases else None
  if data_report:
    writer.write(start_step, 'data', data_report)
  pending = None  # (step, device metrics) of the last dispatched step
  last_train, last_eval = {}, {}
  step_tokens = None  # (trained, forward-only) tokens per step, from the first batch's shape
  window = {'start': clock(), 'steps': 0}
  to_device = lambda batch: global_batch(batch, batch_sharding, mesh.shape['context'])

  def flush(pending):
    """Fetches a dispatched step's metrics; logs them on log steps; checks the failure guard."""
    nonlocal last_train
    step, device_metrics, host_metrics = pending
    metrics = jax.device_get(device_metrics)
    if int(metrics['nonfinite_in_a_row']) >= config.max_nonfinite_in_a_row:
      raise TrainingError(f'{int(metrics["nonfinite_in_a_row"])} non-finite steps in a row at '
                          f'step {step} (max_nonfinite_in_a_row={config.max_nonfinite_in_a_row})')
    window['steps'] += 1
    if step % config.log_every == 0 or step == config.steps:
      now = clock()
      last_train = {k: float(v) for k, v in metrics.items()}
      last_train.update(throughput(window['steps'], now - window['start'], *step_tokens,
                                   model_flops, peak), **host_metrics, **extra)
      writer.write(step, 'train', last_train)
      window.update(start=now, steps=0)

  with _StopFlag() as stop:
    step = start_step
    while step < config.steps and not stop.stop:
      batch = to_device(next(train_iter))
      if step_tokens is None:
        step_tokens = task.step_tokens(batch)
      stats, host_metrics = {}, {}
      if phase_clock is not None:
        phase_clock.start()
        for name, phase_fn in phases:
          batch, phase_stats, task_state = phase_fn(state, aux, batch)
          phase_clock.lap(name, batch)
          stats.update(phase_stats)
          state = state.replace(task_state=task_state)
      state, device_metrics = train_fn(state, batch)
      if phase_clock is not None:
        phase_clock.lap('update', state)
        host_metrics = phase_clock.finish()
      step += 1
      if pending is not None:
        flush(pending)
      pending = (step, {**device_metrics, **stats}, host_metrics)
      writer.advance()
      if step % config.eval_every == 0 and step < config.steps and eval_batches:
        last_eval = task.evaluate(eval_fn, state.params, eval_batches, to_device, aux)
        writer.write(step, 'eval', last_eval)
      if step % config.checkpoint_every == 0 or stop.stop:
        checkpointer.save(step, state, train_iter.get_state(), force=True)
      for hook in hooks:
        hook(step, state)
    if pending is not None:
      flush(pending)

  finished = step >= config.steps
  if finished and eval_batches:
    last_eval = task.evaluate(eval_fn, state.params, eval_batches, to_device, aux)
    writer.write(step, 'eval', last_eval)
  if checkpointer.latest_step() != step:  # finished, or stopped (SIGTERM) between saves
    checkpointer.save(step, state, train_iter.get_state(), force=True)
  checkpointer.wait()
  writer.close()
  getattr(train_iter, 'close', lambda: None)()
  previous = workdir_lib.read_summary(workdir)  # a resumed run with nothing left keeps its loss
  summary = {
      'step': step, 'finished': finished, 'stopped_by_signal': not finished,
      'train_loss': last_train.get('loss', previous.get('train_loss')),
      'eval_loss': last_eval.get('loss'),
      'eval_perplexity': last_eval.get('perplexity'),
      'tokens': step * step_tokens[0] if step_tokens else previous.get('tokens'),
      'skipped_steps': last_train.get('skipped'), 'wall_seconds': time.time() - start_time,
      'mfu_peak_flops_per_device': peak_per_device, 'mfu_peak_source': peak_source,
      **({key: last_train.get(key) for key in ('score', 'kl')} if task.phases else {}),
      **(phase_clock.summary() if phase_clock is not None else {}),
      **{f'eval_{k}': last_eval[k] for k in ('accuracy', 'margin', 'score', 'kl')
         if k in last_eval},
      **(data_report or {}),
  }
  if is_lead:
    workdir_lib.write_summary(workdir, summary)
  return summary
