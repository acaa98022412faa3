"""Model presets shipped in the package: `--config=NAME` loads `lmjax/configs/NAME.py`."""
