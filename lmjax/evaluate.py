"""Evaluation: held-out loss and perplexity, shared by the training loop and `lmjax eval`."""

from __future__ import annotations

import functools

import jax
import numpy as np

from lmjax.train.step import eval_step


def held_out_loss(eval_fn, params, batches, to_device=lambda batch: batch) -> dict:
  """Token-weighted mean loss, perplexity = exp(loss), and the token count over `batches`.

  `eval_fn(params, batch)` returns the sums {'nll', 'weight'}; `to_device` places a host batch.
  """
  nll = weight = 0.0
  for batch in batches:
    sums = jax.device_get(eval_fn(params, to_device(batch)))
    nll += float(sums['nll'])
    weight += float(sums['weight'])
  loss = nll / max(weight, 1.0)
  return {'loss': loss, 'perplexity': float(np.exp(loss)), 'tokens': weight}


def evaluate_workdir(model_cfg, params, batches) -> dict:
  """Held-out metrics of a loaded model on one device."""
  eval_fn = jax.jit(functools.partial(eval_step, model_cfg))
  return held_out_loss(eval_fn, params, batches)
