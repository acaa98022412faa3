"""Hugging Face interoperability: import LLaMA / Mistral / Qwen2 checkpoints, export them back.

  import_hf(hf_dir, workdir, dtype='float32')   HF dir -> lmjax workdir (config.json + params/)
  export_hf(workdir, hf_dir)                    lmjax workdir -> HF dir (config.json + safetensors)
  load_tokenizer(path)                          SentencePiece `.model` or HF `tokenizer.json`
"""

from lmjax.convert.hf import abstract_params, export_hf, import_hf, load_hf_params
from lmjax.convert.hf_config import ConversionError, hf_config_from_model, model_config_from_hf
from lmjax.convert.tokenizer import HFTokenizer
from lmjax.data.tokenizer import load_tokenizer

__all__ = [
    'ConversionError', 'HFTokenizer', 'abstract_params', 'export_hf', 'hf_config_from_model',
    'import_hf', 'load_hf_params', 'load_tokenizer', 'model_config_from_hf',
]
