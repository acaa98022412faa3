"""Shared fixtures. Tests run on one CPU device; multi-device tests start their own processes."""

import os
import tempfile

# One tokenizer/peak-FLOPs cache for the whole session, never the user's own.
os.environ.setdefault('LMJAX_CACHE_DIR', tempfile.mkdtemp(prefix='lmjax-test-cache-'))
os.environ.setdefault('LMJAX_PEAK_FLOPS', '1e11')  # MFU needs a peak; don't measure it in tests
# The [tpu] extra installs libtpu, which probes for TPU hardware (and logs about it) at start-up.
# Tests run on the CPU and compile for TPU ahead of time, which needs no TPU backend; several
# workers may load libtpu at once.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

# pylint: disable=g-import-not-at-top,wrong-import-position
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.config import load_config
from lmjax.models.transformer import ModelConfig, init_params


@pytest.fixture
def tiny_config():
  return load_config('tiny')


# A tiny model for tests whose shapes don't matter: 2 layers, GQA (4 query heads, 2 kv heads).
TINY_MODEL = ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                         head_dim=8, mlp_dim=64, max_seq_len=64)


@pytest.fixture(scope='session')
def tiny_model():
  """The tiny ModelConfig (a frozen dataclass)."""
  return TINY_MODEL


@pytest.fixture(scope='session')
def _tiny_params_once(tiny_model):
  return nn.unbox(init_params(tiny_model, jax.random.key(0)))


@pytest.fixture
def tiny_params(_tiny_params_once):
  """Plain (unboxed) params of `tiny_model`, seed 0: initialised once per session; each test gets
  its own dicts around the shared (immutable) arrays, so a test may add or replace entries."""
  return jax.tree.map(lambda x: x, _tiny_params_once)


@pytest.fixture(scope='session')
def packed_batch(tiny_model):
  """A (2, 16) packed batch in the training layout, built by hand: row 0 holds documents of 7 and
  10 tokens, row 1 documents of 5 and 8 tokens and 4 padding slots (segment 0, token 0). Inputs
  are a row's first 16 tokens, targets its last 16; a target's weight is 1 only inside a document.
  Arrays are jax arrays, so no test can change them in place."""
  rng = np.random.default_rng(0)
  length = 16
  docs = [[7, 10], [5, 8]]
  tokens, segments, positions = (np.zeros((2, length + 1), np.int32) for _ in range(3))
  for row, lengths in enumerate(docs):
    start = 0
    for segment, n in enumerate(lengths, 1):
      tokens[row, start:start + n] = rng.integers(1, tiny_model.vocab_size, n)
      segments[row, start:start + n] = segment
      positions[row, start:start + n] = np.arange(n)
      start += n
  same = (segments[:, :-1] == segments[:, 1:]) & (segments[:, :-1] > 0)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'segment_ids': segments[:, :-1],
           'positions': positions[:, :-1], 'weights': same.astype(np.float32)}
  return {k: jnp.asarray(v) for k, v in batch.items()}
