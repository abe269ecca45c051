"""Distributed training pieces: sync BN, its transports (gloo, shared memory), process-group plumbing, rank
statistics."""
