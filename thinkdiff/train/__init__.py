"""Alignment training: data, feature cache, objectives, checkpoints and the accelerate loop."""
