"""Imported at start-up when this folder is on PYTHONPATH: makes the packages lmjax's accelerator
check must not need unimportable, as on a machine with only jax, flax, optax, orbax and numpy."""

import sys

_ABSENT = ('grain', 'ml_collections', 'tensorboardX', 'sentencepiece', 'tqdm', 'scipy',
           'matplotlib', 'rouge_score', 'sacrebleu', 'pandas', 'pyarrow', 'datasets', 'lm_eval',
           'transformers', 'torch', 'safetensors', 'tokenizers')


class _Absent:
  def find_spec(self, name, path=None, target=None):
    del path, target
    if name.split('.')[0] in _ABSENT:
      raise ModuleNotFoundError(f'No module named {name!r} (absent in this runtime)', name=name)
    return None


sys.meta_path.insert(0, _Absent())
