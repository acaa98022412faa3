"""One module per `lmjax` command: `add_arguments(parser)` and `run(args) -> int`."""
