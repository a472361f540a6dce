"""Measurements: end to end, verification cost, the tree-shape tuner, sampling tau, GPU jobs."""
