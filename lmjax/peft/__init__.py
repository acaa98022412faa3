"""Parameter-efficient fine-tuning: weight-delta methods as pytree transforms (see `lora`) and
in-model methods (bottleneck adapters, prefix/prompt/P-tuning) through the model's `peft` hook
(see `hooks`). A frozen base may be stored quantised (int8 / NF4, QLoRA-style: see `quant`)."""

from lmjax.peft import hooks, quant
from lmjax.peft.lora import (LOW_RANK_METHODS, METHODS, PeftConfig, effective_params,
                             init_adapters, merge, lora_b_mask, target_paths, unmerge)

__all__ = ['LOW_RANK_METHODS', 'METHODS', 'PeftConfig', 'effective_params', 'hooks',
           'init_adapters', 'merge', 'lora_b_mask', 'quant', 'target_paths', 'unmerge']
