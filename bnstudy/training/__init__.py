"""Training runs: configuration, data for a run, the loop, the launcher, checkpoints, the run directory (every file
name, its writer and reader), comparing runs and the batch-size sweep.

May import the shared building blocks, distributed, traces.record and edge.qat (the QAT modules --qat-from trains);
never the rest of edge, studies, benchmarks or commands.
run_directory and checkpoint hold the formats other parts read, and import nothing else from training.
"""
