"""Measuring a model: MACs per sample (on fake tensors), memory, accuracy, gate usage, latency."""
