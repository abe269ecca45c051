"""Profiler traces: recording them (record), reading every torch.profiler schema into one event form
(trace_events), attributing a step's CPU time (cpu_attribution) and GPU time (gpu_attribution) to BN and the rest,
summary and compare (attribution), and serving them in TensorBoard (tensorboard).

May import the shared building blocks, distributed (the labels sync BN's collectives carry, a free port) and the
run directory layout (training.run_directory); never the training loop, edge, studies, benchmarks or commands.
"""
