"""Shipping a trained model to an edge runtime: the fold math as pure functions, the graph pass that folds BN,
model sources (run directories, checkpoints, torchvision), ONNX export and onnxruntime verification.

May import the shared building blocks, distributed (to revert sync BN) and the run formats in
training.run_directory / training.checkpoint; never the training loop, studies, benchmarks or commands.
"""
