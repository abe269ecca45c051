"""bnstudy: BatchNorm end to end — the math, training behaviour, distributed statistics and edge export."""

__version__ = "0.1.0"
