"""Distributed BatchNorm: sync BN and the collectives it issues, process-group plumbing, rank statistics and
PreciseBN.

May import torch and bnstudy's shared building blocks (errors, io); never training, traces, edge, studies,
benchmarks or commands.
"""
