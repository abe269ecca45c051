"""One module per ``bnstudy`` subcommand; each has ``register(registry)``."""
