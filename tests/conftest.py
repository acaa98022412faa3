"""Shared fixtures. Tests run on one CPU device; multi-device tests start their own processes."""

import os
import tempfile

# One tokenizer/peak-FLOPs cache for the whole session, never the user's own.
os.environ.setdefault('LMJAX_CACHE_DIR', tempfile.mkdtemp(prefix='lmjax-test-cache-'))
os.environ.setdefault('LMJAX_PEAK_FLOPS', '1e11')  # MFU needs a peak; don't measure it in tests

import pytest  # pylint: disable=g-import-not-at-top

from lmjax.config import load_config  # pylint: disable=g-import-not-at-top


@pytest.fixture
def tiny_config():
  return load_config('tiny')
