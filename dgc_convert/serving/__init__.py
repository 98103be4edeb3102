"""Serving: a model prepared for inference (BatchNorm folded, weights packed) and ONNX export."""
