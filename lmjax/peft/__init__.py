"""Parameter-efficient fine-tuning as pytree transforms (see `lora`)."""

from lmjax.peft.lora import (METHODS, PeftConfig, effective_params, init_adapters, merge,
                             lora_b_mask, target_paths, unmerge)

__all__ = ['METHODS', 'PeftConfig', 'effective_params', 'init_adapters', 'merge',
           'lora_b_mask', 'target_paths', 'unmerge']
