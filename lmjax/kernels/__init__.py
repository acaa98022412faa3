"""Custom Pallas kernels for lmjax."""

from lmjax.kernels.flash_attention import flash_attention

__all__ = ["flash_attention"]
