"""One module per README figure; each has `add_arguments(parser)` and `run(args) -> dict`."""
