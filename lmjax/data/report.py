"""What a run says at its start about its data: kept / cut / dropped / skipped examples and the
held-out set (or why there is none). Printed once and logged to metrics.jsonl (split 'data') and
summary.json as `data/...` counts."""

from __future__ import annotations


def no_eval_reason(config) -> str:
  """Why a run has no held-out batches."""
  if config.eval_batches <= 0:
    return 'eval_batches=0'
  if config.task == 'pretrain':
    return (f'data.source {config.data.source!r} gave no held-out document (data.eval_fraction='
            f'{config.data.eval_fraction}; a single JSON line or a file of one line stays in '
            'training)')
  if config.post.eval_file:
    return f'post.eval_file {config.post.eval_file} gave no usable example'
  fraction = config.post.eval_fraction
  if fraction <= 0:
    return 'no post.eval_file and post.eval_fraction=0'
  return (f'post.train_file has fewer than {int(1 / fraction)} records to hold '
          f'{fraction:g} of them out; set post.eval_file')


def report_data(config, train_iter, eval_batches, verbose: bool = True) -> dict:
  """Prints the data report (when `verbose`) and returns its counts for the metrics."""
  metrics = {}
  report = getattr(train_iter, 'report', None)
  lines = []
  if report is not None:
    metrics.update(report.as_metrics('data/'))
    lines.append(f'data: {report.line()}')
  eval_report = getattr(train_iter, 'eval_report', None)
  if eval_report is not None:
    metrics.update(eval_report.as_metrics('data/eval_'))
    lines.append(f'data: held out: {eval_report.line()}')
  skipped = getattr(train_iter, 'skipped', None)  # pretraining: bad documents skipped
  if report is None and skipped is not None:
    metrics['data/skipped'] = skipped
    if skipped:
      lines.append(f'data: skipped {skipped} bad documents (data.on_bad_input=skip)')
  if eval_batches:
    rows = sum(len(next(iter(b.values()))) for b in eval_batches)
    metrics['data/eval_rows'] = rows
    source = ''
    if config.task in ('sft', 'reward', 'dpo', 'ppo'):
      source = f' from {config.post.eval_file or "a held-out share of post.train_file"}'
    lines.append(f'data: held-out evaluation on {len(eval_batches)} batches ({rows} rows '
                 f'on this process){source}, every {config.eval_every} steps')
  else:
    lines.append(f'data: no held-out evaluation: {no_eval_reason(config)}')
  if verbose:
    for line in lines:
      print(line, flush=True)
  return metrics

