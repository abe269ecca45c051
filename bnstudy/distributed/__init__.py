"""Distributed BatchNorm: sync BN, its per-layer CPU arithmetic (a NumPy reference and a C++ build of it, csrc/),
the collectives it issues, DDP with its gradients over the same shared memory, process-group plumbing, rank
statistics and PreciseBN.

May import torch and bnstudy's shared building blocks (errors, io); never training, traces, edge, studies,
benchmarks or commands.
"""
