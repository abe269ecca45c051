"""Profiler traces: recording them (record), attributing a step's time to BN and the rest (attribution: summary and
compare), and serving them in TensorBoard (tensorboard).

May import the shared building blocks, distributed (the labels sync BN's collectives carry, a free port) and the
run directory layout (training.run_directory); never the training loop, edge, studies, benchmarks or commands.
"""
