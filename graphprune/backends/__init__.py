"""Backends: build, run and benchmark optimized models (ONNX Runtime; TensorRT lowering)."""
