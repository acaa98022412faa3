"""Where lmjax keeps files between runs."""

from __future__ import annotations

import os


def cache_dir(*parts: str) -> str:
  """lmjax's cache (tokenizers, the CPU peak), or a path inside it: $LMJAX_CACHE_DIR, else
  ~/.cache/lmjax."""
  root = os.environ.get('LMJAX_CACHE_DIR') or os.path.join(os.path.expanduser('~'), '.cache',
                                                           'lmjax')
  return os.path.join(root, *parts)
