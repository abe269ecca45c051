"""What runs on the edge device (onnxruntime + numpy, Pillow for image files) and the tools to quantise and measure.

The scripts run as ``python deploy/<script>.py``; none of them imports torch, onnx or bnstudy at module level.
"""
