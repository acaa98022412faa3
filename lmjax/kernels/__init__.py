"""Custom Pallas kernels for lmjax.

Import kernels from their modules, e.g.
``from lmjax.kernels.flash_attention import flash_attention`` (the package does
not re-export them, so that ``lmjax.kernels.flash_attention`` stays the module).
"""
